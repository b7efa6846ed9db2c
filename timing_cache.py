"""Timings worth keeping between runs, per machine: decode_dtype.py's and precision.py's.

Each kind of timing is a JSON file in ~/.cache/chargpt/ ($XDG_CACHE_HOME/chargpt if set),
{key: value}, the key naming the machine (machine()) and what was timed. A file is written to
a temporary name and renamed; one that cannot be read or written is ignored: nothing ever
fails because of the cache. Delete a file to measure again.
"""

import hashlib
import json
import os
import platform
import tempfile

import torch


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
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
