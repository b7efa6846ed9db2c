"""Files written whole or not at all: checkpoints, token files, loss.png, the timing caches.

    write_atomic(path, b"...")                         # bytes
    write_atomic(path, lambda f: torch.save(obj, f))   # or a function that writes into f

The data goes to a temporary file in the same folder (named .tmp-NAME..., which train.py
clears from its out_dir), is flushed to the disk and renamed over path: a reader, or a
crash at any moment, sees the old file or the new one, never half of one. The new file
gets the permissions any file the user makes gets (0666 less the umask), not the 0600 of a
temporary file. A failed write (a full disk, say) is an OSError that names path and says
the old file is untouched, and leaves no temporary file behind.
"""

import os
import tempfile


def write_atomic(path, data, durable=True):
    """Write data (bytes, or a function of a binary file) to path atomically. durable:
    fsync the file and the folder, so that the rename survives a power cut too."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=folder)
    except OSError as e:
        raise OSError(f"could not write {path} ({e.strerror or e})") from None
    recorder = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                recorder = _Recorder(f)
                data(recorder)
            else:
                f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write as a RuntimeError of its own; the OSError beneath it says why
        cause = e if isinstance(e, OSError) else getattr(recorder, "error", None)
        if cause is not None and isinstance(e, (OSError, RuntimeError)):
            raise OSError(f"could not write {path} ({cause.strerror or cause}); the previous file is untouched") from None
        raise
    if durable:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself, on the disk
        finally:
            os.close(dir_fd)


class _Recorder:
    """A binary file that remembers the OSError of a failed write, for write_atomic's message."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _umask():
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask
