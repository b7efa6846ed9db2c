"""chargpt/health.py: each figure against an answer known in advance, each warning on a case
made for it (and quiet on the CPU recipe), and a run with health steps trains exactly as one
without."""

import copy
import json
import math
import random
from contextlib import nullcontext

import pytest
import torch

import train
from chargpt.checkpoint import load_checkpoint
from chargpt.config import TrainConfig
from chargpt.health import Health, draw_health
from chargpt.metrics import read_records
from chargpt.optim import train_step
from conftest import ROOT, tiny_configs
from model import GPT, BigramLanguageModel, GPTConfig, build_model
from prepare import prepare


class FixedBatch:
    """The same batch at every step."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def next(self, device):
        return self.x, self.y


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=20, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0) | overrides
    return GPT(GPTConfig(**settings))


def batch(vocab_size=20, B=8, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (B, T), generator=g), torch.randint(vocab_size, (B, T), generator=g)


def health_step(model, optimizer=None, xy=None, lines=None):
    """One health step of plain SGD (no clipping) on one batch: (record, warning lines)."""
    lines = [] if lines is None else lines
    health = Health(model, 1, log=lines.append, optimizer=optimizer)
    watch = health.watch(0)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    batches = FixedBatch(*(xy or batch(model.config.vocab_size)))
    train_step(watch.model, optimizer, batches, TrainConfig(grad_clip=0.0), nullcontext(), "cpu", watch=watch)
    return health.record(watch), lines


def by_name(record):
    return {layer["name"]: layer for layer in record["layers"]}


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_a_relu_layer_whose_bias_is_far_below_zero_reads_all_dead(activation):
    model = tiny_gpt(activation=activation)
    with torch.no_grad():
        model.blocks[0].ffwd.net[0].bias.fill_(-100.0)  # every unit negative at every position
    record, lines = health_step(model)
    layers = by_name(record)
    assert layers["block 0"]["dead"] == 1.0
    assert layers["block 1"]["dead"] < 0.5  # the untouched layer: N(0, 0.02) weights, zero bias
    assert layers["embedding"]["dead"] is None and layers["lm_head"]["dead"] is None  # no ReLU there
    assert len(lines) == 1 and lines[0].startswith("warning: 100% of the FeedForward units of block 0 are dead at step 0")


def test_the_update_to_data_ratio_of_plain_sgd_is_lr_times_gradient_over_weight():
    lr = 0.05
    model = tiny_gpt(init="pytorch")  # every matrix nonzero, every gradient too
    xy = batch()
    by_hand = copy.deepcopy(model)
    _, loss = by_hand(*xy)
    loss.backward()
    expected = {n: math.log10(lr * p.grad.std().item() / p.std().item()) for n, p in by_hand.named_parameters() if p.dim() == 2}
    grads = {n: (p.grad.std().item(), p.grad.norm().item()) for n, p in by_hand.named_parameters() if p.dim() == 2}

    record, _ = health_step(model, torch.optim.SGD(model.parameters(), lr=lr), xy)
    assert [m["name"] for m in record["matrices"]] == list(expected)
    for m in record["matrices"]:
        assert m["update"] == pytest.approx(expected[m["name"]], abs=2e-3), m["name"]
        assert m["grad_std"] == pytest.approx(grads[m["name"]][0], rel=1e-3)
        assert m["grad_norm"] == pytest.approx(grads[m["name"]][1], rel=1e-3)
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert record["iter"] == 1  # the step from the weights of iteration 0, counted as a "train" record counts it


def test_muons_ratio_is_its_fixed_step_size_over_the_weights_and_health_png_draws_its_line(tmp_path, monkeypatch):
    """Muon's step is lr/sqrt(fan_in) an entry whatever the gradient, so its update-to-data
    ratio is log10(lr / (sqrt(fan_in) * std(weight))) (a little below: Newton-Schulz leaves
    the singular values under 1); the record says which matrices took Muon and at what lr,
    and health.png draws log10(lr) for them beside AdamW's -3."""
    from chargpt.optim import make_optimizer

    model = tiny_gpt(init="pytorch")  # lm_head not zero: every matrix gets a gradient at the first step
    settings = TrainConfig(optimizer="muon", muon_lr=0.02, learning_rate=3e-3, weight_decay=0.0)
    optimizer = make_optimizer(model, settings, "cpu")
    record, _ = health_step(model, optimizer)
    shapes = dict((name, p.shape) for name, p in model.named_parameters())
    muon = [m for m in record["matrices"] if m["muon"]]
    assert {m["name"] for m in muon} == {n for n in shapes if n.startswith("blocks.") and len(shapes[n]) == 2}
    assert all(m["lr"] == 3e-3 for m in record["matrices"] if not m["muon"])
    for m in muon:
        expected = math.log10(m["lr"] / (math.sqrt(shapes[m["name"]][1]) * m["data_std"]))
        assert m["lr"] == 0.02 and expected - 0.15 < m["update"] < expected + 0.01, (m, expected)
    drawn = []
    from chargpt import health as health_module

    original = health_module.draw_ratios
    monkeypatch.setattr(
        health_module, "draw_ratios", lambda ax, health, colours: drawn.append(original(ax, health, colours) or ax)
    )
    assert draw_health([record, {**record, "iter": 2}], str(tmp_path / "h.png"))
    labels = [line.get_label() for line in drawn[0].get_lines()]
    assert "AdamW: -3, the makemore rule of thumb" in labels and any(label.startswith("Muon: log10(lr)") for label in labels)
    assert "block 0 (Muon)" in labels and "embedding (AdamW)" in labels


def test_attention_with_zero_queries_and_keys_is_uniform():
    """q = k = 0: every row is uniform over the positions it may read, so each head's entropy
    is the mean of ln(t + 1) over rows t = 1..T-1, and no row is one-hot."""
    model = tiny_gpt()
    with torch.no_grad():
        for block in model.blocks:
            block.sa.qkv.weight[: 2 * 32].zero_()
    record, _ = health_step(model)
    uniform = sum(math.log(t + 1) for t in range(1, 16)) / 15
    assert record["entropy_uniform"] == pytest.approx(uniform, rel=1e-3)
    assert len(record["entropy"]) == 2 and all(len(heads) == 2 for heads in record["entropy"])
    for heads in record["entropy"]:
        assert heads == pytest.approx([uniform, uniform], rel=1e-3)
    assert by_name(record)["block 0"]["one_hot"] == 0.0


def test_a_health_step_measures_every_layer_and_leaves_no_hook_behind():
    model = tiny_gpt(init="pytorch")
    record, lines = health_step(model)
    assert [layer["name"] for layer in record["layers"]] == ["embedding", "block 0", "block 1", "lm_head"]
    x, _ = batch()
    with torch.no_grad():
        embedding = model.token_embedding_table(x) + model.position_embedding_table.weight[:16]
    layer = by_name(record)["embedding"]
    assert layer["mean"] == pytest.approx(embedding.mean().item(), rel=1e-3, abs=1e-4)
    assert layer["std"] == pytest.approx(embedding.std().item(), rel=1e-3)
    lo, hi, counts = layer["hist"]
    assert lo == pytest.approx(layer["mean"] - 4 * layer["std"], rel=1e-3, abs=1e-3) and len(counts) == 40
    assert sum(counts) > 0.99 * embedding.numel()  # all but the tails beyond 4 std
    assert all(layer["grad_std"] > 0 for layer in record["layers"]) and record["grad_norm"] > 0
    assert lines == []  # a healthy small model
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    json.dumps(record, allow_nan=False)  # plain JSON: numbers, lists, None


def test_a_negative_interval_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--health_interval must be 0 or more, got -1"):
        TrainConfig(health_interval=-1).validate()


def test_off_means_no_watch():
    health = Health(tiny_gpt(), 0)
    assert all(health.watch(i) is None for i in range(5))
    health = Health(tiny_gpt(), 10)
    assert [i for i in range(25) if health.watch(i) is not None] == [0, 10, 20]


# -----------------------------------------------------------------------------
# the warnings


def test_vanishing_gradient_warns_in_a_deep_stack_without_residual_connections():
    plain = dict(n_layer=8, residual=False, proj=False, layer_norm=False, ffwd_mult=1, init="pytorch")
    record, lines = health_step(tiny_gpt(**plain))
    blocks = [layer["grad_std"] for layer in record["layers"] if layer["name"].startswith("block")]
    assert blocks[0] < 1e-3 * blocks[-1]  # each layer on the way down multiplies it by its Jacobian
    assert any(line.startswith("warning: vanishing gradient at step 0: the gradient reaching block 0") for line in lines)
    # the same depth with residual connections: the gradient reaches every Block
    record, lines = health_step(tiny_gpt(n_layer=8, layer_norm=False, init="pytorch"))
    blocks = [layer["grad_std"] for layer in record["layers"] if layer["name"].startswith("block")]
    assert min(blocks) > 0.5 * blocks[-1] and lines == []


def test_a_non_finite_loss_warns_naming_the_first_layer_that_is_not_finite():
    model = tiny_gpt()
    with torch.no_grad():
        model.blocks[1].ffwd.net[0].weight[0, 0] = float("nan")
    record, lines = health_step(model)
    assert record["loss"] is None and by_name(record)["block 0"]["std"] is not None
    assert len(lines) == 1
    assert lines[0].startswith("warning: the loss is not finite at step 0; the first layer whose output is not finite is block 1")


def test_a_nan_weight_stops_the_run_with_a_warning_that_names_it(data_dir, tmp_path, monkeypatch):
    def broken(config):
        model = build_model(config)
        with torch.no_grad():
            model.blocks[1].sa.qkv.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(train, "build_model", broken)
    lines = []
    with pytest.raises(FloatingPointError, match="the loss is not finite at step 0"):
        train.train(*tiny_configs(data_dir, tmp_path / "out", max_iters=5), log=lines.append)
    assert warnings(lines) == [
        "warning: the loss is not finite at step 0: the first weights that are not finite are blocks.1.sa.qkv.weight "
        "(1 of the model's 28 tensors). At step 0 no update has happened yet: the model was built so"
    ]


def test_a_learning_rate_far_too_high_warns_at_the_health_step_that_meets_the_nan(data_dir, tmp_path):
    lines = []
    overrides = dict(learning_rate=1e30, min_lr=1e30, warmup_iters=0, grad_clip=0.0, log_interval=1, health_interval=1)
    with pytest.raises(FloatingPointError, match="the loss is not finite at step 2"):
        train.train(*tiny_configs(data_dir, tmp_path / "out", **overrides), log=lines.append)
    found = warnings(lines)
    assert len(found) == 1 and found[0].startswith(
        "warning: the loss is not finite at step 1; the first layer whose output is not finite is block 0"
    )
    assert "try a lower --learning_rate" in found[0]


def test_warnings_come_once_each():
    model = tiny_gpt()
    with torch.no_grad():
        model.blocks[0].ffwd.net[0].bias.fill_(-100.0)
    lines = []
    health = Health(model, 1, log=lines.append)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for i in range(3):
        watch = health.watch(i)
        train_step(model, optimizer, FixedBatch(*batch()), TrainConfig(grad_clip=0.0), nullcontext(), "cpu", watch=watch)
        health.record(watch)
    assert len(lines) == 1


def run(data_dir, out_dir, **overrides):
    lines = []
    train.train(*tiny_configs(data_dir, out_dir, **overrides), log=lines.append)
    return lines


def warnings(lines):
    return [line for line in lines if line.startswith("warning:")]


def test_an_inflated_init_warns_at_step_0(data_dir, tmp_path, monkeypatch):
    def inflated(config):  # lm_head N(0, 2) instead of zero: large logits, confident wrong guesses
        model = build_model(config)
        torch.nn.init.normal_(model.lm_head.weight, std=2.0)
        return model

    monkeypatch.setattr(train, "build_model", inflated)
    lines = run(data_dir, tmp_path / "out", max_iters=5, sample_chars=0, eval_sample_chars=0)
    found = warnings(lines)
    assert len(found) == 1 and found[0].startswith("warning: the loss at step 0 is "), lines
    assert "far above ln(38) = 3.64" in found[0] and "--init=normal" in found[0]
    records = read_records(str(tmp_path / "out" / "metrics.jsonl"))
    assert [(r["kind"], r["iter"]) for r in records if r["type"] == "warning"] == [("init", 0)]


def test_a_tiny_text_trained_to_overfitting_warns_and_points_at_best_pt(tmp_path):
    rng = random.Random(0)
    prepare("".join(rng.choice("abcdefgh") for _ in range(300)), str(tmp_path / "data" / "small"))
    lines = run(
        str(tmp_path / "data"),
        tmp_path / "out",
        dataset="small",
        n_embd=64,
        learning_rate=3e-3,
        min_lr=3e-3,
        max_iters=75,
        eval_interval=25,
        sample_chars=0,
        eval_sample_chars=0,
    )
    found = warnings(lines)
    assert len(found) == 1 and found[0].startswith("warning: overfitting: the val loss has risen from"), lines
    assert "best.pt keeps the model of step 0" in found[0] and "--dropout" in found[0] and "more text" in found[0]


def test_the_cpu_recipe_trains_without_a_warning(data_dir, tmp_path):
    """config/shakespeare_char_cpu.py's model and optimizer (a step run on the tiny text, with a
    health step every 10 steps): nothing to warn about."""
    from chargpt.config import read_config_file

    recipe = read_config_file(f"{ROOT}/config/shakespeare_char_cpu.py")
    train_config, model_config = TrainConfig(), GPTConfig()
    for key, value in recipe.items():
        setattr(model_config if hasattr(model_config, key) else train_config, key, value)
    for key, value in dict(
        out_dir=str(tmp_path / "out"),
        data_dir=data_dir,
        dataset="tiny",
        device="cpu",
        time_budget=0.0,
        max_iters=100,
        eval_interval=50,
        health_interval=10,
        sample_chars=0,
        eval_sample_chars=0,
    ).items():
        setattr(train_config, key, value)
    lines = []
    train.train(train_config, model_config, log=lines.append)
    assert warnings(lines) == [], lines
    records = read_records(str(tmp_path / "out" / "metrics.jsonl"))
    assert [r["iter"] for r in records if r["type"] == "health"] == list(range(1, 100, 10))


# -----------------------------------------------------------------------------
# the run


def test_health_steps_change_nothing_and_off_writes_nothing(data_dir, tmp_path):
    """The hooks only read: a run with a health step at every step ends with the same weights,
    bit for bit, as a run with health off (which is the run without this module: no hook is
    ever registered)."""
    off, on = tmp_path / "off", tmp_path / "on"
    run(data_dir, off, health_interval=0)
    run(data_dir, on, health_interval=1, dropout=0.0)
    a, b = load_checkpoint(str(off / "ckpt.pt")), load_checkpoint(str(on / "ckpt.pt"))
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert not any(r["type"] in ("health", "warning") for r in read_records(str(off / "metrics.jsonl")))
    assert not (off / "health.png").exists()
    health = [r for r in read_records(str(on / "metrics.jsonl")) if r["type"] == "health"]
    assert [r["iter"] for r in health] == list(range(1, 41))
    assert (on / "health.png").stat().st_size > 10_000


def test_health_with_dropout_is_the_same_run_too(data_dir, tmp_path):
    """Dropout draws from the global random stream: the health step must not draw from it."""
    off, on = tmp_path / "off", tmp_path / "on"
    run(data_dir, off, health_interval=0, dropout=0.2, max_iters=10, sample_chars=0)
    run(data_dir, on, health_interval=3, dropout=0.2, max_iters=10, sample_chars=0)
    a, b = load_checkpoint(str(off / "ckpt.pt")), load_checkpoint(str(on / "ckpt.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_health_png_of_a_bigram_model(tmp_path):
    torch.manual_seed(0)
    model = BigramLanguageModel(GPTConfig(model_type="bigram", vocab_size=20, block_size=16))
    record, lines = health_step(model)
    assert [layer["name"] for layer in record["layers"]] == ["logits"] and record["entropy"] == []
    path = tmp_path / "health.png"
    assert draw_health([record], str(path), "bigram") and path.stat().st_size > 10_000
    assert not draw_health([], str(tmp_path / "none.png"))


def test_a_compiled_model_in_several_processes_measures_its_weights_alone(tmp_path, recwarn, capsys):
    """torch.compile does not call hooks added after compiling: with DDP around the compiled
    module the health step cannot run the plain one, and measures the weight matrices only."""
    model = tiny_gpt(init="pytorch")
    health = Health(model, 1, step_model=model, compiled=True, distributed=True)
    watch = health.watch(0)
    train_step(
        watch.model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        FixedBatch(*batch()),
        TrainConfig(),
        nullcontext(),
        "cpu",
        watch=watch,
    )
    record = health.record(watch)
    assert record["layers"] == [] and record["entropy"] == [] and record["loss"] is None
    assert len(record["matrices"]) == 11 and all(m["update"] is not None for m in record["matrices"])
    assert capsys.readouterr().out == ""  # no warning: an unmeasured loss is not a loss that is not finite
    assert draw_health([record], str(tmp_path / "health.png"), "compiled") and not recwarn.list
    # one process: the health step runs the plain module, measured in full
    health = Health(model, 1, step_model=torch.nn.Identity(), compiled=True)
    assert health.watch(0).model is model
