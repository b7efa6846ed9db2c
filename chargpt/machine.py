"""The machine a run is on: its device, torchrun's processes, the training dtype, the
allocator, and the timings worth keeping between runs.

    resolve_device      --device=auto: cuda, else mps, else cpu; a device that is not here is an error
    Distributed         this process's place among the processes torchrun started
    resolve_dtype       --dtype=auto: the training dtype for this device (below)
    check_compile       --compile where torch.compile works
    keep_freed_memory   glibc keeps what a CPU step frees for the next step
    read_cache, write_cache   timings per machine in ~/.cache/chargpt/ (decode and training dtypes)

The training dtype, --dtype=auto, decided from the hardware and said in the run's first lines:
    CUDA   by the GPU's compute capability. 8.0 and up (Ampere: A100, RTX 30xx; Hopper:
           H100): bfloat16 autocast, and TF32 for the matrix products left in float32.
           7.x (Volta's V100, Turing's T4 and RTX 20xx): float16 autocast with loss scaling
           (chargpt/optim.py's LossScaler); their tensor cores multiply float16 at full speed
           and have no bfloat16, which PyTorch emulates there, slowly, though
           torch.cuda.is_bf16_supported() says True (pytorch PR #148322). Below 7.0 (no
           tensor cores): float32.
    MPS    float32: no faster choice has been measured there and shown to compute the same.
    CPU    float32 where the CPU has no bfloat16 units (AVX512-BF16 or AMX): there PyTorch
           emulates bf16 matrix products, about 100x slower than float32 (measured on an
           AVX2 EPYC). Where it has them, whether autocast pays depends on the machine and
           the model: autocast casts the weights at every matrix product, and AVX512-BF16
           without AMX multiplies bf16 no faster than float32 (a 2-core Xeon here: 588
           against 340 ms per step of the 30-minute recipe). So auto times a few training
           steps of this model in both and takes the faster.
The CPU's timing runs forward and backward on a copy of the model, in a forked random
state, so the run itself is untouched: the run's batch shape, cut to at most MAX_ROWS
tokens (enough for the matrix products to run at full speed), one warm-up step per dtype,
then ROUNDS rounds of one step each, interleaved, best round kept. The result is cached per
machine and model shape, so only the first run of a recipe on a machine pays for it.

--dtype=float32, bfloat16 or float16 asks for one dtype (float32 is then IEEE float32, no
TF32, on any GPU). Refused: bfloat16 on a GPU below 8.0 (emulated), float16 on MPS (PyTorch's
GradScaler has crashed there, pytorch#142397), and --compile on MPS (torch.compile has
failed there: nanoGPT#150, #542). float16 runs on a CPU too, slowly: that is how the tests
train it.

The allocator: every CPU step allocates and frees the same activations again, many of them
about a megabyte. glibc's malloc gives freed memory at the top of its heap back to the
kernel once a few megabytes are free, and the next step takes it back page by page: about
600 page faults a step for config/shakespeare_char_cpu.py, a step 11.3 ms instead of 9.9 on
the 2-core Xeon of the README. PyTorch's CPU tuning guide suggests another allocator
(jemalloc, tcmalloc) for this; two mallopt settings do it with glibc's own: blocks up to
32 MB come from the heap, and up to 512 MB of freed memory stays in it. A run's peak memory
is the same; the process just keeps it until it ends.

The timing caches: each kind of timing is a JSON file in ~/.cache/chargpt/
($XDG_CACHE_HOME/chargpt if set), {key: value}, the key naming the machine (machine()) and
what was timed. One that cannot be read or written is ignored: nothing ever fails because
of the cache. Delete a file to measure again.
"""

import contextlib
import copy
import ctypes
import hashlib
import json
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chargpt.atomic import write_atomic

# -----------------------------------------------------------------------------
# the device


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but CUDA is not available here (try --device=cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device={name} but MPS is not available here (try --device=cpu)")
    return name


# -----------------------------------------------------------------------------
# several processes (torchrun)


@dataclass
class Distributed:
    """This process's place among the processes torchrun started; rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        """The one process that prints and writes files."""
        return self.rank == 0

    def sum(self, tensor):
        """tensor summed over the processes (in place)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def agree(self, error):
        """Raise on every process when any one of them failed a check; error is this process's
        exception or None. Around a check that not every process makes alike (rank 0 alone
        locks out_dir; each GPU has its own free memory), so that none goes on to wait for
        the others in a collective that never comes."""
        if self.world_size > 1:
            errors = [None] * self.world_size
            dist.all_gather_object(errors, None if error is None else str(error))
            first = next((e for e in errors if e is not None), None)
            if error is None and first is not None:
                raise ValueError(first)
        if error is not None:
            raise error

    def from_master(self, values, device):
        """values (a list of floats) as rank 0 has them, in every process."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()


def init_distributed(device):
    """(Distributed, device): join torchrun's process group when it started us (RANK is set),
    with NCCL on CUDA, one GPU per process, and gloo on the CPU."""
    if "RANK" not in os.environ:
        return Distributed(), device
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.startswith("cuda"):
        device = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ddp, device


# -----------------------------------------------------------------------------
# the training dtype

ROUNDS = 3
MAX_ROWS = 4096  # tokens per timed step
MARGIN = 0.9  # a faster dtype is taken only where it takes less than this fraction of the simpler one's time
DTYPE_CACHE = "train_dtype"


def cpu_has_bf16_units():
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def autocast_context(device_type, dtype):
    """Mixed precision: matrix products in bfloat16 or float16; weights, softmax and loss in float32."""
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


DTYPES = ("float32", "bfloat16", "float16")
# the compute capability from which NVIDIA GPUs have bfloat16 tensor cores (Ampere), and float16 ones (Volta)
BF16_CAPABILITY, FP16_CAPABILITY = (8, 0), (7, 0)


def gpu(device="cuda"):
    """(name, compute capability as (major, minor)) of a CUDA device; the tests fake it."""
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))


def gpu_has_bf16(device="cuda"):
    """True where the GPU multiplies bfloat16 on its tensor cores, not emulated."""
    return gpu(device)[1] >= BF16_CAPABILITY


def describe_gpu(device="cuda"):
    name, (major, minor) = gpu(device)
    return f"{name} (compute capability {major}.{minor})"


def training_dtype(name, device, model, batch_shape, ddp, log=None):
    """resolve_dtype's choice for this run (with several processes rank 0's, so that they all
    compute alike), after refusing a dtype this device should not train in. On a GPU with
    bfloat16 the float32 matrix products left over run in TF32, unless --dtype=float32."""
    device_type = device.split(":")[0]
    if name == "bfloat16" and device_type == "cuda" and not gpu_has_bf16(device):
        raise ValueError(
            f"--dtype=bfloat16 but {describe_gpu(device)} has no bfloat16 units (8.0 and up): "
            "PyTorch would emulate it, slowly (use --dtype=float16 or auto)"
        )
    if name == "float16" and device_type == "mps":
        raise ValueError(
            "--dtype=float16 is not offered on MPS: it needs loss scaling, and PyTorch's GradScaler "
            "has crashed there (pytorch#142397); use --dtype=float32"
        )
    dtype = resolve_dtype(name, device, model, batch_shape, log)
    if ddp.world_size > 1:
        dtype = DTYPES[int(ddp.from_master([float(DTYPES.index(dtype))], device)[0])]
    if device_type == "cuda" and name != "float32" and gpu_has_bf16(device):
        # TF32 for float32 matmuls (Muon's, generation's); this call sets the CUDA and CPU
        # backends together (mixing it with the per-backend flags is an error in torch 2.9+)
        torch.set_float32_matmul_precision("high")
    return dtype


def resolve_dtype(name, device, model=None, batch_shape=None, log=None):
    """'float32', 'bfloat16' or 'float16' for --dtype=name on device ('cpu', 'cuda', 'cuda:1',
    'mps'). auto follows the rule in the module docstring and says why in log: on a GPU from
    its compute capability; on a CPU with bf16 units float32 and bfloat16 are timed on model
    (B, T) = batch_shape, unless the cache knows the answer, and without a model to time such
    a CPU gets float32 (the safe choice: never slower by much)."""
    if name != "auto":
        return name
    log = log or (lambda message: None)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        dtype, why = cuda_dtype(gpu(device)[1])
        log(f"dtype auto: {describe_gpu(device)}: {why}")
        return dtype
    if device_type == "mps":
        log("dtype auto: float32 on MPS (no faster dtype has been measured there and shown to compute the same)")
        return "float32"
    if device_type != "cpu" or not cpu_has_bf16_units() or model is None:
        return "float32"
    return timed_cpu_dtype(model, batch_shape, log)


def timed_cpu_dtype(model, batch_shape, log=None):
    """float32 or bfloat16 on a CPU with bf16 units, from a timing of this model kept in the
    cache. bfloat16 only where its step takes less than MARGIN of float32's: within the
    margin the simpler float32 stays, so the noise of one timing cannot flip the choice. A
    timing taken while other programs were busy on the machine is used, and taken again by
    the next run on a quieter machine."""
    key = f"{machine()} | {json.dumps(dict(sorted(vars(model.config).items())))} | batch {tuple(batch_shape)}"
    times = read_cache(DTYPE_CACHE).get(key)
    valid = isinstance(times, dict) and all(isinstance(times.get(d), float) for d in ("float32", "bfloat16"))
    if not valid or (times.get("busy") and not machine_busy()):
        busy = machine_busy()
        times = {**time_dtypes(model, batch_shape), "busy": busy, "when": round(time.time())}
        write_cache(DTYPE_CACHE, key, times)
        if log:
            log(
                f"dtype auto: a training step here takes {times['float32'] * 1000:.0f} ms in float32, "
                f"{times['bfloat16'] * 1000:.0f} ms with bfloat16 autocast{' (timed on a busy machine)' if busy else ''}; "
                f"kept in {cache_path(DTYPE_CACHE)} (delete it to time again)"
            )
    return "bfloat16" if times["bfloat16"] < MARGIN * times["float32"] else "float32"


def machine_busy():
    """Whether other programs keep the cores busy now: the load average of the last minute
    over half the cores this process uses (a laptop playing a video, another training run)."""
    try:
        return os.getloadavg()[0] > 0.5 * torch.get_num_threads()
    except OSError:  # not every system has a load average
        return False


def cuda_dtype(capability):
    """(dtype, why) for a GPU of this compute capability (major, minor)."""
    if capability >= BF16_CAPABILITY:
        return "bfloat16", "bfloat16 autocast, and TF32 for the matrix products left in float32"
    if capability >= FP16_CAPABILITY:
        return "float16", "float16 autocast with loss scaling (no bfloat16 units before 8.0; PyTorch would emulate it)"
    return "float32", "float32 (no tensor cores before 7.0)"


def check_compile(compile, device):
    """Refuse --compile where torch.compile has failed: MPS (nanoGPT#150, #542)."""
    if compile and device.split(":")[0] == "mps":
        raise ValueError("--compile=True on MPS: torch.compile has failed there (nanoGPT#150, #542); run without it")


def time_dtypes(model, batch_shape):
    """{dtype: seconds per forward + backward} of a copy of model on random tokens of batch_shape."""
    T = batch_shape[1]
    B = max(1, min(batch_shape[0], MAX_ROWS // T))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trial = copy.deepcopy(model).train()
        idx = torch.randint(trial.config.vocab_size, (B, T + 1))
        x, y = idx[:, :-1], idx[:, 1:]

        def step(dtype):
            t0 = time.perf_counter()
            with autocast_context("cpu", dtype):
                _, loss = trial(x, y)
            loss.backward()
            trial.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        dtypes = ("float32", "bfloat16")
        for dtype in dtypes:  # warm-up: the first calls allocate and pick their kernels
            step(dtype)
        rounds = {dtype: [] for dtype in dtypes}
        for _ in range(ROUNDS):
            for dtype in dtypes:
                rounds[dtype].append(step(dtype))
    return {dtype: min(seconds) for dtype, seconds in rounds.items()}


# -----------------------------------------------------------------------------
# the allocator

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold=32 * 2**20, trim_threshold=512 * 2**20):
    """Tell glibc's malloc to keep freed memory; True if it took both settings, False on
    another C library or system (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this Python runs on
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt accepts settings and ignores them
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


# -----------------------------------------------------------------------------
# threads on a shared CPU
#
# PyTorch's threads wait for each other at the end of every operation by spinning. On a
# quiet machine that is the fastest way; when another program keeps a core busy, a
# thread that has lost its core makes the others spin for its whole time slice: the CPU
# recipe's step went from 10 ms to 60-360 ms on the 2-core Xeons of the README with another
# program running, and to 16-19 ms with one thread. (Letting threads sleep instead,
# OMP_WAIT_POLICY=PASSIVE, cost 2.6x on the quiet machine.) So a CPU run uses the cores
# that other programs leave free, looked at again at each eval; generation (sample.py,
# serve.py) does the same before it starts and, in the server, every second it streams.
# The setting is the calling thread's own (and the default of threads started later): each
# of a server's generations sets its own. One catch, measured with GNU OpenMP on 2 cores:
# once one thread has run a team of 2, another thread's team of 2 waits in the kernel
# instead of spinning, 4-10x slower an operation; serve.py's main thread therefore computes
# with one thread and leaves the teams to the generations.


def threads_for(cores, others, streams=1):
    """How many threads each of `streams` computations running at once should take on cores
    when other programs keep `others` of them busy."""
    return max(1, min(cores, round(cores - others)) // streams)


class CpuShare:
    """The cores other programs used since the last look: the whole machine's busy time
    (/proc/stat) less this process's own (os.times). Linux only: None elsewhere."""

    def __init__(self, read_stat=None, own_seconds=None, clock=time.monotonic):
        self.read_stat, self.clock = read_stat or _busy_seconds, clock
        self.own_seconds = own_seconds or (lambda: os.times().user + os.times().system)
        self.mark = self._sample()

    def _sample(self):
        return self.clock(), self.read_stat(), self.own_seconds()

    def since_last_look(self):
        return self.clock() - self.mark[0]

    def others(self):
        """Cores busy with other programs, on average since the last call (or the start)."""
        now = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self.mark, now
        self.mark = now
        if busy0 is None or busy1 is None or t1 - t0 < 0.05:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def _busy_seconds():
    """Seconds of CPU time the whole machine has spent busy since it booted, or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Threads:
    """--threads on a CPU: a fixed number, or (0) the cores other programs leave free, looked
    at when asked (train.py: at each eval; sample.py: before it generates; serve.py: as
    each generation streams). Safe to share between a server's threads."""

    def __init__(self, setting, log=None, share=None):
        self.fixed, self.log = setting, log
        self.cores = torch.get_num_threads()  # PyTorch's choice: the physical cores, or OMP_NUM_THREADS
        self.share = share if share is not None else (CpuShare() if not setting else None)
        self.others = 0.0  # what the last look saw
        self.lock = threading.Lock()
        if setting:
            torch.set_num_threads(setting)  # threads started later begin with it too

    def adjust(self, streams=1, look=0.0):
        """Set this thread's torch threads for one of `streams` computations running at once;
        return the number. With a log, say so when it changes. look: the seconds the look
        must cover at least (sample.py's only look), waited for where fewer have passed."""
        if self.fixed or self.cores == 1:
            threads = self.fixed or 1
        else:
            with self.lock:  # CpuShare keeps the time of the last look
                time.sleep(max(0.0, look - self.share.since_last_look()))
                others = self.share.others()
                if others is not None:  # None: too soon since the last look, or no /proc/stat
                    self.others = others
                threads = threads_for(self.cores, self.others, streams)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            if self.log and not self.fixed:
                self.log(
                    f"threads: {threads} of {self.cores} (other programs keep {self.others:.1f} cores busy; --threads=N fixes it)"
                )
        return threads


# -----------------------------------------------------------------------------
# timings kept between runs


def cache_path(name):
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "chargpt", f"{name}.json")


def machine():
    """What the timings depend on besides the model: the processor, PyTorch and its threads."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux; elsewhere platform's name
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    # a virtual machine may call every CPU "Intel(R) Xeon(R) Processor": its flags tell them apart
    flags = hashlib.sha1(info.get("flags", "").encode()).hexdigest()[:8]
    return f"{name} (flags {flags}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def read_cache(name):
    """The cache called name as {key: value}; {} when the file is missing, unreadable or corrupt."""
    try:
        with open(cache_path(name), encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache(name, key, value):
    """Add an entry to the cache called name; one that cannot be written is left alone, silently."""
    path = cache_path(name)
    entries = {**read_cache(name), key: value}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(entries, indent=1).encode("utf-8"), durable=False)
    except OSError:
        pass
