"""A playground in the browser: write with a trained checkpoint and see what each character attends to.

    python serve.py --out_dir out                  # prints the URL: open it in a browser
    python serve.py --out_dir out --port 8000      # a fixed port (default: a free one)
    python serve.py --out_dir out --host 0.0.0.0   # reachable from other machines: see the README first
    python serve.py --help

The checkpoint (out_dir/best.pt, else ckpt.pt) is loaded once and shared by every request,
until a newer one lands there: each request looks (a stat), and the first to see it loads it
while the others go on with the old one; a generation keeps the model it began with. A
checkpoint that does not load leaves the old one serving, and /api/info says why. out_dir
must exist, but may hold no checkpoint yet (a run that has just begun): the page then
shows the run's metrics, and generating answers 503 until the first checkpoint lands.
The page, chargpt/playground.html, talks to a small JSON API that curl can call too:

    GET  /                 the page
    GET  /api/info         the checkpoint's facts (configs, parameters, step, best val loss, an id that
                           changes with the file) and the server's limits; has_model false before the first
    GET  /api/metrics      the records of out_dir/metrics.jsonl (a run writing there shows up live) and
                           the run's max_iters and time_budget (its config.json)
    POST /api/generate     {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
                           -> Server-Sent Events: while it waits its turn, an event "queued" {"queued": N
                           ahead of it} whenever N changes; one {"char": ...} per character; an event "done"
    POST /api/attention    {"text": ...} -> the characters, weights[layer][head][t][s] and the top-5
                           next characters at each position
    POST /api/lens         {"text": ..., "heads_off": [[layer, head], ...]} -> the logit lens at each
                           position and the loss at each character, with those heads switched off
    GET  /api/heads        every head switched off in turn on a slice of the val split: the loss it costs

Generation is sample.py's own (chargpt/engine.py's generate_tokens): the same settings and seed give the
same text. Bad input is a 4xx with one line of JSON, {"error": "FIELD: what is wrong", "field": FIELD}.

Built on the standard library alone, nothing to install beyond requirements.txt: asyncio's
event loop holds each connection, a socket and a timer, until its request has arrived, and
then http.server's BaseHTTPRequestHandler answers it in a thread of its own
(chargpt/connections.py says why; docs/playground.md counts what it costs). The model is only
read (eval mode, no_grad), and each generation has its own torch.Generator and KV cache, so
clients need no lock and each gets its own stream. A client that goes away mid-stream ends
its generation at the next character written; one that goes away while waiting its turn
leaves the queue.

Limits, so that a few clients cannot stop it for everyone and a class can use it at once:
    --timeout            seconds a client has to send its whole request, and that a reply waits on
                         a client that does not read; then its connection is closed
    --max_connections    connections open at once, an open file each (0: as many as the open files
                         allow); at the cap the one that has sent least for longest makes room
    --max_generations    generations computing at once (0: two on a CPU of two cores or more, as measured)
    --max_queue          generations waiting their turn; beyond it /api/generate answers 503 and Retry-After
At start the soft limit on open files is raised to the hard one where it can be, and one line
says the figures. Connects beyond what accept() has taken wait in a listen backlog of SOMAXCONN.

On a CPU each generation takes its share of the cores that other programs (the browser
showing the page, among them) leave free, looked at when it starts and every second after
(--threads=0, the default; chargpt/machine.py says why): two threads on a core that another
program keeps busy wait for each other at every step.
"""

import hashlib
import io
import json
import math
import os
import re
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

import torch

from chargpt import connections
from chargpt.checkpoint import describe, load_checkpoint, model_from_checkpoint
from chargpt.config import DECODE_DTYPE_NAMES, HelpRequested, SampleConfig, check_choice, knob, parse
from chargpt.connections import MAX_BODY_BYTES, MAX_CONNECTIONS, RequestReader, check_open_files
from chargpt.engine import generate_tokens, resolve_decode_dtype
from chargpt.lens import analyse, check_heads_off, rank_heads, val_slice, val_split
from chargpt.machine import Threads, resolve_device
from chargpt.metrics import read_records
from chargpt.rundir import missing_run_hint
from chargpt.turns import Turns

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chargpt", "playground.html")
TOP = 5  # next-character guesses shown per position
STREAM_SEND_BUFFER = 64 * 1024  # bytes: a stream's send buffer (a character's event is about 20), a reply's pieces
THREADS_LOOK_SECONDS = 1.0  # how often a streaming generation looks again at the cores left free
QUEUE_LOOK_SECONDS = 0.25  # how often a client waiting its turn is looked at: has it gone?
# the Host header of a request to a loopback address: its name or address, and any port (ASCII
# only: with re.IGNORECASE alone, the Kelvin sign would match a "k")
LOOPBACK_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE | re.ASCII)


@dataclass
class ServeConfig:
    out_dir: str = knob("out", "folder with best.pt or ckpt.pt (and the run's metrics.jsonl)")
    host: str = knob("127.0.0.1", "address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is every network it is on")
    port: int = knob(0, "port to listen on (0: a free one, chosen by the system)")
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, mps")
    kv_cache: bool = knob(True, "generate with the key/value cache, as sample.py does by default")
    decode_dtype: str = knob("auto", "weights of the decode steps, as in sample.py: auto, float32, float16, bfloat16 or int8")
    max_new_tokens_limit: int = knob(5000, "the most characters one request may ask to generate")
    max_chars: int = knob(10000, "the longest prompt or text one request may send, in characters")
    timeout: float = knob(
        10.0, "seconds a client has to send its whole request, and that a reply waits on a client that does not read"
    )
    max_connections: int = knob(
        0,
        f"connections open at once, an open file each (0: as many as the open files allow, at most {MAX_CONNECTIONS}); "
        "beyond it, the one that has sent least for longest is closed for the newcomer",
    )
    max_generations: int = knob(
        0,
        "generations computing at once, each busy on the CPU or GPU (0: 2 on a CPU, 1 on a single core, 4 on a GPU; docs/playground.md: measured)",
    )
    max_queue: int = knob(
        64, "generations that may wait their turn, first come first served; beyond it /api/generate answers 503"
    )
    threads: int = knob(
        0,
        "CPU threads of each generation: 0 shares the cores other programs leave free among the generations streaming, looked at every second; N: exactly N",
    )

    def validate(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        check_choice("decode_dtype", self.decode_dtype, ("auto", *DECODE_DTYPE_NAMES))
        if not 0 < self.timeout < math.inf:
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (automatic) or more, got {self.threads}")
        for key in ("max_new_tokens_limit", "max_chars"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_connections", "max_generations", "max_queue"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be 0 or more, got {getattr(self, key)}")


class RequestError(Exception):
    """A request the server refuses: the HTTP status, a one-line message naming the field, and
    any headers the answer needs (Retry-After, Allow)."""

    def __init__(self, status, field, message, headers=()):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.headers = status, field, headers


def shown(text, limit=80):
    """A client's text as a message or the log can quote it: on one line (newlines, control
    characters and lone surrogates escaped as repr does) and at most limit characters."""
    cut = text[:limit]
    return (cut if cut.isprintable() else repr(cut)[1:-1]) + ("..." if len(text) > limit else "")


def described(value):
    """A JSON value, short, for a message: a list or object is named, not printed (printing
    one nested a thousand deep would fail where parsing it did not)."""
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    return shown(json.dumps(value, ensure_ascii=False), 40)


# what each endpoint accepts: field -> (type, default); defaults are sample.py's
GENERATE_FIELDS = {
    "prompt": (str, SampleConfig.start),
    "max_new_tokens": (int, SampleConfig.max_new_tokens),
    "temperature": (float, SampleConfig.temperature),
    "top_k": (int, SampleConfig.top_k),
    "top_p": (float, SampleConfig.top_p),
    "seed": (int, SampleConfig.seed),
}
ATTENTION_FIELDS = {"text": (str, None)}
LENS_FIELDS = {"text": (str, None), "heads_off": (list, [])}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list"}


def finite(value):
    """value with every non-finite float in it, however deep, as None: JSON has no NaN or inf,
    and a browser's JSON.parse refuses Python's NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def read_fields(body, fields):
    """The fields of a parsed JSON body, typed and with defaults; unknown, missing or
    mistyped ones are a RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "body", f"expected a JSON object with the fields {', '.join(fields)}")
    for key in body:
        if key not in fields:
            raise RequestError(400, shown(key), f"unknown field (expected {', '.join(fields)})")
    values = {}
    for key, (typ, default) in fields.items():
        value = body.get(key, default)
        if value is None:
            raise RequestError(400, key, "missing" if key not in body else f"expected {TYPE_NAMES[typ]}, got null")
        if typ is float and type(value) is int:  # an integer is fine where a number is expected
            value = float(value) if abs(value) < 1e300 else math.inf  # 1e400 written out is still no temperature
        if type(value) is not typ:  # bool is not an int here: true is no seed
            raise RequestError(400, key, f"expected {TYPE_NAMES[typ]}, got {described(value)}")
        if typ is float and not math.isfinite(value):
            raise RequestError(400, key, f"expected a finite number, got {value}")
        values[key] = value
    return values


# /api/info's checkpoint fields before a run's first checkpoint
NO_MODEL = {
    "checkpoint": None,
    "checkpoint_id": None,
    "model_type": None,
    "model_config": {},
    "train_config": {},
    "params": 0,
    "iter_num": None,
    "best_val_loss": None,
    "vocab": "",
    "block_size": 0,
    "n_layer": 0,
    "n_head": 0,
    "has_attention": False,
    "decode_dtype": None,
}


class Loaded:
    """One checkpoint, loaded: its model, tokenizer and facts. Never changed once made, so a
    request keeps the one it started with while a newer one replaces it for the next."""

    def __init__(self, path, stamp, device, decode_dtype):
        checkpoint = load_checkpoint(path, device)
        self.path, self.stamp = path, stamp
        self.model, self.tokenizer = model_from_checkpoint(checkpoint, device, path)
        self.has_attention = hasattr(self.model, "attention_maps")  # the bigram model has none
        self.description = describe(path, checkpoint, self.model)  # the line sample.py prints too
        mc = self.model.config
        best = checkpoint.get("best_val_loss")
        best = best if best is not None and math.isfinite(best) else None  # inf before the first eval; JSON has no inf
        self.info = {
            "checkpoint": path,
            "checkpoint_id": "{}-{:x}-{:x}-{:x}".format(*stamp),  # the page reloads its facts when this changes
            "model_type": mc.model_type,
            "model_config": checkpoint["model_config"],
            "train_config": checkpoint.get("train_config", {}),
            "params": self.model.num_params(),
            "iter_num": checkpoint["iter_num"],
            "best_val_loss": best,
            "vocab": self.tokenizer.chars,
            "block_size": mc.block_size,
            "n_layer": mc.n_layer if self.has_attention else 0,
            "n_head": mc.n_head if self.has_attention else 0,
            "has_attention": self.has_attention,
            "decode_dtype": str(resolve_decode_dtype(decode_dtype, self.model)).removeprefix("torch."),
        }


class Playground:
    """The newest checkpoint in out_dir, loaded (or none yet), and what the endpoints compute from it."""

    def __init__(self, config, log=print):
        config.validate()
        self.config, self.log = config, log
        self.device = resolve_device(config.device)
        if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
            raise ValueError(f"--out_dir {config.out_dir} is a file, not a folder")
        if not os.path.isdir(config.out_dir):  # a typo, most likely: a run creates its folder as it starts
            hint = missing_run_hint(config.out_dir) or (
                " (train a model first, or start serve.py once train.py has begun: python train.py ...)"
            )
            raise FileNotFoundError(f"--out_dir {config.out_dir} does not exist{hint}")
        self.metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
        self.run_config_path = os.path.join(config.out_dir, "config.json")  # the run's settings (train.py)
        # the server's own facts; /api/info adds the checkpoint's
        self.info = {
            "out_dir": config.out_dir,
            "device": str(self.device),
            "kv_cache": config.kv_cache,
            "limits": {
                "max_new_tokens": config.max_new_tokens_limit,
                "max_chars": config.max_chars,
                "max_generations": None,  # below, once the cores are known
                "max_queue": config.max_queue,
                "max_connections": config.max_connections or None,  # the Server's, once it knows the open files
                "timeout": config.timeout,
            },
            "defaults": {key: default for key, (_, default) in GENERATE_FIELDS.items()},
        }
        self.loaded = None  # the Loaded checkpoint, or None before a run's first one
        self.no_checkpoint = f"no checkpoint yet in {config.out_dir}: the run has not reached its first eval"
        self.notice = self.no_checkpoint  # what the page should say about the checkpoint: none yet, or one that did not load
        self.failed = None  # the stamp of a checkpoint that did not load: tried again only once it changes
        self.loading = threading.Lock()  # one load at a time; the other requests serve the model there is
        # on a CPU, each generation's threads: what other programs and the other generations leave
        # free; this thread computes with one (chargpt/machine.py: a team here slows theirs 4x)
        self.threads = Threads(config.threads) if self.device == "cpu" else None
        if self.threads is not None:
            torch.set_num_threads(1)
        # generations computing at once, and a queue for the others (docs/playground.md: measured)
        # (on 2 cores, 30 clients got the most characters a second at 1 or 2, the least at 4:
        # each generation's Python holds the GIL between its operations)
        slots = config.max_generations or (min(2, self.threads.cores) if self.threads is not None else 4)
        self.turns = Turns(slots, config.max_queue)
        self.info["limits"]["max_generations"] = slots
        self.refresh(at_start=True)  # a damaged checkpoint at the start is an error, not a notice
        # what the generations did, for the log and the tests; guarded because requests run in threads
        self.lock = threading.Lock()
        self.finished = []  # one (characters generated, characters asked for, True if the client left) per generation
        self.stopping = threading.Event()  # set by stop(): each generation ends at its next character
        self.ranked = {}  # the checkpoint's stamp -> /api/heads' answer: the ranking is computed once per checkpoint

    # -- the checkpoint: the newest in out_dir, looked for at every request

    def checkpoint_stamp(self):
        """(path, inode, size, mtime in ns) of best.pt, else ckpt.pt, else None: a stat or two,
        cheap enough for every request. train.py writes a checkpoint whole and renames it into
        place, so a new file is a new inode, and a half-written one never has these names."""
        for name in ("best.pt", "ckpt.pt"):
            path = os.path.join(self.config.out_dir, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                return (path, st.st_ino, st.st_size, st.st_mtime_ns)
        return None

    def refresh(self, at_start=False):
        """The Loaded checkpoint to answer with (or None): the one in memory, or the newer one in
        out_dir, loaded now. While one request loads it, the others answer with the old one."""
        loaded, stamp = self.loaded, self.checkpoint_stamp()
        if stamp == (loaded.stamp if loaded else None) or (stamp is not None and stamp == self.failed):
            return loaded
        if not self.loading.acquire(blocking=at_start):
            return loaded
        try:
            stamp = self.checkpoint_stamp()  # again: another request may have loaded it meanwhile
            if stamp == (self.loaded.stamp if self.loaded else None):
                return self.loaded
            if stamp is None:
                self.loaded, self.failed, self.notice = None, None, self.no_checkpoint
                self.log(f"{self.notice} (its checkpoints were removed: a new run?)")
                return None
            try:
                self.loaded = Loaded(stamp[0], stamp, self.device, self.config.decode_dtype)
            except (ValueError, OSError) as e:  # damaged, foreign, or removed as we read it
                if at_start:
                    raise
                self.failed = stamp
                old = self.loaded
                still = f"still serving step {old.info['iter_num']}, loaded earlier from {old.path}" if old else "no model yet"
                self.notice = f"{shown(str(e), 300)}; {still}"
                self.log(f"not loaded: {self.notice}")
                return self.loaded
            self.failed, self.notice = None, None
            if not at_start:  # main() says what it started with, once it listens
                self.log(f"new checkpoint: {self.loaded.description}")
            return self.loaded
        finally:
            self.loading.release()

    def checkpoint(self):
        """The Loaded checkpoint to generate with; without one, a 503 that says why."""
        loaded = self.refresh()
        if loaded is None:
            raise RequestError(503, "checkpoint", self.notice)
        return loaded

    def info_now(self):
        """/api/info's answer: the server's facts, and the checkpoint's (null fields before the first)."""
        loaded = self.refresh()
        facts = loaded.info if loaded else NO_MODEL
        return {**self.info, "generations": self.turns.counts(), "has_model": loaded is not None, "notice": self.notice, **facts}

    # -- the endpoints' work, free of HTTP

    @property
    def model(self):
        return self.loaded.model  # the model in memory now (the tests' shortcut)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def encode(self, loaded, field, text):
        """The token ids of text for the loaded checkpoint; an empty, too long or out-of-vocabulary
        text names the field."""
        if not text:
            raise RequestError(400, field, "empty: the model needs at least one character")
        if len(text) > self.config.max_chars:
            raise RequestError(
                413, field, f"{len(text)} characters, more than this server's limit of {self.config.max_chars} (--max_chars)"
            )
        try:
            return loaded.tokenizer.encode(text)
        except ValueError as e:  # names the unknown characters
            raise RequestError(400, field, str(e)) from None

    def generation(self, body):
        """(SampleConfig, prompt ids, the Loaded checkpoint to generate with) for a /api/generate body."""
        values = read_fields(body, GENERATE_FIELDS)
        limit = self.config.max_new_tokens_limit
        if not 0 <= values["max_new_tokens"] <= limit:
            raise RequestError(
                400, "max_new_tokens", f"must be in 0..{limit} (--max_new_tokens_limit), got {values['max_new_tokens']}"
            )
        if values["temperature"] < 0:
            raise RequestError(400, "temperature", f"must be 0 or more, got {values['temperature']}")
        if values["top_k"] < 0:
            raise RequestError(400, "top_k", f"must be 0 or more, got {values['top_k']}")
        if not 0 < values["top_p"] <= 1:
            raise RequestError(400, "top_p", f"must be in (0, 1], got {values['top_p']}")
        if not 0 <= values["seed"] < 2**64:  # what torch.Generator.manual_seed takes
            raise RequestError(400, "seed", f"must be in 0..2**64-1, got {values['seed']}")
        loaded = self.checkpoint()
        prompt_ids = self.encode(loaded, "prompt", values["prompt"])
        config = SampleConfig(
            start=values["prompt"],
            num_samples=1,
            max_new_tokens=values["max_new_tokens"],
            temperature=values["temperature"],
            top_k=values["top_k"],
            top_p=values["top_p"],
            seed=values["seed"],
            kv_cache=self.config.kv_cache,
            decode_dtype=self.config.decode_dtype,
        )
        return config, prompt_ids, loaded

    @torch.no_grad()
    def attention(self, body):
        """The attention weights and next-character guesses over the last block_size characters of text."""
        text = read_fields(body, ATTENTION_FIELDS)["text"]
        loaded = self.checkpoint()
        model, tokenizer = loaded.model, loaded.tokenizer
        ids = self.encode(loaded, "text", text)
        # positions are learned up to block_size: show the window the model would read last
        shown = ids[-model.config.block_size :]
        offset = len(ids) - len(shown)
        idx = torch.tensor([shown], dtype=torch.long, device=self.device)  # (1, T)
        probs = torch.softmax(model(idx)[0][0].float(), dim=-1)  # (T, V)
        top = torch.topk(probs, min(TOP, probs.shape[-1]), dim=-1)  # (T, 5) values and indices
        next_chars = [
            [{"char": tokenizer.chars[i], "prob": round(p, 4)} for p, i in zip(ps, ixs)]
            for ps, ixs in zip(top.values.tolist(), top.indices.tolist())
        ]
        weights = []
        if loaded.has_attention:
            maps = model.attention_maps(idx)  # (n_layer, nh, T, T)
            weights = maps.double().round(decimals=5).tolist()  # 5 decimals: a row still sums to 1 within 1e-4
        return {
            "chars": list(tokenizer.decode(shown)),
            "offset": offset,
            "n_layer": len(weights),
            "n_head": len(weights[0]) if weights else 0,
            "weights": weights,
            "top5": next_chars,
        }

    def lens(self, body):
        """The logit lens and the per-character loss over the last block_size + 1 characters of
        text (the model reads block_size of them; the last is the next character of the one
        before), with the heads in heads_off switched off for this request alone (chargpt/lens.py)."""
        values = read_fields(body, LENS_FIELDS)
        loaded = self.looked_into()
        ids = self.encode(loaded, "text", values["text"])
        try:
            heads_off = check_heads_off(loaded.model.config, values["heads_off"])
        except ValueError as e:
            raise RequestError(400, "heads_off", str(e)) from None
        shown = ids[-loaded.model.config.block_size - 1 :]  # a window of chargpt/evaluate.py
        return {"offset": len(ids) - len(shown), **analyse(loaded.model, loaded.tokenizer, shown, heads_off)}

    def heads(self):
        """Every head switched off in turn on a fixed slice of the val split the checkpoint was
        trained on, ranked by the loss it costs; once per checkpoint."""
        loaded = self.looked_into()
        with self.lock:
            if loaded.stamp in self.ranked:
                return self.ranked[loaded.stamp]
        try:
            val, path = val_split(loaded.info["train_config"], loaded.tokenizer.chars)
        except (OSError, ValueError) as e:
            raise RequestError(404, "dataset", f"the heads are ranked on the val split the model was trained on: {e}") from None
        x, y = val_slice(val, loaded.model.config.block_size)
        answer = finite({"split": path, "checkpoint_id": loaded.info["checkpoint_id"], **rank_heads(loaded.model, x, y)})
        with self.lock:
            self.ranked = {loaded.stamp: answer}
        return answer

    def looked_into(self):
        """The Loaded checkpoint for the lens and the heads: one with Blocks (not the bigram)."""
        loaded = self.checkpoint()
        if not loaded.has_attention:
            raise RequestError(400, "checkpoint", f"a {loaded.info['model_type']} model has no layers or heads to look into")
        return loaded

    def metrics(self):
        """metrics.jsonl's records, with non-finite numbers as null (JSON has no NaN), and the
        run's limits from its config.json: max_iters and time_budget (minutes, 0 for none)."""
        run = None
        try:
            with open(self.run_config_path, encoding="utf-8") as f:
                train_config = json.load(f)["train"]
            run = {key: train_config[key] for key in ("max_iters", "time_budget")}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no run has begun here, or its file is not train.py's: the page shows the steps alone
        return {
            "path": self.metrics_path,
            "exists": os.path.isfile(self.metrics_path),
            "run": run,
            "records": finite(read_records(self.metrics_path)),
        }

    def metrics_etag(self):
        """The sizes and times of metrics.jsonl and config.json: an unchanged pair costs the poller nothing."""
        parts = []
        for path in (self.metrics_path, self.run_config_path):
            try:
                st = os.stat(path)
                parts.append(f"{st.st_mtime_ns:x}-{st.st_size:x}")
            except OSError:
                parts.append("none")
        return '"' + ".".join(parts) + '"'

    def record(self, generated, asked, left):
        with self.lock:
            self.finished.append((generated, asked, left))

    def share_cores(self):
        """Set the calling generation's threads (a CPU only): its share of the cores that other
        programs leave free, among the generations streaming now. The number, or None."""
        if self.threads is None:
            return None
        return self.threads.adjust(streams=max(1, self.turns.counts()["computing"]))

    def stop(self, seconds=2.0):
        """End each generation at its next character, and each wait in the queue, and wait (up
        to seconds) until they have; True if they all have. Python exiting while a thread is
        still inside PyTorch aborts the process ("terminate called without an active
        exception"), so main() does not let Python exit while one is (see there)."""
        self.stopping.set()
        with self.turns.changed:
            self.turns.changed.notify_all()  # those waiting their turn hear it now
        deadline = time.monotonic() + seconds
        while any(self.turns.counts().values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return not any(self.turns.counts().values())


# what each path answers to: method -> the Handler method that answers
ROUTES = {
    "/": {"GET": "get_page"},
    "/api/info": {"GET": "get_info"},
    "/api/metrics": {"GET": "get_metrics"},
    "/api/generate": {"POST": "post_generate"},
    "/api/attention": {"POST": "post_attention"},
    "/api/lens": {"POST": "post_lens"},
    "/api/heads": {"GET": "get_heads"},
}


class Handler(BaseHTTPRequestHandler):
    server_version = "chargpt-serve"
    # a request line without a version ("GET /") is answered as HTTP/1.0 would be: HTTP/0.9's
    # answer is the body alone, with no status line a client could read the error from
    default_request_version = "HTTP/1.0"

    def __init__(self, arriving, server):
        self.arriving = arriving  # the connection as the event loop received it
        super().__init__(arriving.sock, arriving.address, server)

    def setup(self):
        self.timeout = self.server.playground.config.timeout  # the socket's, so every write waits at most this
        super().setup()
        self.rfile.close()
        deadline = self.arriving.start + self.timeout  # from the connect, not from this thread's start
        self.rfile = io.BufferedReader(RequestReader(self.connection, self.timeout, self.arriving.data, deadline))
        # what an answer needs before the request line is parsed (a client that times out in it)
        self.command, self.path, self.request_version, self.requestline = None, "", "HTTP/1.0", ""
        self.answered = False  # once a status line is out, an error can only end the connection

    # -- replies

    def send_response(self, code, message=None):
        self.answered = True
        super().send_response(code, message)

    def send_json(self, status, payload, headers=()):
        try:
            body = json.dumps(payload, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate sent as "\ud800" and quoted back: escaped, it is still JSON
            body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD request's answer has the headers alone
            self.write_body(body)

    def write_body(self, body):
        # in pieces: the socket's timeout bounds a whole sendall, and an attention map of a few
        # MB to a slow link would be cut off after --timeout seconds; a piece at a time, it is
        # cut off only when the client takes longer than that for 64 KB
        for start in range(0, len(body), STREAM_SEND_BUFFER):
            self.wfile.write(body[start : start + STREAM_SEND_BUFFER])

    def send_error_json(self, error):
        """The one line of JSON for error, and one line in the log; no more than the log line if
        an answer has begun or the client has gone."""
        self.server.playground.log(f"{shown(self.command or '-', 20)} {shown(self.path)}: {error.status} {error}")
        if self.answered:
            return
        try:
            self.send_json(error.status, {"error": str(error), "field": error.field}, headers=error.headers)
        except (ConnectionError, TimeoutError):
            pass  # it left (or stopped reading) before its answer

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a malformed request line, headers too long or
        too many) in this server's JSON, not its HTML page."""
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = 400  # a request line of HTTP/2.0 or more: what is wrong is the request, so a 4xx
        self.send_error_json(RequestError(code, "request", shown(message or HTTPStatus(code).phrase, 200)))

    def send_event(self, data, event=None):
        """One Server-Sent Event; raises a ConnectionError once the client is gone, TimeoutError
        when it has not read for --timeout seconds."""
        head = f"event: {event}\n" if event else ""
        self.wfile.write(f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, format, *args):
        pass  # one line per request would bury the useful ones (the page polls /api/metrics)

    # -- requests

    def handle_one_request(self):
        """Read one request (HTTP/1.0: one per connection) and answer it, whatever arrives: a
        one-line JSON error for anything malformed or refused, and at most a line in the log
        for a client that leaves."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                return  # connected, and closed without a word
            if len(self.raw_requestline) > 65536:
                raise RequestError(414, "path", "the request line is longer than 65,536 bytes")
            if self.parse_request():
                self.route()
            elif not self.answered:  # a blank request line, which parse_request leaves unanswered
                raise RequestError(400, "request", "an empty request line")
        except RequestError as e:
            self.send_error_json(e)
        except TimeoutError:
            if not self.answered:
                limit = f"--timeout={self.timeout:g}"
                self.send_error_json(RequestError(408, "request", f"not received in full within {limit} seconds"))
        except ConnectionError:
            pass  # the client left: nothing to answer, nothing worth a log line
        except Exception as e:  # noqa: BLE001 (a bug: say so in one line, and keep serving the others)
            where = traceback.extract_tb(e.__traceback__)[-1]
            self.server.playground.log(
                f"{shown(self.command or '-', 20)} {shown(self.path)}: 500 {type(e).__name__}: {e} "
                f"({os.path.basename(where.filename)}:{where.lineno})"
            )
            self.send_error_json(RequestError(500, "server", f"{type(e).__name__}: {e}"))

    def route(self):
        self.check_host()
        # the path alone; urlsplit would raise on some (a path of "//[" names an IPv6 host to it)
        path = self.path.split("?", 1)[0]
        methods = ROUTES.get(path)
        if methods is None:
            raise RequestError(404, "path", f"no such page or endpoint: {shown(path)}")
        if self.command not in methods:
            allowed = ", ".join(methods)
            raise RequestError(
                405,
                "method",
                f"{shown(self.command, 20)} is not allowed on {path} (only {allowed})",
                headers=[("Allow", allowed)],
            )
        getattr(self, methods[self.command])()

    def check_host(self):
        """On a loopback address, only requests that name it: a web page elsewhere that points
        its own hostname at 127.0.0.1 (DNS rebinding) must not read from this server."""
        if not self.server.loopback:
            return
        host = self.headers.get("Host", "")
        if not LOOPBACK_HOST.fullmatch(host):
            raise RequestError(403, "Host", f"'{shown(host)}' is not this machine's loopback name (use http://127.0.0.1:PORT/)")

    def read_json(self):
        if self.headers.get_content_type() != "application/json":
            # also makes another site's page ask first (CORS preflight), which this server never allows
            raise RequestError(
                415, "Content-Type", f"expected application/json, got '{shown(self.headers.get('Content-Type', ''))}'"
            )
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length", "required: the body's size in bytes")
        length = length.strip()
        if not (length.isascii() and length.isdigit()):  # isdigit alone takes "٣" and "²", which int() may refuse
            raise RequestError(400, "Content-Length", f"expected a number of bytes, got '{shown(length, 40)}'")
        digits = len(length.lstrip("0"))
        size = int(length) if digits <= 18 else math.inf  # int() refuses more than 4,300 digits
        if size > MAX_BODY_BYTES:
            shown_size = f"{size:,}" if size < math.inf else f"a {digits:,}-digit number of"
            raise RequestError(413, "body", f"{shown_size} bytes, more than the limit of {MAX_BODY_BYTES:,}")
        raw = self.rfile.read(size)
        if len(raw) < size:
            raise RequestError(400, "body", f"{len(raw):,} of its {size:,} bytes arrived before the client closed")
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5000-digit number, [[[[...]]]] nested too deep
            raise RequestError(400, "body", f"not valid JSON ({shown(str(e))})") from None

    def get_page(self):
        with open(PAGE, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.write_body(body)

    def not_modified(self, etag):
        """True, with a 304 sent, when the client already has what etag tags."""
        if self.headers.get("If-None-Match") != etag:
            return False
        self.send_response(304)
        self.send_header("ETag", etag)
        self.end_headers()
        return True

    def get_info(self):
        # polled by the page to see a new checkpoint: its content tags it, so an unchanged one is a 304
        info = self.server.playground.info_now()
        etag = '"' + hashlib.sha1(json.dumps(info).encode()).hexdigest()[:16] + '"'
        if not self.not_modified(etag):
            self.send_json(200, info, headers=[("ETag", etag), ("Cache-Control", "no-cache")])

    def get_metrics(self):
        playground = self.server.playground
        playground.refresh()  # the page polls this: a new checkpoint is loaded by the time it asks /api/info
        etag = playground.metrics_etag()
        if not self.not_modified(etag):
            self.send_json(200, playground.metrics(), headers=[("ETag", etag), ("Cache-Control", "no-cache")])

    def post_attention(self):
        self.send_json(200, self.server.playground.attention(self.read_json()))

    def post_lens(self):
        self.send_json(200, self.server.playground.lens(self.read_json()))

    def get_heads(self):
        self.send_json(200, self.server.playground.heads())

    def post_generate(self):
        playground = self.server.playground
        config, prompt_ids, loaded = playground.generation(self.read_json())
        if playground.stopping.is_set():
            raise RequestError(503, "server", "stopping (Ctrl-C)")
        # a generation keeps a core busy for as long as it streams: beyond a few at once, each
        # would only slow the others down, so the others wait their turn
        turns = playground.turns
        ticket = turns.join()
        if ticket is None:
            seconds = turns.retry_after()
            raise RequestError(
                503,
                "server",
                f"busy: {turns.max_waiting} generation(s) waiting, this server's limit (--max_queue), behind "
                f"{turns.slots} computing; try again in {seconds} s",
                headers=[("Retry-After", str(seconds))],
            )
        try:
            # a send buffer of fixed size, where the kernel would grow it to megabytes: a client that
            # stops reading blocks its generation, then ends it (--timeout), within a few thousand characters
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if self.wait_turn(ticket):
                self.stream(config, prompt_ids, loaded)
        finally:
            turns.leave(ticket)

    def wait_turn(self, ticket):
        """Wait in the queue until ticket starts, telling the client how many are ahead of it
        whenever that changes (an event "queued"); False if the client left, or the server
        stops, first."""
        playground, told, t0 = self.server.playground, None, time.monotonic()
        try:
            while True:
                ahead = playground.turns.wait(ticket, 0 if told is None else QUEUE_LOOK_SECONDS)
                if ticket.started:
                    return True
                if playground.stopping.is_set():
                    self.send_event({"error": "server: stopped (Ctrl-C)", "field": "server"}, event="error")
                    ended = "stopped (Ctrl-C)"
                    break
                if ahead != told:
                    self.send_event({"queued": ahead}, event="queued")
                    told = ahead
                if self.client_gone():
                    raise ConnectionError
        except (ConnectionError, TimeoutError):
            ended = "client left"
        playground.log(f"generate: {ended} after {time.monotonic() - t0:.2f}s in the queue")
        return False

    def client_gone(self):
        """Whether the client has closed its end: while it waits its turn nothing is written to
        it, so a read is how to see it go (a poll, not a select: no limit on the file number)."""
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            readable = bool(poller.poll(0))
        else:  # Windows
            readable = bool(select.select([self.connection], [], [], 0)[0])
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""  # b"": closed; anything else it sent is ignored
        except OSError:  # reset
            return True

    def stream(self, config, prompt_ids, loaded):
        """config's text from loaded's model, as events: a newer checkpoint that lands meanwhile
        waits for the next generation."""
        playground = self.server.playground
        generated, ended, tokens, t0 = [], "generated", None, time.time()
        threads, looked = playground.share_cores(), time.time()
        try:
            tokens = generate_tokens(loaded.model, prompt_ids, config)
            for token in tokens:  # (1,)
                if time.time() - looked > THREADS_LOOK_SECONDS:  # a program that started or stopped meanwhile
                    threads, looked = playground.share_cores(), time.time()
                if playground.stopping.is_set():  # Ctrl-C: end between two characters (Playground.stop)
                    ended = "stopped (Ctrl-C) after"
                    self.send_event({"error": "server: stopped (Ctrl-C)", "field": "server"}, event="error")
                    break
                generated.append(loaded.tokenizer.decode(token.tolist()))
                # a write to a client that has gone fails within a character or two: the
                # first lands in the socket's buffer, the peer answers with a reset
                self.send_event({"char": generated[-1]})
            else:
                seconds = time.time() - t0
                self.send_event(
                    {
                        "text": "".join(generated),
                        "chars": len(generated),
                        "seconds": round(seconds, 3),
                        "chars_per_s": round(len(generated) / max(seconds, 1e-9), 1),
                    },
                    event="done",
                )
        except ConnectionError:
            ended = "client left after"
        except TimeoutError:  # its buffers are full: a client that stopped reading must not hold its slot for ever
            ended = f"client read nothing for --timeout={self.timeout:g} s after"
        except Exception as e:  # noqa: BLE001 (a bug: the stream has begun, so say it as an event)
            playground.log(f"generate: {type(e).__name__}: {e}")
            try:
                self.send_event({"error": f"server: {type(e).__name__}: {e}", "field": "server"}, event="error")
            except OSError:
                ended = "client left after"
        finally:
            if tokens is not None:
                tokens.close()  # ends model.generate where it stands
            playground.record(len(generated), config.max_new_tokens, ended.startswith("client"))
        on = f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""
        playground.log(f"generate: {ended} {len(generated)} of {config.max_new_tokens} characters in {time.time() - t0:.2f}s{on}")


class Server(connections.Server):
    """The playground's HTTP server: chargpt/connections.py's event loop in front, and Handler
    answering each request from the playground, in a thread of its own."""

    def __init__(self, playground, max_connections=None):
        super().__init__(playground.config, Handler, playground.log, max_connections)
        self.playground = playground
        playground.info["limits"]["max_connections"] = self.max_connections


def stop_now(signum, frame):
    raise KeyboardInterrupt  # SIGTERM while loading, as Ctrl-C: serve_forever handles both itself later


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    log_lock = threading.Lock()

    def log(message):
        with log_lock:  # requests log from threads of their own: print writes the line and its end apart
            print(message, file=sys.stderr, flush=True)

    try:
        (config,), _ = parse(argv, [ServeConfig()], "serve.py [--key=value ...]", config_file=False)
        playground = Playground(config, log)
        cap, limits = check_open_files(config)
        server = Server(playground, cap)
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # stopped before it served: nothing to end
    if playground.loaded is None:
        log(f"{playground.notice}: the page shows the run's metrics until best.pt or ckpt.pt lands")
    else:
        log(playground.loaded.description)
    slots = playground.turns.slots
    log(f"{limits}; generations: {slots} computing at once (--max_generations), {config.max_queue} waiting (--max_queue)")
    if not server.loopback:
        log(f"listening on {config.host}: anyone who can reach this machine can use the playground")
    print(f"playground at {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever(signals=(signal.SIGINT, signal.SIGTERM))
    finally:
        ended = playground.stop(seconds=2.0)  # the streams end between two characters, with an error event
        server.server_close()  # a stream blocked on a client that reads nothing fails now
        ended = ended or playground.stop(seconds=2.0)
    if not ended:
        # a generation still inside PyTorch: Python's exit would wait on it or abort under it
        log("stopped with a generation still computing: exiting without it")
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    # Ctrl-C and SIGTERM while the checkpoint loads, even where our parent ignored SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_now)
    sys.exit(main())
