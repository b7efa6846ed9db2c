"""The lecture's stages: every config builds the model its docstring describes, and ladder.py
trains stages, scores them and writes its table and plot; every stage's checkpoint samples,
evaluates and draws attention."""

import glob
import os

import pytest

import eval as eval_script
import ladder
import sample
from chargpt.config import TrainConfig, parse
from conftest import ROOT
from model import GPTConfig, build_model

STAGE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "lecture", "*.py")))


def test_there_is_one_config_per_stage_in_the_lectures_order():
    names = [os.path.basename(p) for p in STAGE_CONFIGS]
    assert names == [
        "1_bigram.py",
        "2_self_attention.py",
        "3_multi_head.py",
        "4_feed_forward.py",
        "5_blocks.py",
        "6_residual.py",
        "7_layer_norm.py",
        "8_dropout_scaled.py",
    ]
    assert sorted(ladder.find_stages()) == list(range(1, 9))
    assert ladder.find_stages()[3][1] == "multi-head attention"


# what each stage's model is: (layers, heads, n_embd, ffwd_mult, residual, proj, layer_norm, parameters)
STAGES = {
    "2_self_attention.py": (1, 1, 32, 0, False, False, False, 7_553),
    "3_multi_head.py": (1, 4, 32, 0, False, False, False, 7_553),
    "4_feed_forward.py": (1, 4, 32, 1, False, False, False, 8_609),
    "5_blocks.py": (3, 4, 32, 1, False, False, False, 16_865),
    "6_residual.py": (3, 4, 32, 4, True, True, False, 41_921),
    "7_layer_norm.py": (3, 4, 32, 4, True, True, True, 42_369),
    "8_dropout_scaled.py": (6, 6, 384, 4, True, True, True, 10_788_929),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_config_builds_the_lectures_model(name):
    (config, model_config), _ = parse([os.path.join(ROOT, "config", "lecture", name)], [TrainConfig(), GPTConfig()], "")
    c = model_config
    assert (c.n_layer, c.n_head, c.n_embd, c.ffwd_mult, c.residual, c.proj, c.layer_norm) == STAGES[name][:7]
    assert build_model(c).num_params() == STAGES[name][7]
    small = name != "8_dropout_scaled.py"
    assert (c.block_size, config.batch_size, config.learning_rate, config.max_iters) == (
        (8, 32, 1e-3, 5000) if small else (256, 64, 3e-4, 5000)
    )
    assert config.min_lr == config.learning_rate and config.warmup_iters == 0  # the lecture's constant rate
    assert c.init == ("pytorch" if small else "normal")


def test_the_bigram_stage():
    (config, c), _ = parse([STAGE_CONFIGS[0]], [TrainConfig(), GPTConfig()], "")
    assert (c.model_type, c.block_size, config.learning_rate, config.max_iters) == ("bigram", 8, 1e-2, 3000)


def test_parse_stages():
    available = ladder.find_stages()
    assert ladder.parse_stages("1-7", available) == [1, 2, 3, 4, 5, 6, 7]
    assert ladder.parse_stages("3,1, 5-6", available) == [1, 3, 5, 6]
    with pytest.raises(ValueError, match="--stages: there is no stage 9"):
        ladder.parse_stages("2,9", available)
    with pytest.raises(ValueError, match="--stages: 'x' is not a stage number"):
        ladder.parse_stages("x", available)


QUICK = [
    "--max_iters=30",
    "--eval_interval=15",
    "--eval_iters=2",
    "--sample_chars=0",
    "--eval_sample_chars=0",
    "--log_interval=5",
    "--device=cpu",
]


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory, text):
    """Stages 1, 3 and 7 of the ladder on the tiny text, 30 steps each, two seeds."""
    from prepare import prepare

    root = tmp_path_factory.mktemp("ladder")
    prepare(text, str(root / "data" / "tiny"))
    out = root / "out"
    argv = ["--stages", "1,3,7", "--seeds", "2", f"--out_dir={out}", f"--data_dir={root / 'data'}", "--dataset=tiny", *QUICK]
    return out, ladder.main(argv)


def test_ladder_trains_scores_and_writes_the_table_and_plot(ladder_run, capsys):
    out, code = ladder_run
    assert code == 0
    table = (out / "ladder.md").read_text(encoding="utf-8").splitlines()
    assert table[0].startswith("| stage | what it adds | parameters")
    rows = [line.split(" | ") for line in table[2:]]
    assert [r[0] for r in rows] == ["| 1", "| 3", "| 7"]
    assert rows[0][4] == "2.50" and rows[1][4] == "2.28" and rows[2][4] == "2.06"
    for r in rows:
        mean, spread = r[5].split(" ")  # the mean over 2 seeds, then (min-max)
        low, high = (float(v) for v in spread.strip("()").split("-"))
        assert low <= float(mean) <= high and 0.5 < float(mean) < 5
        assert float(r[6]) == pytest.approx(float(mean) - float(r[4]), abs=2e-3)
    assert (out / "ladder.png").stat().st_size > 1000
    # the gradient that reaches the first Block over the last's: stage 7 has three Blocks
    assert table[0].endswith("| gradient: first Block / last Block (step 0; median of the run) |")
    assert rows[0][-1] == "- |" and rows[1][-1] == "- |"  # one Block or none: nothing to compare
    at_start, median = (float(v) for v in rows[2][-1].rstrip(" |").split("; "))
    assert 0.1 < at_start < 10 and 0.1 < median < 10  # pre-norm residual Blocks: about as much
    assert (out / "ladder-health.png").stat().st_size > 1000
    for name in ("1_bigram", "1_bigram-seed1338", "3_multi_head", "7_layer_norm-seed1338"):
        assert (out / name / "best.pt").exists(), name


def test_every_stage_checkpoint_samples_evaluates_and_draws_attention(ladder_run, tmp_path, capsys):
    out, _ = ladder_run
    for name in ("1_bigram", "3_multi_head", "7_layer_norm"):
        assert sample.main([f"--out_dir={out / name}", "--max_new_tokens=20", "--device=cpu", "--start=KING"]) == 0
        assert eval_script.main([f"--out_dir={out / name}", "--device=cpu"]) == 0
        assert "val loss" in capsys.readouterr().out
    for name in ("3_multi_head", "7_layer_norm"):
        png = tmp_path / f"{name}.png"
        assert (
            sample.main([f"--out_dir={out / name}", "--max_new_tokens=0", "--device=cpu", "--start=KING:", f"--attention={png}"])
            == 0
        )
        assert png.stat().st_size > 1000


def test_a_stage_that_fails_is_one_line_naming_it(tmp_path, capsys, data_dir):
    code = ladder.main(
        [
            "--stages",
            "2",
            "--seeds",
            "1",
            f"--out_dir={tmp_path / 'o'}",
            f"--data_dir={data_dir}",
            "--dataset=tiny",
            "--block_size=100000",
            *QUICK,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "stage 2 (seed 1337) failed" in err and "--block_size=100000 is longer than" in err


def test_bad_ladder_flags_are_one_line(tmp_path, capsys):
    for argv, message in ((["--seeds", "0"], "--seeds must be at least 1"), (["--nope=1"], "unknown config key 'nope'")):
        assert ladder.main([*argv, f"--out_dir={tmp_path / 'o'}"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
