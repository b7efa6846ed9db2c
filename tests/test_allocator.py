"""chargpt/machine.py's allocator setting: with glibc, the memory one step frees stays for
the next, which then takes it without a page fault."""

import subprocess
import sys

import pytest

from chargpt import machine
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


# -- threads on a shared CPU (chargpt/machine.py) ------------------------------------


def test_threads_for_leave_the_cores_other_programs_use():
    assert machine.threads_for(2, 0.0) == 2 and machine.threads_for(2, 0.3) == 2
    assert machine.threads_for(2, 0.8) == 1 and machine.threads_for(2, 5.0) == 1  # never fewer than one
    assert machine.threads_for(8, 3.0) == 5


def test_threads_for_share_the_free_cores_among_computations_running_at_once():
    assert machine.threads_for(2, 0.0, streams=2) == 1 and machine.threads_for(8, 0.0, streams=2) == 4
    assert machine.threads_for(8, 3.0, streams=2) == 2 and machine.threads_for(2, 0.0, streams=5) == 1


def test_cpu_share_is_the_machines_busy_time_less_this_process():
    # 2 s pass; the machine is busy for 3 s of CPU time, 1 s of it this process's: 1 core's worth from others
    share = machine.CpuShare(read_stat=iter([100.0, 103.0]).__next__, own_seconds=iter([5.0, 6.0]).__next__,
                             clock=iter([10.0, 12.0]).__next__)  # fmt: skip
    assert share.others() == pytest.approx(1.0)
    assert machine.CpuShare(read_stat=lambda: None).others() is None  # no /proc/stat: nothing to say


class FakeShare:
    def __init__(self, values, since_last_look=1.0):
        self.values, self.seconds = iter(values), since_last_look

    def since_last_look(self):
        return self.seconds

    def others(self):
        return next(self.values)


def test_threads_follow_what_other_programs_leave_free(monkeypatch):
    calls, lines = [], []
    monkeypatch.setattr(machine.torch, "get_num_threads", lambda: calls[-1] if calls else 2)
    monkeypatch.setattr(machine.torch, "set_num_threads", calls.append)
    threads = machine.Threads(0, lines.append, share=FakeShare([0.1, 0.9, 1.2, 0.0]))
    threads.adjust()  # quiet: as many as PyTorch chose
    assert calls == [] and lines == []
    threads.adjust()  # a program keeps a core busy: one thread
    assert calls == [1] and lines == ["threads: 1 of 2 (other programs keep 0.9 cores busy; --threads=N fixes it)"]
    threads.adjust()
    assert calls == [1] and len(lines) == 1  # no change, nothing said
    threads.adjust()  # it went away
    assert calls == [1, 2] and lines[-1].startswith("threads: 2 of 2")


def test_a_fixed_number_of_threads_is_kept(monkeypatch):
    calls = []
    monkeypatch.setattr(machine.torch, "set_num_threads", calls.append)
    threads = machine.Threads(3, lambda m: pytest.fail("nothing to say"), share=FakeShare([1.9]))
    assert threads.adjust() == 3 and set(calls) == {3}  # set again where this thread had another number


def test_a_look_too_short_to_say_anything_is_waited_out(monkeypatch):
    """sample.py looks once: where loading took less than the look needs, it waits for the rest."""
    slept = []
    monkeypatch.setattr(machine.time, "sleep", slept.append)
    threads = machine.Threads(0, share=FakeShare([1.0], since_last_look=0.03))
    threads.cores = 2
    assert threads.adjust(look=0.1) == 1 and slept == [pytest.approx(0.07)]


def test_each_thread_has_its_own_number_of_threads():
    """A server's generations run in threads of their own, each with its own setting."""
    import threading

    import torch

    threads = machine.Threads(0, share=FakeShare([1.0, 0.0, 0.0]))
    threads.cores = 2
    seen = []

    def generation(streams):
        seen.append((threads.adjust(streams=streams), torch.get_num_threads()))

    before = torch.get_num_threads()
    for streams in (1, 1, 2):
        worker = threading.Thread(target=generation, args=(streams,))
        worker.start()
        worker.join()
    # one core busy elsewhere; then both free; then both free for two generations at once
    assert seen == [(1, 1), (2, 2), (1, 1)]
    assert torch.get_num_threads() == before  # the thread that started them keeps its own (1 or 2: one differs)
