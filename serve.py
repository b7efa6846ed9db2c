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
                           -> Server-Sent Events: one {"char": ...} per character, then an event "done"
    POST /api/attention    {"text": ...} -> the characters, weights[layer][head][t][s] and the top-5
                           next characters at each position

Generation is sample.py's own (chargpt/engine.py's generate_tokens): the same settings and seed give the
same text. Bad input is a 4xx with one line of JSON, {"error": "FIELD: what is wrong", "field": FIELD}.

Built on the standard library's ThreadingHTTPServer: nothing to install beyond requirements.txt
(the README says why). Each request runs in its own thread; the model is only read (eval mode,
no_grad), and each generation has its own torch.Generator and KV cache, so clients need no lock
and each gets its own stream. A client that goes away mid-stream ends its generation at the
next character written.

Limits, so that a few clients cannot stop it for everyone (each one a flag):
    --timeout            seconds a client has to send its whole request, and that a reply waits on
                         a client that does not read; then its connection is closed
    --max_connections    connections served at once (a thread and an open file each); beyond it
                         a client gets 503 and Retry-After at once
    --max_generations    generations streamed at once; beyond it /api/generate answers 503 and Retry-After
Connects beyond what accept() has taken wait in a listen backlog of SOMAXCONN, not socketserver's 5.

On a CPU each generation takes its share of the cores that other programs (the browser
showing the page, among them) leave free, looked at when it starts and every second after
(--threads=0, the default; chargpt/machine.py says why): two threads on a core that another
program keeps busy wait for each other at every step.
"""

import errno
import hashlib
import io
import ipaddress
import json
import math
import os
import re
import socket
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from chargpt.checkpoint import load_checkpoint, model_from_checkpoint
from chargpt.config import DECODE_DTYPE_NAMES, HelpRequested, SampleConfig, check_choice, knob, parse
from chargpt.engine import generate_tokens, resolve_decode_dtype
from chargpt.machine import Threads, resolve_device
from chargpt.metrics import read_records
from chargpt.rundir import missing_run_hint

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chargpt", "playground.html")
MAX_BODY_BYTES = 1 << 20  # a request body, before it is even parsed
TOP = 5  # next-character guesses shown per position
STREAM_SEND_BUFFER = 64 * 1024  # bytes: a stream's send buffer (a character's event is about 20), a reply's pieces
THREADS_LOOK_SECONDS = 1.0  # how often a streaming generation looks again at the cores left free
RETRY_AFTER = "1"  # seconds a 503 asks a client to wait: a stream ends, or a connection closes, that often
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
        128, "connections served at once, a thread and an open file each; beyond it a client gets 503 at once"
    )
    max_generations: int = knob(
        4, "generations streamed at once, each busy on the CPU or GPU; beyond it /api/generate answers 503"
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
        for key in ("max_new_tokens_limit", "max_chars", "max_connections", "max_generations"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1, got {getattr(self, key)}")


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
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}


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

    def describe(self):
        """'out/best.pt: gpt, 112,193 parameters, step 1500, best val loss 1.7410'"""
        info = self.info
        loss = "" if info["best_val_loss"] is None else f", best val loss {info['best_val_loss']:.4f}"
        return f"{self.path}: {info['model_type']}, {info['params']:,} parameters, step {info['iter_num']}{loss}"


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
                "max_generations": config.max_generations,
                "max_connections": config.max_connections,
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
        self.refresh(at_start=True)  # a damaged checkpoint at the start is an error, not a notice
        # what the generations did, for the log and the tests; guarded because requests run in threads
        self.lock = threading.Lock()
        self.running = 0
        self.slots = threading.BoundedSemaphore(config.max_generations)  # one per generation streaming now
        self.finished = []  # one (characters generated, characters asked for, True if the client left) per generation
        self.stopping = threading.Event()  # set by stop(): each generation ends at its next character

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
                self.log(f"new checkpoint: {self.loaded.describe()}")
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
        return {**self.info, "has_model": loaded is not None, "notice": self.notice, **(loaded.info if loaded else NO_MODEL)}

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
            self.running -= 1
            self.finished.append((generated, asked, left))

    def share_cores(self):
        """Set the calling generation's threads (a CPU only): its share of the cores that other
        programs leave free, among the generations streaming now. The number, or None."""
        if self.threads is None:
            return None
        with self.lock:
            running = self.running
        return self.threads.adjust(streams=max(1, running))

    def stop(self, seconds=10.0):
        """End each generation at its next character, and wait (up to seconds) until they have:
        Python exiting while a thread is still inside PyTorch aborts the process ("terminate
        called without an active exception")."""
        self.stopping.set()
        deadline = time.monotonic() + seconds
        while self.running and time.monotonic() < deadline:
            time.sleep(0.01)


class RequestReader(io.RawIOBase):
    """A connection's bytes, all due by one deadline: a client that sends its request a byte at
    a time cannot hold a thread longer than one that sends nothing (a socket's own timeout
    starts afresh at every byte). Writes keep the plain timeout."""

    def __init__(self, sock, seconds):
        self.sock, self.seconds, self.deadline = sock, seconds, time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.seconds)


# what each path answers to: method -> the Handler method that answers
ROUTES = {
    "/": {"GET": "get_page"},
    "/api/info": {"GET": "get_info"},
    "/api/metrics": {"GET": "get_metrics"},
    "/api/generate": {"POST": "post_generate"},
    "/api/attention": {"POST": "post_attention"},
}


class Handler(BaseHTTPRequestHandler):
    server_version = "chargpt-serve"
    # a request line without a version ("GET /") is answered as HTTP/1.0 would be: HTTP/0.9's
    # answer is the body alone, with no status line a client could read the error from
    default_request_version = "HTTP/1.0"

    def setup(self):
        self.timeout = self.server.playground.config.timeout  # the socket's, so every write waits at most this
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(RequestReader(self.connection, self.timeout))
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

    def post_generate(self):
        playground = self.server.playground
        config, prompt_ids, loaded = playground.generation(self.read_json())
        # a generation keeps a core busy for as long as it streams: beyond a few at once, each
        # would only slow the others down
        if playground.stopping.is_set():
            raise RequestError(503, "server", "stopping (Ctrl-C)")
        if not playground.slots.acquire(blocking=False):
            n = playground.config.max_generations
            raise RequestError(
                503,
                "server",
                f"busy: {n} generation(s) streaming, this server's limit (--max_generations); try again in {RETRY_AFTER} s",
                headers=[("Retry-After", RETRY_AFTER)],
            )
        try:
            self.stream(config, prompt_ids, loaded)
        finally:
            playground.slots.release()

    def stream(self, config, prompt_ids, loaded):
        """config's text from loaded's model, as events: a newer checkpoint that lands meanwhile
        waits for the next generation."""
        playground = self.server.playground
        # a send buffer of fixed size, where the kernel would grow it to megabytes: a client that
        # stops reading blocks its generation, then ends it (--timeout), within a few thousand characters
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        generated, ended, tokens, t0 = [], "generated", None, time.time()
        with playground.lock:
            playground.running += 1
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


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream still open does not keep Ctrl-C waiting (Playground.stop ends it first)
    # the listen backlog: a burst of connects waits there for accept(), where socketserver's
    # 5 made the rest wait for their SYN to be sent again a second later (the kernel caps it
    # at net.core.somaxconn)
    request_queue_size = socket.SOMAXCONN

    def __init__(self, playground):
        host, port = playground.config.host, playground.config.port
        if ":" in host:
            self.address_family = socket.AF_INET6  # an IPv6 address such as ::1
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on --host={host} --port={port}: {e.strerror or e}") from None
        self.playground = playground
        try:
            self.loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = host == "localhost"
        self.connections = threading.BoundedSemaphore(playground.config.max_connections)  # one per request thread
        self.quiet_until = 0.0  # the accept loop's warnings: at most one every 10 s

    @property
    def url(self):
        host = self.playground.config.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # what this machine's browser can open
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}/"

    def warn(self, message):
        now = time.monotonic()
        if now >= self.quiet_until:  # a flood of refused connects is a line, not a line each
            self.quiet_until = now + 10
            self.playground.log(message)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # out of open files: the connect stays in the backlog, so select() would wake
                # this loop again at once and spin a core until a file closes
                self.warn(
                    f"accept: {e.strerror}: new connections wait (--max_connections={self.playground.config.max_connections})"
                )
                time.sleep(0.1)
            raise  # socketserver drops the attempt and selects again

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)  # a thread of its own
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def refuse(self, request):
        """503 and close, from the accept loop itself: no thread, and no wait for the request,
        so that idle connections cannot use up the threads or the open files."""
        n = self.playground.config.max_connections
        body = json.dumps(
            {
                "error": f"server: busy: {n} connections open, this server's limit (--max_connections); "
                f"try again in {RETRY_AFTER} s",
                "field": "server",
            }
        ).encode()
        head = (
            f"HTTP/1.0 503 Service Unavailable\r\nServer: {Handler.server_version}\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: {RETRY_AFTER}\r\n\r\n"
        ).encode()
        try:
            request.setblocking(False)  # a fresh socket's buffer takes these few hundred bytes at once
            request.send(head + body)
        except OSError:
            pass
        self.shutdown_request(request)
        self.warn(f"busy: {n} connections open (--max_connections): answering new ones 503")

    def handle_error(self, request, client_address):
        """One line for what escaped a request's thread, not the standard library's traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, (ConnectionError, TimeoutError)):
            return  # a client gone or silent: not worth a line
        where = traceback.extract_tb(e.__traceback__)[-1]
        self.playground.log(f"{client_address[0]}: {type(e).__name__}: {e} ({os.path.basename(where.filename)}:{where.lineno})")


def open_files_for(max_connections):
    """Raise this process's soft limit on open files, if need be, so that --max_connections
    connections and the files the server itself holds fit in it."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return
    need = max_connections + 100  # the checkpoint, the page, the log, PyTorch's own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ValueError(
            f"--max_connections={max_connections} needs {need} open files, more than this system allows "
            f"a process ({hard}, ulimit -Hn)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    log_lock = threading.Lock()

    def log(message):
        with log_lock:  # requests log from threads of their own: print writes the line and its end apart
            print(message, file=sys.stderr, flush=True)

    try:
        (config,), _ = parse(argv, [ServeConfig()], "serve.py [--key=value ...]", config_file=False)
        playground = Playground(config, log)
        open_files_for(config.max_connections)
        server = Server(playground)
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
    if playground.loaded is None:
        log(f"{playground.notice}: the page shows the run's metrics until best.pt or ckpt.pt lands")
    else:
        log(playground.loaded.describe())
    if not server.loopback:
        log(f"listening on {config.host}: anyone who can reach this machine can use the playground")
    print(f"playground at {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        playground.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
