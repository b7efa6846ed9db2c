"""The CUDA path, run for real on a GPU: a training run in each dtype the GPU has, compile
on and off, the KV-cache decode against the uncached path, and DDP with NCCL on one
process. Marked `gpu` and skipped without CUDA; `python bench.py gpu` runs them
(`python -m pytest -m gpu`).

CHARGPT_GPU_TESTS_DEVICE=cpu runs them on the CPU instead (gloo in place of NCCL), so that
the tests themselves are checked where there is no GPU; what only a GPU can say (the
compute capability's dtype) is skipped there."""

import os
import subprocess
import sys

import pytest
import torch

import train
from chargpt import machine
from chargpt.checkpoint import load_checkpoint, model_from_checkpoint
from chargpt.engine import Decoder, KVCache, generate, prefill
from conftest import ROOT, tiny_configs, tiny_flags
from model import GPT, GPTConfig

DEVICE = os.environ.get("CHARGPT_GPU_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (python bench.py gpu)"),
]


@pytest.fixture(autouse=True)
def ieee_float32():
    """A run on a GPU with bfloat16 turns TF32 on for the whole process: each test starts in IEEE float32."""
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision("highest")


def has(dtype):
    """Whether this device trains in dtype: float16 on any GPU, bfloat16 from compute capability 8.0."""
    return DEVICE == "cpu" or dtype != "bfloat16" or machine.gpu_has_bf16(DEVICE)


def run(data_dir, out_dir, **overrides):
    lines = []
    summary = train.train(*tiny_configs(data_dir, out_dir, device=DEVICE, **overrides), log=lines.append)
    return summary, lines


def val_losses(lines):
    return [float(line.rsplit("val loss ", 1)[1]) for line in lines if line.startswith("step ") and "val loss" in line]


@pytest.mark.skipif(DEVICE != "cuda", reason="the compute capability is a GPU's")
def test_auto_takes_the_dtype_of_this_gpus_compute_capability():
    lines = []
    dtype = machine.resolve_dtype("auto", DEVICE, log=lines.append)
    assert dtype == machine.cuda_dtype(machine.gpu(DEVICE)[1])[0]
    assert lines == [f"dtype auto: {machine.describe_gpu(DEVICE)}: {machine.cuda_dtype(machine.gpu(DEVICE)[1])[1]}"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_run_learns_in_each_dtype_and_its_checkpoint_samples(data_dir, tmp_path, dtype):
    if not has(dtype):
        pytest.skip(f"{machine.describe_gpu(DEVICE)} has no {dtype}")
    out = tmp_path / "o"
    summary, lines = run(data_dir, out, dtype=dtype, sample_chars=20)
    assert any(line.startswith(f"device {DEVICE}, {dtype};") for line in lines), lines
    losses = val_losses(lines)
    assert losses[-1] < losses[0] - 0.5, lines
    checkpoint = load_checkpoint(str(out / "ckpt.pt"))
    assert ("scaler" in checkpoint) == (dtype == "float16")
    model, tokenizer = model_from_checkpoint(checkpoint, DEVICE)
    assert len((out / "samples.txt").read_text(encoding="utf-8")) == 21
    idx = torch.tensor([tokenizer.encode("KING")], device=DEVICE)
    assert torch.isfinite(model(idx)[0]).all()


def test_compile_on_and_off_learn_alike(data_dir, tmp_path):
    """The compiled model computes what the eager one does: the same 20 steps land on nearly
    the same val loss (the GPU's own dtype; compiled kernels round differently)."""
    results = {}
    for compile in (False, True):
        _, lines = run(data_dir, tmp_path / str(compile), dtype="auto", compile=compile, max_iters=20, eval_interval=20)
        results[compile] = val_losses(lines)
        assert any(line.startswith("compiled, the first") for line in lines) == compile
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-2)  # step 0: the same weights
    assert results[True][-1] == pytest.approx(results[False][-1], abs=5e-2)
    assert results[True][-1] < results[True][0] - 0.3


def tiny_gpt(**switches):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=4, n_embd=32, dropout=0.0, **switches))
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # lm_head starts at zero: give it weights
    return model.to(DEVICE).eval()


@pytest.mark.parametrize("switches", [{}, {"position": "rotary", "qk_norm": True}])
def test_the_kv_cache_decode_equals_the_uncached_path(switches):
    model = tiny_gpt(**switches)
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        full, _ = model(idx)  # (2, 16, 11)
    cache = KVCache(model.config, 2, DEVICE, torch.float32)
    assert torch.allclose(prefill(model, idx[:, :6], cache), full[:, 5], atol=1e-4)
    decoder = Decoder(model)
    for t in range(6, 16):
        assert torch.allclose(decoder(idx[:, t : t + 1], cache), full[:, t], atol=1e-4), t
    # and generation: greedy, within one window, token for token
    prompt = idx[:, :4]
    cached, uncached = (
        torch.stack(list(generate(model, prompt, 12, temperature=0, kv_cache=kv_cache)), dim=1) for kv_cache in (True, False)
    )
    assert torch.equal(cached, uncached)


DDP_STEP = """
import copy, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from model import GPT, GPTConfig

device = sys.argv[1]
if device == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if device == "cuda" else "gloo")
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=4, n_embd=32, dropout=0.0)).to(device)
plain = copy.deepcopy(model)
step_model = DDP(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
idx = torch.randint(0, 11, (4, 17), device=device)
for m in (step_model, plain):
    m(idx[:, :-1], idx[:, 1:])[1].backward()  # DDP all-reduces the gradients in backward
same = all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(model.parameters(), plain.parameters()))
total = torch.ones(1, device=device)
dist.all_reduce(total)
print(f"backend {dist.get_backend()}, gradients as without DDP: {same}, all_reduce of one process: {total.item()}")
dist.destroy_process_group()
"""


def torchrun(*args, cwd=ROOT):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_ddp_with_nccl_on_one_process(data_dir, tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    assert f"backend {backend}, gradients as without DDP: True, all_reduce of one process: 1.0" in torchrun(str(script), DEVICE)
    # and train.py under torchrun: the process group, a run, its checkpoint
    stdout = torchrun(os.path.join(ROOT, "train.py"), *tiny_flags(data_dir, tmp_path / "o", device=DEVICE, max_iters=10))
    assert f"device {DEVICE}" in stdout and "x 1 processes" in stdout
    assert load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))["iter_num"] == 10
