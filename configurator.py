"""Configuration shared by train.py and sample.py.

Defaults live in dataclasses, one field per knob with its meaning in the field's metadata
(see knob). A config file of plain Python assignments (`n_layer = 4`) overrides them, then
command-line flags (`--n_layer=4` or `--n_layer 4`) override the file. Nothing is exec'd:
the file is parsed with ast and each value must be a literal. Unknown keys and values of
the wrong type are ValueErrors that name the key.
"""

import ast
import dataclasses
import os
import typing


def knob(default, help):
    """A dataclass field with its meaning, shown by --help."""
    return dataclasses.field(default=default, metadata={"help": help})


def _fields(config):
    """The settable fields of a dataclass instance, with their resolved types."""
    hints = typing.get_type_hints(type(config))
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(config) if not f.metadata.get("derived")}


def _type_name(typ):
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}[typ]


def convert(key, value, typ, from_text):
    """value as typ: from_text for a command-line string, else a literal from a config file."""
    if from_text and typ is not str:
        text = value.strip()
        if typ is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
        else:
            try:
                return typ(text) if typ is float else int(text)
            except ValueError:
                pass
        raise ValueError(f"--{key} expects {_type_name(typ)}, got {value!r}")
    # a literal from a config file: an int is fine where a float is expected, nothing else
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise ValueError(f"--{key} expects {_type_name(typ)}, got {value!r}")
    return value


def read_config_file(path):
    """The assignments of a config file as a dict, without running it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid Python: {e.msg}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring or a comment-like string
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}:{node.lineno}: only plain assignments like `n_layer = 4` are allowed")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{path}:{node.lineno}: the value of {node.targets[0].id} must be a literal") from None
    return values


def help_text(configs, usage):
    lines = [f"usage: {usage}", ""]
    for config in configs:
        lines.append(f"{type(config).__name__}:")
        for name, (f, typ) in _fields(config).items():
            lines.append(f"  --{name}={getattr(config, name)!r}".ljust(34) + f"  {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


class HelpRequested(Exception):
    """--help was given: the caller prints the text and exits 0."""


def parse(argv, configs, usage, config_file=True):
    """New instances of configs (dataclass instances holding the defaults) with the config
    file (a positional argument, if config_file) and then the flags of argv applied.

    Returns (instances, config_path). Raises HelpRequested with the help text for --help/-h."""
    owner = {}
    for i, config in enumerate(configs):
        for name, (f, typ) in _fields(config).items():
            owner[name] = (i, typ)

    config_path, flags = None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            raise HelpRequested(help_text(configs, usage))
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")  # split on the first '=' only
            if not has_value:
                if not args or args[0].startswith("--"):
                    raise ValueError(f"--{key} needs a value (--{key}=VALUE)")
                value = args.pop(0)
            flags.append((key, value))
        elif config_file and config_path is None:
            config_path = arg
        else:
            raise ValueError(f"unexpected argument {arg!r} (flags look like --key=value)")

    updates = [{} for _ in configs]

    def apply(key, value, from_text):
        if key not in owner:
            raise ValueError(f"unknown config key '{key}' (see --help for the list)")
        i, typ = owner[key]
        updates[i][key] = convert(key, value, typ, from_text)

    if config_path is not None:
        for key, value in read_config_file(config_path).items():
            apply(key, value, from_text=False)
    for key, value in flags:
        apply(key, value, from_text=True)
    return [dataclasses.replace(c, **u) for c, u in zip(configs, updates)], config_path
