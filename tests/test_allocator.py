"""chargpt/machine.py's allocator setting: with glibc, the memory one step frees stays for
the next, which then takes it without a page fault."""

import subprocess
import sys

import pytest

from conftest import ROOT

# a step's activations, as three 16 MB tensors made and dropped together; the script prints
# whether the setting took, the MB still resident after the first step freed its tensors,
# and the page faults of each later step
SCRIPT = """
import resource, sys, torch
from chargpt import machine as allocator
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def step():
    tensors = [torch.ones(2**22) for _ in range(3)]  # written: every page touched
    del tensors
start = resident()
step()
held = (resident() - start) / 2**20
for _ in range(10):  # the heap grows to its size over the first steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, held, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def run(mode):
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kept, held, faults = result.stdout.split()
    return kept, float(held), float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc")
def test_freed_memory_is_kept_for_the_next_step():
    kept, held, faults = run("keep")
    if kept == "False":
        pytest.skip("not glibc: keep_freed_memory changes nothing")
    assert held > 40, held  # the 48 MB stayed in the process after the tensors were freed
    assert faults < 50, faults  # and the next steps took it without faults (48 MB: 12,288 pages)
    _, held_default, _ = run("default")
    assert held_default < 8, held_default  # glibc's default gave it back to the kernel
