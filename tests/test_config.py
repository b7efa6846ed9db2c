"""chargpt/config.py: defaults < config file < flags, and errors that name the key."""

import dataclasses

import pytest

from chargpt.config import HelpRequested, TrainConfig, parse, read_config_file
from model import GPTConfig

USAGE = "train.py [CONFIG_FILE] [--key=value ...]"


def run(argv):
    (train, model), path = parse(argv, [TrainConfig(), GPTConfig()], USAGE)
    return train, model


def test_defaults_then_file_then_flags(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text('"""a recipe"""\nn_layer = 3\nbatch_size = 7\nlearning_rate = 1e-2\nout_dir = "o"\n')
    train, model = run([str(cfg), "--batch_size=9", "--dropout", "0.1"])
    assert (model.n_layer, train.batch_size, train.learning_rate, train.out_dir, model.dropout) == (3, 9, 1e-2, "o", 0.1)
    assert train.max_iters == TrainConfig().max_iters  # untouched keys keep their defaults
    # flags win over the file wherever they appear on the line
    train, _ = run(["--batch_size=9", str(cfg)])
    assert train.batch_size == 9


def test_value_split_on_first_equals_only():
    train, _ = run(["--out_dir=runs/a=b"])
    assert train.out_dir == "runs/a=b"


def test_int_is_fine_where_a_float_is_expected(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("learning_rate = 1\n")
    train, _ = run([str(cfg), "--min_lr=0"])
    assert train.learning_rate == 1.0 and isinstance(train.learning_rate, float) and train.min_lr == 0.0


@pytest.mark.parametrize("text, expected", [("True", True), ("false", False), ("1", True), ("0", False)])
def test_bool_flags(text, expected):
    train, _ = run([f"--compile={text}"])
    assert train.compile is expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n_layr=3"], "unknown config key 'n_layr'"),
        (["--n_layer=three"], "--n_layer expects an integer"),
        (["--n_layer=2.5"], "--n_layer expects an integer"),
        (["--learning_rate=fast"], "--learning_rate expects a number"),
        (["--compile=maybe"], "--compile expects True or False"),
        (["--vocab_size=10"], "unknown config key 'vocab_size'"),  # taken from the data, not a flag
        (["--batch_size"], "--batch_size needs a value"),
        (["a.py", "b.py"], "unexpected argument 'b.py'"),
    ],
)
def test_flag_errors_name_the_key(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.py").write_text("")
    with pytest.raises(ValueError, match=message):
        run(argv)


@pytest.mark.parametrize(
    "source, message",
    [
        ("n_layr = 3\n", "unknown config key 'n_layr'"),
        ("n_layer = '3'\n", "--n_layer expects an integer"),
        ("batch_size = 64 * 2\n", "must be a literal"),
        ("import os\n", "only plain assignments"),
        ("n_layer = = 3\n", "not valid Python"),
    ],
)
def test_config_file_errors_name_the_key_or_line(tmp_path, source, message):
    cfg = tmp_path / "c.py"
    cfg.write_text(source)
    with pytest.raises(ValueError, match=message):
        run([str(cfg)])


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        run([str(tmp_path / "nope.py")])


def test_config_file_is_not_executed(tmp_path):
    cfg = tmp_path / "c.py"
    marker = tmp_path / "ran"
    cfg.write_text(f"open({str(marker)!r}, 'w')\n")
    with pytest.raises(ValueError):
        read_config_file(str(cfg))
    assert not marker.exists()


def test_help_lists_every_key_with_default_and_meaning():
    with pytest.raises(HelpRequested) as info:
        run(["--help"])
    text = str(info.value)
    for config in (TrainConfig(), GPTConfig()):
        for f in dataclasses.fields(config):
            if f.metadata.get("derived"):
                continue
            line = next(l for l in text.splitlines() if l.strip().startswith(f"--{f.name}="))
            assert repr(getattr(config, f.name)) in line and f.metadata["help"] in line


def test_shipped_recipes_parse():
    import glob
    import os

    from conftest import ROOT

    for path in glob.glob(os.path.join(ROOT, "config", "*.py")):
        train, model = run([path])
        train.validate()
        model.validate()


def test_a_mistyped_config_path_gets_the_close_one(tmp_path):
    (tmp_path / "config" / "lecture").mkdir(parents=True)
    for name in ("shakespeare_char_cpu.py", "shakespeare_char.py", "lecture/3_multi_head.py"):
        (tmp_path / "config" / name).write_text("n_layer = 1\n")
    for typed, meant in (
        ("config/shakespeare_char_cp.py", "config/shakespeare_char_cpu.py"),
        ("config/lecture/3_multihead.py", "config/lecture/3_multi_head.py"),
        ("confg/shakespeare_char_cpu.py", "config/shakespeare_char_cpu.py"),  # the folder mistyped
    ):
        with pytest.raises(FileNotFoundError, match=f"config file not found: .*{typed} \\(did you mean .*{meant}\\?\\)$"):
            run([str(tmp_path / typed)])
    with pytest.raises(FileNotFoundError, match=r"config file not found: \S+/config/nothing_like_it\.py$"):
        run([str(tmp_path / "config" / "nothing_like_it.py")])
