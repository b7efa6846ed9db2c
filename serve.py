"""A playground in the browser: write with a trained checkpoint and see what each character attends to.

    python serve.py --out_dir out                  # prints the URL: open it in a browser
    python serve.py --out_dir out --port 8000      # a fixed port (default: a free one)
    python serve.py --out_dir out --host 0.0.0.0   # reachable from other machines: see the README first
    python serve.py --help

One checkpoint (out_dir/best.pt, else ckpt.pt) is loaded once and shared by every request.
The page, chargpt/playground.html, talks to a small JSON API that curl can call too:

    GET  /                 the page
    GET  /api/info         the checkpoint's facts (configs, parameters, step, best val loss) and the server's limits
    GET  /api/metrics      the records of out_dir/metrics.jsonl (a run writing there shows up live)
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
"""

import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from chargpt.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from chargpt.config import DECODE_DTYPE_NAMES, HelpRequested, SampleConfig, check_choice, knob, parse
from chargpt.engine import generate_tokens, resolve_decode_dtype
from chargpt.machine import resolve_device
from chargpt.metrics import read_records

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chargpt", "playground.html")
MAX_BODY_BYTES = 1 << 20  # a request body, before it is even parsed
TOP = 5  # next-character guesses shown per position


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

    def validate(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        check_choice("decode_dtype", self.decode_dtype, ("auto", *DECODE_DTYPE_NAMES))
        for key in ("max_new_tokens_limit", "max_chars"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1, got {getattr(self, key)}")


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a one-line message naming the field."""

    def __init__(self, status, field, message):
        super().__init__(f"{field}: {message}")
        self.status, self.field = status, field


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


def read_fields(body, fields):
    """The fields of a parsed JSON body, typed and with defaults; unknown, missing or
    mistyped ones are a RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "body", f"expected a JSON object with the fields {', '.join(fields)}")
    for key in body:
        if key not in fields:
            raise RequestError(400, key, f"unknown field (expected {', '.join(fields)})")
    values = {}
    for key, (typ, default) in fields.items():
        value = body.get(key, default)
        if value is None:
            raise RequestError(400, key, "missing" if key not in body else f"expected {TYPE_NAMES[typ]}, got null")
        if typ is float and type(value) is int:  # an integer is fine where a number is expected
            value = float(value) if abs(value) < 1e300 else math.inf  # 1e400 written out is still no temperature
        if type(value) is not typ:  # bool is not an int here: true is no seed
            raise RequestError(400, key, f"expected {TYPE_NAMES[typ]}, got {json.dumps(value)[:40]}")
        if typ is float and not math.isfinite(value):
            raise RequestError(400, key, f"expected a finite number, got {value}")
        values[key] = value
    return values


class Playground:
    """One checkpoint, loaded once, and what the endpoints compute from it."""

    def __init__(self, config, log=print):
        config.validate()
        self.config, self.log = config, log
        self.device = resolve_device(config.device)
        self.path = find_checkpoint(config.out_dir)
        checkpoint = load_checkpoint(self.path, self.device)
        self.model, self.tokenizer = model_from_checkpoint(checkpoint, self.device, self.path)
        self.has_attention = hasattr(self.model, "attention_maps")  # the bigram model has none
        mc = self.model.config
        self.info = {
            "checkpoint": self.path,
            "model_type": mc.model_type,
            "model_config": checkpoint["model_config"],
            "train_config": checkpoint.get("train_config", {}),
            "params": self.model.num_params(),
            "iter_num": checkpoint["iter_num"],
            "best_val_loss": checkpoint.get("best_val_loss"),
            "vocab": self.tokenizer.chars,
            "block_size": mc.block_size,
            "n_layer": mc.n_layer if self.has_attention else 0,
            "n_head": mc.n_head if self.has_attention else 0,
            "has_attention": self.has_attention,
            "device": str(self.device),
            "decode_dtype": str(resolve_decode_dtype(config.decode_dtype, self.model)).removeprefix("torch."),
            "kv_cache": config.kv_cache,
            "limits": {"max_new_tokens": config.max_new_tokens_limit, "max_chars": config.max_chars},
            "defaults": {key: default for key, (_, default) in GENERATE_FIELDS.items()},
        }
        if self.info["best_val_loss"] is not None and not math.isfinite(self.info["best_val_loss"]):
            self.info["best_val_loss"] = None  # inf before the first eval; JSON has no inf
        self.metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
        # what the generations did, for the log and the tests; guarded because requests run in threads
        self.lock = threading.Lock()
        self.running = 0
        self.finished = []  # one (characters generated, characters asked for, True if the client left) per generation

    # -- the endpoints' work, free of HTTP

    def encode(self, field, text):
        """The token ids of text; an empty, too long or out-of-vocabulary text names the field."""
        if not text:
            raise RequestError(400, field, "empty: the model needs at least one character")
        if len(text) > self.config.max_chars:
            raise RequestError(
                413, field, f"{len(text)} characters, more than this server's limit of {self.config.max_chars} (--max_chars)"
            )
        try:
            return self.tokenizer.encode(text)
        except ValueError as e:  # names the unknown characters
            raise RequestError(400, field, str(e)) from None

    def generation(self, body):
        """(SampleConfig, prompt ids) for a /api/generate body."""
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
        prompt_ids = self.encode("prompt", values["prompt"])
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
        return config, prompt_ids

    @torch.no_grad()
    def attention(self, body):
        """The attention weights and next-character guesses over the last block_size characters of text."""
        text = read_fields(body, ATTENTION_FIELDS)["text"]
        ids = self.encode("text", text)
        # positions are learned up to block_size: show the window the model would read last
        shown = ids[-self.model.config.block_size :]
        offset = len(ids) - len(shown)
        idx = torch.tensor([shown], dtype=torch.long, device=self.device)  # (1, T)
        probs = torch.softmax(self.model(idx)[0][0].float(), dim=-1)  # (T, V)
        top = torch.topk(probs, min(TOP, probs.shape[-1]), dim=-1)  # (T, 5) values and indices
        next_chars = [
            [{"char": self.tokenizer.chars[i], "prob": round(p, 4)} for p, i in zip(ps, ixs)]
            for ps, ixs in zip(top.values.tolist(), top.indices.tolist())
        ]
        weights = []
        if self.has_attention:
            maps = self.model.attention_maps(idx)  # (n_layer, nh, T, T)
            weights = maps.double().round(decimals=5).tolist()  # 5 decimals: a row still sums to 1 within 1e-4
        return {
            "chars": list(self.tokenizer.decode(shown)),
            "offset": offset,
            "n_layer": len(weights),
            "n_head": len(weights[0]) if weights else 0,
            "weights": weights,
            "top5": next_chars,
        }

    def metrics(self):
        """metrics.jsonl's records, with non-finite numbers as null (JSON has no NaN)."""
        records = read_records(self.metrics_path)
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
        return {
            "path": self.metrics_path,
            "exists": os.path.isfile(self.metrics_path),
            "records": [{k: clean(v) for k, v in r.items()} for r in records],
        }

    def record(self, generated, asked, left):
        with self.lock:
            self.running -= 1
            self.finished.append((generated, asked, left))


class Handler(BaseHTTPRequestHandler):
    server_version = "chargpt-serve"

    # -- replies

    def send_json(self, status, payload, headers=()):
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, error):
        self.send_json(error.status, {"error": str(error), "field": error.field})
        self.server.playground.log(f"{self.command} {self.path}: {error.status} {error}")

    def send_event(self, data, event=None):
        """One Server-Sent Event; raises BrokenPipeError/ConnectionResetError once the client is gone."""
        head = f"event: {event}\n" if event else ""
        self.wfile.write(f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, format, *args):
        pass  # one line per request would bury the useful ones (the page polls /api/metrics)

    # -- requests

    def check_host(self):
        """On a loopback address, only requests that name it: a web page elsewhere that points
        its own hostname at 127.0.0.1 (DNS rebinding) must not read from this server."""
        if not self.server.loopback:
            return
        host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        if host not in ("localhost", "127.0.0.1", "::1"):
            raise RequestError(403, "Host", f"{host!r} is not this machine's loopback name (use http://127.0.0.1:PORT/)")

    def read_json(self):
        if self.headers.get_content_type() != "application/json":
            # also makes another site's page ask first (CORS preflight), which this server never allows
            raise RequestError(415, "Content-Type", f"expected application/json, got {self.headers.get('Content-Type')!r}")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "body", "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, "body", f"{int(length):,} bytes, more than the limit of {MAX_BODY_BYTES:,}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5000-digit number, [[[[...]]]] nested too deep
            raise RequestError(400, "body", f"not valid JSON ({str(e)[:80]})") from None

    def do_GET(self):
        self.handle_request({"/": self.get_page, "/api/info": self.get_info, "/api/metrics": self.get_metrics})

    def do_POST(self):
        self.handle_request({"/api/generate": self.post_generate, "/api/attention": self.post_attention})

    def handle_request(self, routes):
        path = urlsplit(self.path).path
        try:
            self.check_host()
            if path not in routes:
                known = {"/", "/api/info", "/api/metrics", "/api/generate", "/api/attention"}
                if path in known:
                    raise RequestError(405, "method", f"{self.command} is not allowed on {path}")
                raise RequestError(404, "path", f"no such page or endpoint: {path}")
            routes[path]()
        except RequestError as e:
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nothing to answer
        except Exception as e:  # a bug: say so, and keep serving the others
            self.server.playground.log(f"{self.command} {path}: 500 {type(e).__name__}: {e}")
            self.send_json(500, {"error": f"server: {type(e).__name__}: {e}", "field": "server"})

    def get_page(self):
        with open(PAGE, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def get_info(self):
        self.send_json(200, self.server.playground.info)

    def get_metrics(self):
        playground = self.server.playground
        try:  # the file's size and time tag its content: an unchanged file costs the poller nothing
            stat = os.stat(playground.metrics_path)
            etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        except FileNotFoundError:
            etag = '"none"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self.send_json(200, playground.metrics(), headers=[("ETag", etag), ("Cache-Control", "no-cache")])

    def post_attention(self):
        self.send_json(200, self.server.playground.attention(self.read_json()))

    def post_generate(self):
        playground = self.server.playground
        config, prompt_ids = playground.generation(self.read_json())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        tokens = generate_tokens(playground.model, prompt_ids, config)
        generated, left, t0 = [], False, time.time()
        with playground.lock:
            playground.running += 1
        try:
            for token in tokens:  # (1,)
                generated.append(playground.tokenizer.decode(token.tolist()))
                # a write to a client that has gone fails within a character or two: the
                # first lands in the socket's buffer, the peer answers with a reset
                self.send_event({"char": generated[-1]})
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
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            left = True
        except Exception as e:  # a bug: the stream has begun, so say it as an event
            playground.log(f"generate: {type(e).__name__}: {e}")
            try:
                self.send_event({"error": f"server: {type(e).__name__}: {e}", "field": "server"}, event="error")
            except OSError:
                left = True
        finally:
            tokens.close()  # ends model.generate where it stands
            playground.record(len(generated), config.max_new_tokens, left)
        what = "client left after" if left else "generated"
        playground.log(f"generate: {what} {len(generated)} of {config.max_new_tokens} characters in {time.time() - t0:.2f}s")


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream still open does not keep Ctrl-C waiting

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

    @property
    def url(self):
        host = self.playground.config.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"  # what this machine's browser can open
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}/"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        (config,), _ = parse(argv, [ServeConfig()], "serve.py [--key=value ...]", config_file=False)
        playground = Playground(config, log)
        server = Server(playground)
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
    info = playground.info
    loss = "" if info["best_val_loss"] is None else f", best val loss {info['best_val_loss']:.4f}"
    log(f"{playground.path}: {info['model_type']}, {info['params']:,} parameters, step {info['iter_num']}{loss}")
    if not server.loopback:
        log(f"listening on {config.host}: anyone who can reach this machine can use the playground")
    print(f"playground at {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
