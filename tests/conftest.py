"""Shared fixtures: a synthetic text, a prepared tiny dataset, tiny configs. No network."""

import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One thread, in this process (set before torch is imported) and in the scripts the tests
# start: the tiny models gain nothing from two, and on a busy machine two threads wait for
# each other at every operation (a 30-step run took 35 s instead of 2 under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from chargpt.config import TrainConfig  # noqa: E402
from model import GPTConfig  # noqa: E402
from prepare import prepare  # noqa: E402


def make_text(n_lines=600, seed=0):
    """Pseudo-Shakespeare with enough structure for a tiny model to learn in seconds."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "KING", "QUEEN"]
    words = "the king and queen of rome shall speak to thee my lord good night sweet prince".split()
    lines = []
    for _ in range(n_lines):
        lines.append(f"{rng.choice(names)}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n")
    return "\n".join(lines)


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """sample.py's decode-dtype cache (chargpt/engine.py) goes to a temporary folder, not ~/.cache;
    the scripts run as subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def text():
    return make_text()


@pytest.fixture
def data_dir(tmp_path, text):
    """A prepared dataset 'tiny' under tmp_path/data."""
    prepare(text, str(tmp_path / "data" / "tiny"))
    return str(tmp_path / "data")


# a 2-layer, 32-wide model on the tiny dataset, that trains in seconds on the CPU
TINY_TRAIN = dict(
    dataset="tiny",
    device="cpu",
    dtype="float32",
    batch_size=8,
    max_iters=40,
    eval_interval=20,
    eval_iters=5,
    log_interval=10,
    learning_rate=3e-3,
    min_lr=3e-4,
    warmup_iters=5,
    sample_chars=50,
)
TINY_MODEL = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def tiny_configs(data_dir, out_dir, **overrides):
    """(TrainConfig, GPTConfig) of the tiny run, with overrides of either."""
    train_config = TrainConfig(out_dir=str(out_dir), data_dir=data_dir, **TINY_TRAIN)
    model_config = GPTConfig(**TINY_MODEL)
    for key, value in overrides.items():
        target = model_config if hasattr(model_config, key) else train_config
        setattr(target, key, value)
    return train_config, model_config


def tiny_flags(data_dir, out_dir, **overrides):
    """The tiny run as train.py's command-line flags, with overrides."""
    settings = {"data_dir": data_dir, "out_dir": out_dir, **TINY_TRAIN, **TINY_MODEL, **overrides}
    return [f"--{key}={value}" for key, value in settings.items()]


def train_tiny(data_dir, out_dir, **overrides):
    """Train the tiny run quietly (no samples printed or written): train.train's summary."""
    import train  # imported here: a test module that never trains does not load it

    quiet = dict(sample_chars=0, eval_sample_chars=0)
    return train.train(*tiny_configs(data_dir, out_dir, **{**quiet, **overrides}), log=lambda m: None)
