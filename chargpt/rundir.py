"""A training run's claim on its out_dir: one run at a time, and never a new run over a
trained model. Used by train.py.

    lock = claim_for(config, ddp)                         # ValueError if the folder is not ours
    write_run_config(config.out_dir, resolved)            # the first write, once every check has passed
    ...                                                   # train, writing into out_dir
    lock.release()

The lock is an OS lock (flock) on out_dir/.lock, which also holds the pid of its owner for
the message a second run prints. The kernel drops it when the process ends, however it ends
(kill -9 included), so a lock is never stale; the file itself stays behind, harmless. A fresh
run (--init_from=scratch) refuses an out_dir that holds ckpt.pt or best.pt unless told to
overwrite: files of a run that died before its first checkpoint (config.json,
metrics.jsonl, .tmp-*) are not worth protecting. A refused run leaves the folder as it was
(one it had to create is removed again). flock is POSIX (Linux, macOS), like the rest of
the project's file handling.
"""

import difflib
import fcntl
import json
import os
import shlex
import socket

import torch

LOCK_NAME = ".lock"
CHECKPOINTS = ("ckpt.pt", "best.pt")


def _describe(path):
    """'ckpt.pt at step 300, best val loss 2.2700', read without loading the tensors."""
    name = os.path.basename(path)
    try:
        # mmap: only the small entries are read, however big the model
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"{name} at step {checkpoint['iter_num']}, best val loss {checkpoint['best_val_loss']:.4f}"
    except Exception:  # a damaged or foreign file is still not ours to overwrite
        return f"{name}, unreadable"


def refuse_if_trained(out_dir):
    """ValueError when out_dir holds a checkpoint that a fresh run would write over."""
    found = [os.path.join(out_dir, name) for name in CHECKPOINTS if os.path.isfile(os.path.join(out_dir, name))]
    if not found:
        return
    ways = f"continue it with: {resume_command(out_dir)}; or " if os.path.basename(found[0]) == "ckpt.pt" else ""
    raise ValueError(
        f"--out_dir {out_dir} already holds a trained model ({_describe(found[0])}); "
        f"{ways}train into another --out_dir, or pass --overwrite=True to start afresh there"
    )


class RunLock:
    """An exclusive flock on out_dir/.lock, held until release() or the end of the process."""

    def __init__(self, out_dir):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, LOCK_NAME)
        self.fd, self.made = None, []  # the folders this run created, deepest first

    @property
    def held(self):
        return self.fd is not None

    def acquire(self, create=True):
        """Take the lock, or raise ValueError naming the process that has it. With
        create=False an absent lock file is left absent (nobody holds a lock then)."""
        while not self.held:
            if not create and not os.path.exists(self.path):
                return
            if create and not os.path.isdir(self.out_dir):
                self._make_dir()
            try:
                fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                if create:
                    raise
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode("utf-8", "replace").split()
                os.close(fd)
                raise ValueError(
                    f"--out_dir {self.out_dir} is in use by another training run ({self._owner(owner)}); "
                    "wait for it to end, or train into another --out_dir"
                ) from None
            except OSError as e:  # a file system without locks (some network mounts)
                os.close(fd)
                self._unmake()
                raise ValueError(
                    f"--out_dir {self.out_dir}: cannot lock {self.path} ({e.strerror or e}), so it cannot "
                    "be kept to one run at a time: train into a folder on a local disk"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # the file may have been removed (a refused run cleaning the folder it made) between
            # our open and our lock: then the lock is on a file nobody else sees; start again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd

    def stamp(self):
        """Write this process's pid into the lock file, for the message of a run refused by it."""
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def _make_dir(self):
        folder = os.path.abspath(self.out_dir)
        missing = []
        while not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(self.out_dir, exist_ok=True)
        self.made = missing

    @staticmethod
    def _owner(fields):
        if not fields:
            return "a process that is just starting"
        pid = f"pid {fields[0]}"
        return pid if len(fields) < 2 or fields[1] == socket.gethostname() else f"{pid} on {fields[1]}"

    def release(self):
        """Drop the lock. A folder this run made and left empty but for the lock file (a run
        refused before it wrote anything) is removed again."""
        if not self.held:
            return
        self._unmake()  # still locked: whoever opened the file meanwhile sees it gone and retries
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None

    def _unmake(self):
        """Remove the folders this run made, if nothing but the lock file is in them."""
        if self.made and os.listdir(self.out_dir) == [LOCK_NAME]:
            os.remove(self.path)
            for folder in self.made:
                try:
                    os.rmdir(folder)
                except OSError:  # no longer empty: another run is using it
                    break


def claim(out_dir, fresh, overwrite):
    """Lock out_dir for this run and return the RunLock. A run in the folder, or a fresh run
    (fresh=True) over a checkpoint without overwrite, is a ValueError, raised before
    anything is created in the folder (or, if a run ended between the two looks, with no more
    than the lock file made)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir} is a file, not a folder")
    lock = RunLock(out_dir)
    try:
        lock.acquire(create=False)  # a live run is the first thing to tell about
        if fresh and not overwrite:
            refuse_if_trained(out_dir)
        lock.acquire()
        if fresh and not overwrite:
            refuse_if_trained(out_dir)  # a run that ended while we looked may have left one
        lock.stamp()  # only now: a refused run leaves even the lock file as it was
    except OSError as e:
        lock.release()
        raise OSError(f"--out_dir {out_dir} is not writable ({e.strerror or e})") from None
    except BaseException:
        lock.release()
        raise
    return lock


def clear_previous_run(out_dir):
    """Remove what an earlier run left in out_dir (its checkpoints, sample and plot), so that
    a fresh run there (--overwrite=True) leaves no file of another run beside its own."""
    for name in (*CHECKPOINTS, "samples.txt", "loss.png", "health.png"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def claim_for(config, ddp):
    """out_dir's RunLock for a training run, taken by rank 0 (None elsewhere): a folder in
    use by another run, or a new run over a trained model without --overwrite, is refused
    on every process."""
    lock, error = None, None
    if ddp.master:
        try:
            lock = claim(config.out_dir, fresh=config.init_from == "scratch", overwrite=config.overwrite)
        except (ValueError, OSError) as e:
            error = e
    ddp.agree(error)
    return lock


def run_folders(out_dir):
    """The run folders (those holding ckpt.pt or best.pt) beside out_dir, and one level
    below them (out-lecture/3_multi_head), spelled as out_dir is: relative stays relative."""
    parent = os.path.dirname(os.path.normpath(out_dir))
    found = []
    try:
        names = sorted(os.listdir(parent or "."))
    except OSError:
        return found
    for name in names:
        folder = os.path.join(parent, name)
        if not os.path.isdir(folder) or name.startswith("."):
            continue
        try:
            inner = sorted(os.path.join(folder, n) for n in os.listdir(folder))
        except OSError:
            continue
        for candidate in [folder, *inner]:
            if any(os.path.isfile(os.path.join(candidate, c)) for c in CHECKPOINTS):
                found.append(candidate)
    return found


def missing_run_hint(out_dir):
    """What to say after 'no run in out_dir': the close match of a mistyped folder, else the
    run folders there are, else ''."""
    folders = [f for f in run_folders(out_dir) if os.path.normpath(f) != os.path.normpath(out_dir)]
    parent = os.path.dirname(os.path.normpath(out_dir))
    # compared below their common folder: a long shared prefix would make any folder look close
    below = {os.path.relpath(f, parent or "."): f for f in folders}
    close = difflib.get_close_matches(os.path.relpath(os.path.normpath(out_dir), parent or "."), below, n=1, cutoff=0.8)
    if close:
        return f" (did you mean --out_dir={below[close[0]]}?)"
    if folders:
        listed = ", ".join(folders[:8]) + (f" and {len(folders) - 8} more" if len(folders) > 8 else "")
        return f"; the run folders here: {listed} (pass one with --out_dir)"
    return ""


def resume_command(out_dir, *flags, world_size=1):
    """The whole command that continues the run in out_dir: its settings come from the
    checkpoint there (train.py's read_settings), so only flags that change them are added."""
    launcher = "python" if world_size == 1 else f"torchrun --standalone --nproc_per_node={world_size}"
    return " ".join([launcher, "train.py", shlex.quote(f"--out_dir={out_dir}"), "--init_from=resume", *flags])


def write_run_config(out_dir, resolved):
    """Create out_dir with config.json (the resolved settings) in it, and clear the temporary
    files of a run killed mid-save."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(resolved, f, indent=1)
        for name in os.listdir(out_dir):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(out_dir, name))
    except OSError as e:
        raise OSError(f"--out_dir {out_dir} is not writable ({e.strerror or e})") from None
