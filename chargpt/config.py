"""Settings: the knobs of training and sampling, and how a command line sets them.

Defaults live in dataclasses, one field per knob with its meaning in the field's metadata
(see knob): TrainConfig (train.py, and bench.py and ladder.py, which run its recipes) and
SampleConfig (sample.py and serve.py) here, GPTConfig in model.py, each other command's own
beside it. A config file of plain Python assignments (`n_layer = 4`) overrides them, then
command-line flags (`--n_layer=4` or `--n_layer 4`) override the file. Nothing is exec'd:
the file is parsed with ast and each value must be a literal. Unknown keys (with the
closest known one suggested) and values of the wrong type are ValueErrors that name the key.
"""

import ast
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass

from model import knob  # one definition for every config's fields, GPTConfig's too


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
        raise FileNotFoundError(f"config file not found: {path}{did_you_mean_file(path)}")
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
        for name, (f, _) in _fields(config).items():
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
        for name, (_, typ) in _fields(config).items():
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
            raise ValueError(f"unknown config key '{key}'{did_you_mean(key, owner)} (see --help for the list)")
        i, typ = owner[key]
        updates[i][key] = convert(key, value, typ, from_text)

    if config_path is not None:
        for key, value in read_config_file(config_path).items():
            apply(key, value, from_text=False)
    for key, value in flags:
        apply(key, value, from_text=True)
    return [dataclasses.replace(c, **u) for c, u in zip(configs, updates)], config_path


def with_values(config, values):
    """config with the settable fields that values (a stored config's dict) names set from it;
    keys it does not know (a setting of an older or newer version) are left out."""
    known = _fields(config)
    return dataclasses.replace(config, **{k: v for k, v in values.items() if k in known})


def check_choice(key, value, allowed):
    """A ValueError naming the flag when value is not one of allowed."""
    if value not in allowed:
        names = [repr(a) for a in allowed]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"--{key} must be {listed}, got {value!r}")


def did_you_mean(key, known):
    """' (did you mean --max_iters?)' for the known key closest to a mistyped one, or ''."""
    spelled = key.replace("-", "_").lower()
    if spelled in known:
        return f" (did you mean --{spelled}?)"
    close = difflib.get_close_matches(spelled, known, n=1, cutoff=0.7)
    return f" (did you mean --{close[0]}?)" if close else ""


def did_you_mean_file(path):
    """' (did you mean config/shakespeare_char_cpu.py?)' for the .py file closest to a
    mistyped path, among those below its nearest folder that exists (two levels), or ''."""
    folder = os.path.dirname(os.path.normpath(path))
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    top, files = folder or ".", []
    for root, dirs, names in os.walk(top):
        inside = os.path.relpath(root, top)
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and inside.count(os.sep) < 1]
        files += [os.path.normpath(os.path.join(inside, n)) for n in names if n.endswith(".py")]
    # compared below the folder that exists: a long common prefix would make any file look close
    close = difflib.get_close_matches(os.path.relpath(path, top), files, n=1, cutoff=0.7)
    return f" (did you mean {os.path.join(folder, close[0])}?)" if close else ""


# -----------------------------------------------------------------------------
# the settings shared by several commands

DECODE_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8")  # chargpt/engine.py's DECODE_DTYPES


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = knob("out", "where checkpoints, config.json and samples.txt go")
    dataset: str = knob("shakespeare_char", "read data_dir/DATASET/{train.bin,val.bin,meta.json}")
    data_dir: str = knob("data", "folder holding the prepared datasets")
    init_from: str = knob(
        "scratch",
        "'scratch' for a new model, 'resume' to continue out_dir/ckpt.pt with the settings it was trained with (a config file and flags override them)",
    )
    overwrite: bool = knob(
        False,
        "let a new run (init_from=scratch) start in an out_dir that holds a trained model, deleting its checkpoints; without it that run is refused",
    )
    # evaluation and logging
    eval_interval: int = knob(
        250, "evaluate train and val loss, and save ckpt.pt, every this many steps (steps with a time budget too)"
    )
    eval_iters: int = knob(200, "batches per split in each loss estimate")
    log_interval: int = knob(
        10, "log loss, lr, ms/iter, tokens/s, elapsed and ETA (a line, and metrics.jsonl) every this many steps"
    )
    eval_sample_chars: int = knob(200, "characters of text generated and printed at each eval (0: none)")
    sample_chars: int = knob(500, "characters of text generated into out_dir/samples.txt at the end")
    health_interval: int = knob(
        100,
        "every this many steps, measure each layer's activations, gradients and update sizes into metrics.jsonl and health.png, with warnings (chargpt/health.py; 0: off)",
    )
    # data and optimisation
    batch_size: int = knob(64, "sequences per micro-step")
    gradient_accumulation_steps: int = knob(1, "micro-steps whose gradients add up to one optimizer step")
    max_iters: int = knob(5000, "total optimizer steps, a resumed run's included; with a time_budget, whichever comes first")
    time_budget: float = knob(
        0.0,
        "minutes of wall time for the whole run, evals and checkpoints included; it stops when they are spent or at "
        "max_iters, whichever comes first, and the lr schedule follows the nearer (0: no time limit)",
    )
    learning_rate: float = knob(1e-3, "peak learning rate of AdamW")
    min_lr: float = knob(1e-4, "learning rate at the end of the decay")
    warmup_iters: int = knob(100, "steps of linear warmup from 0 to learning_rate (steps with a time budget too)")
    lr_schedule: str = knob(
        "cosine",
        "after warmup: 'cosine' (half a cosine down to min_lr) or 'wsd' (learning_rate, then a straight line to min_lr over the last cooldown_frac of the run)",
    )
    cooldown_frac: float = knob(0.2, "with lr_schedule='wsd': the fraction of the run (after warmup) that decays to min_lr")
    lr_decay_iters: int = knob(0, "step where the decay reaches min_lr (0: max_iters)")
    weight_decay: float = knob(0.1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.99, "AdamW beta2")
    data_order: str = knob(
        "random",
        "'random': each window of a batch starts anywhere (the lecture's get_batch); 'epoch': every block_size window once per epoch, in a random order",
    )
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: no clipping)")
    optimizer: str = knob(
        "adamw", "'adamw', or 'muon': Muon for the Blocks' weight matrices, AdamW for the rest (chargpt/muon.py)"
    )
    muon_lr: float = knob(0.01, "peak learning rate of the Muon matrices (same warmup and decay as learning_rate)")
    # system
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, cuda:1, mps")
    dtype: str = knob(
        "auto",
        "'auto' (from the hardware: a GPU of compute capability 8.0+ bfloat16 autocast and TF32, 7.x float16 autocast with loss scaling; MPS float32; a CPU with bf16 units bfloat16 where a timing of this model says so), float32, bfloat16 or float16",
    )
    threads: int = knob(
        0,
        "CPU threads: 0 uses the cores other programs leave free, looked at again at each eval; N: exactly N. Another number of threads sums floats in another order, so for bit-identical runs (and resumes) fix it: --threads=N",
    )
    compile: bool = knob(False, "torch.compile the model: a slow first step; pays on GPUs, not on small CPUs (see README)")
    seed: int = knob(1337, "seed of the weights, the batches and dropout")

    def validate(self):
        """Raise ValueError naming the flag for a setting that cannot run."""
        positive = ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (automatic) or more, got {self.threads}")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_chars", "eval_sample_chars", "health_interval"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be 0 or more, got {getattr(self, key)}")
        for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "muon_lr", "time_budget"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{key} must be a finite number >= 0, got {value}")
        if self.learning_rate == 0:
            raise ValueError("--learning_rate must be greater than 0")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"--lr_schedule must be 'cosine' or 'wsd', got {self.lr_schedule!r}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise ValueError(f"--cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"--{key} must be in [0, 1), got {getattr(self, key)}")
        if self.init_from not in ("scratch", "resume"):
            raise ValueError(f"--init_from must be 'scratch' or 'resume', got {self.init_from!r}")
        if self.overwrite and self.init_from == "resume":
            raise ValueError("--overwrite=True is for a new run (--init_from=scratch); a resumed run goes on in its out_dir")
        if self.data_order not in ("random", "epoch"):
            raise ValueError(f"--data_order must be 'random' or 'epoch', got {self.data_order!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class SampleConfig:
    out_dir: str = knob("out", "folder with best.pt or ckpt.pt")
    start: str = knob("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = knob(1, "samples to generate, in one batch")
    max_new_tokens: int = knob(500, "characters to generate per sample")
    temperature: float = knob(0.8, "1.0 samples the model's distribution, lower is more conservative, 0 is greedy")
    top_k: int = knob(200, "sample among the k most likely characters only (0: all)")
    top_p: float = knob(1.0, "sample among the most likely characters whose probability adds up to top_p (1.0: all)")
    seed: int = knob(1337, "seed of the draw: the same seed gives the same text")
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, mps")
    kv_cache: bool = knob(True, "reuse the keys and values of earlier positions (False: rerun the whole context per character)")
    decode_dtype: str = knob(
        "auto",
        "weights of the one-character decode steps with the cache: 'auto' (the fastest for this model, num_samples and max_new_tokens here: a few steps of each timed once, then cached in ~/.cache/chargpt), float32, float16, bfloat16 or int8",
    )
    attention: str = knob(
        "", "draw the attention weights of every layer and head for the prompt into this PNG file (needs matplotlib)"
    )
    threads: int = knob(0, "CPU threads: 0 uses the cores other programs leave free; N: exactly N")
    lens: str = knob(
        "",
        "print the logit lens for this text (or FILE:path) and exit: the likeliest next characters, read after the embeddings and after each Block",
    )
    lens_at: int = knob(
        -1, "with --lens: the position in its text to look at (-1: the last, predicting the character after the text)"
    )

    def validate(self):
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (automatic) or more, got {self.threads}")
        if self.num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise ValueError(f"--max_new_tokens must be 0 or more, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be 0 or more, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be 0 or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        check_choice("decode_dtype", self.decode_dtype, ("auto", *DECODE_DTYPE_NAMES))
        if self.attention:
            folder = os.path.dirname(os.path.abspath(self.attention))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--attention={self.attention}: the folder {folder} does not exist")
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--attention needs matplotlib, which is not installed (pip install matplotlib)") from None

    def prompt(self):
        """The prompt text: --start itself, or the contents of the file named by FILE:path."""
        return text_of("start", self.start)

    def lens_text(self):
        """--lens's text, read as --start is."""
        return text_of("lens", self.lens)


def text_of(flag, value):
    """A text flag's text: the value itself, or the contents of the file named by FILE:path."""
    if value.startswith("FILE:"):
        path = value[len("FILE:") :]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag}=FILE:{path}: no such file")
        with open(path, encoding="utf-8") as f:
            value = f.read()
    if not value:
        raise ValueError(f"--{flag} is empty: the model needs at least one character to continue")
    return value
