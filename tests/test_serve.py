"""serve.py: the playground's API on a tiny trained checkpoint, served in-process on a free
port, and the page itself driven by a real headless Chromium."""

import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

import sample
import serve
import train
from chargpt.atomic import write_atomic
from chargpt.checkpoint import save_checkpoint
from chargpt.config import SampleConfig
from chargpt.connections import FEW_CONNECTIONS, MAX_CONNECTIONS
from chargpt.engine import generate_tokens
from chargpt.metrics import read_records
from conftest import ROOT, tiny_configs, train_tiny

LIMIT = 100_000  # max_new_tokens_limit of the test server: room for a generation that only a disconnect ends


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    from prepare import prepare

    root = tmp_path_factory.mktemp("serve")
    prepare(text, str(root / "data" / "tiny"))
    train.train(
        *tiny_configs(str(root / "data"), root / "out", max_iters=60, sample_chars=0, eval_sample_chars=30), log=lambda m: None
    )
    shutil.rmtree(root / "data")  # serving must not need the dataset
    return root / "out"


def start_server(out_dir, log=lambda m: None, accept=True, **overrides):
    # room for test_concurrent_clients_each_get_their_own_stream's six streams at once
    overrides = {"max_generations": 8, **overrides}
    config = serve.ServeConfig(out_dir=str(out_dir), device="cpu", max_new_tokens_limit=LIMIT, max_chars=500, **overrides)
    server = serve.Server(serve.Playground(config, log=log))
    if accept:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextlib.contextmanager
def running(out_dir, **overrides):
    """A server of its own, for a test that changes its limits."""
    server = start_server(out_dir, **overrides)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server(trained):
    server = start_server(trained)
    yield server
    server.shutdown()
    server.server_close()


def call(server, method, path, body=None, raw=None, headers=None):
    """(status, headers, parsed JSON or bytes) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        payload = json.loads(payload)
    return response.status, response, payload


def events(server, **body):
    """The Server-Sent Events of one /api/generate, as (event, data) pairs."""
    status, response, payload = call(server, "POST", "/api/generate", body)
    assert status == 200 and response.getheader("Content-Type").startswith("text/event-stream"), payload
    parsed = []
    for block in payload.decode().split("\n\n")[:-1]:
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        parsed.append((lines.get("event", "message"), json.loads(lines["data"])))
    return parsed


def request_bytes(method, path, body=b"", host="127.0.0.1", content_type="application/json"):
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def send_raw(server, data, timeout=60, receive_buffer=None):
    """A socket connected to the server that has sent data, for what http.client will not send."""
    client = socket.socket()
    if receive_buffer:  # set before connecting, so the window the server sees is small from the start
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    client.settimeout(timeout)
    client.connect(("127.0.0.1", server.server_address[1]))
    client.sendall(data)
    return client


def open_stream(server, max_new_tokens=LIMIT, seed=3):
    """(socket, bytes received): a generation of KING:'s continuation that has begun to stream
    (three characters in) and goes on while the test does something else."""
    body = json.dumps({"prompt": "KING:", "max_new_tokens": max_new_tokens, "seed": seed}).encode()
    streaming = send_raw(server, request_bytes("POST", "/api/generate", body))
    received = b""
    while received.count(b"data: ") < 3:
        received += streaming.recv(4096)
    return streaming, received


def read_reply(client):
    """(status, {header: value} with lower-case names, body) of all the server sends before it closes."""
    with client:
        reply = client.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def wait_for(condition, what):
    deadline = time.time() + 60  # a bound for a stuck server, not a measurement
    while not condition():
        assert time.time() < deadline, f"no {what} within a minute"
        time.sleep(0.02)


def streamed_text(server, **body):
    stream = [(event, data) for event, data in events(server, **body) if event != "queued"]  # a wait for its turn
    chars = [data["char"] for event, data in stream[:-1]]
    assert all(event == "message" and len(c) == 1 for (event, _), c in zip(stream, chars))
    event, done = stream[-1]
    assert event == "done" and done["text"] == "".join(chars) and done["chars"] == len(chars)
    return "".join(chars)


def test_page_and_info(server):
    status, response, page = call(server, "GET", "/")
    assert status == 200 and response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert b"<canvas" in page and b"http" not in page.split(b"<script>")[1]  # nothing loaded from elsewhere
    status, _, info = call(server, "GET", "/api/info")
    assert status == 200 and info["model_type"] == "gpt" and info["n_layer"] == 2 and info["n_head"] == 2
    assert info["iter_num"] == 60 and info["params"] == server.playground.model.num_params() > 0
    assert info["block_size"] == 16 and info["vocab"] == server.playground.tokenizer.chars
    assert info["limits"] == {
        "max_new_tokens": LIMIT,
        "max_chars": 500,
        "max_generations": 8,
        "max_queue": 64,
        "max_connections": server.max_connections,
        "timeout": 10.0,
    }
    assert 8 <= server.max_connections <= MAX_CONNECTIONS  # as many as this process's open files allow
    assert info["generations"] == {"computing": 0, "waiting": 0}


def test_streamed_text_is_sample_pys(server, trained, capsys):
    """The same settings and seed give sample.py's text, past block_size (16) too, where the
    KV cache is rebuilt."""
    settings = {"max_new_tokens": 40, "temperature": 0.9, "top_k": 10, "top_p": 0.95, "seed": 7}
    text = streamed_text(server, prompt="ROMEO:", **settings)
    flags = [f"--{key}={value}" for key, value in settings.items()]
    assert sample.main([f"--out_dir={trained}", "--start=ROMEO:", "--device=cpu", *flags]) == 0
    assert capsys.readouterr().out == "ROMEO:" + text + "\n"
    # and with sample.py's defaults for every field left out
    default = streamed_text(server, prompt="KING:", max_new_tokens=20)
    assert sample.main([f"--out_dir={trained}", "--start=KING:", "--device=cpu", "--max_new_tokens=20"]) == 0
    assert capsys.readouterr().out == "KING:" + default + "\n"
    assert streamed_text(server, prompt="KING:", max_new_tokens=0) == ""


def test_a_temperature_and_top_p_that_underflow_stream_the_greedy_text(trained):
    """1e-310 and 5e-324 pass the fields' checks and are 0 in float32: the stream is the greedy
    text, where it was a RuntimeError from torch.multinomial. (Decoded in float32: float16,
    bfloat16 and int8 logits tie often enough that a near-argmax draw may pick the other one.)"""
    with running(trained, decode_dtype="float32") as server:
        greedy = streamed_text(server, prompt="ROMEO:", max_new_tokens=30, temperature=0)
        assert streamed_text(server, prompt="ROMEO:", max_new_tokens=30, temperature=1e-310, top_p=5e-324) == greedy


def test_attention_rows_sum_to_one_and_match_attention_maps(server):
    playground, text = server.playground, "ROMEO:\nthe king"
    status, _, answer = call(server, "POST", "/api/attention", {"text": text})
    assert status == 200 and answer["chars"] == list(text) and answer["offset"] == 0
    weights = torch.tensor(answer["weights"], dtype=torch.float64)  # (n_layer, nh, T, T)
    assert weights.shape == (2, 2, len(text), len(text)) and (answer["n_layer"], answer["n_head"]) == (2, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, len(text), dtype=torch.float64), atol=1e-4, rtol=0)
    idx = torch.tensor([playground.tokenizer.encode(text)])
    torch.testing.assert_close(weights, playground.model.attention_maps(idx).double(), atol=1e-5, rtol=0)
    # the top-5 next characters at each position are the model's own most likely ones
    probs = torch.softmax(playground.model(idx)[0][0], dim=-1)  # (T, V)
    for t, guesses in enumerate(answer["top5"]):
        assert len(guesses) == 5 and [g["prob"] for g in guesses] == sorted((g["prob"] for g in guesses), reverse=True)
        best = probs[t].argmax().item()
        assert guesses[0]["char"] == playground.tokenizer.chars[best]
        assert guesses[0]["prob"] == pytest.approx(probs[t, best].item(), abs=1e-4)


def test_attention_of_a_long_text_shows_its_last_block(server):
    text = "KING:\nthe king and queen of rome"
    status, _, answer = call(server, "POST", "/api/attention", {"text": text})
    assert status == 200 and answer["chars"] == list(text[-16:]) and answer["offset"] == len(text) - 16
    assert len(answer["weights"][0][0]) == 16


def test_lens_ends_with_the_models_own_guess_and_heads_off_live_in_the_request(server):
    playground, text = server.playground, "ROMEO:\nthe king"
    before = {k: v.clone() for k, v in playground.model.state_dict().items()}
    status, _, lens = call(server, "POST", "/api/lens", {"text": text})
    assert status == 200 and lens["chars"] == list(text) and lens["offset"] == 0 and lens["heads_off"] == []
    assert lens["layers"] == ["embeddings", "Block 0", "Block 1"] and lens["through"] == "ln_f and lm_head"
    attention = call(server, "POST", "/api/attention", {"text": text})[2]
    assert [rows[-1]["top5"] for rows in lens["lens"]] == attention["top5"]  # the last layer: the model's own top-5
    assert len(lens["loss"]) == len(text) - 1 and lens["loss"] == lens["loss_intact"]
    assert lens["lens"][-1][-1]["next"] is None and lens["lens"][0][-1]["next"] > 0
    # a head off, in this request alone: the loss moves, the next request without it does not
    status, _, off = call(server, "POST", "/api/lens", {"text": text, "heads_off": [[1, 0], [0, 1]]})
    assert status == 200 and off["heads_off"] == [[0, 1], [1, 0]] and off["loss_intact"] == lens["loss"]
    assert off["loss"] != lens["loss"] and off["lens"][0][0] == lens["lens"][0][0]  # the embeddings are not a head's
    assert call(server, "POST", "/api/lens", {"text": text})[2]["loss"] == lens["loss"]
    assert all(torch.equal(v, before[k]) for k, v in playground.model.state_dict().items())
    # a text longer than block_size: its last block_size + 1 characters, a window of eval.py's
    long = "KING:\nthe king and queen of rome"
    answer = call(server, "POST", "/api/lens", {"text": long})[2]
    assert answer["chars"] == list(long[-17:]) and answer["offset"] == len(long) - 17 and len(answer["lens"]) == 16
    assert len(answer["loss"]) == 16 and answer["lens"][-1][-1]["next"] > 0  # the 17th: the 16th's next character


def test_heads_are_ranked_on_the_val_split_once_per_checkpoint(tmp_path, data_dir):
    from types import SimpleNamespace

    from chargpt.data import load_dataset
    from chargpt.lens import rank_heads, val_slice

    train_tiny(data_dir, tmp_path / "out", max_iters=20)
    with running(tmp_path / "out") as server:
        status, _, ranked = call(server, "GET", "/api/heads")
        assert status == 200 and ranked["split"].endswith(os.path.join("tiny", "val.bin")) and ranked["passes"] == 5
        assert [(h["layer"], h["head"]) for h in ranked["heads"]] != [] and len(ranked["heads"]) == 4
        val = load_dataset(SimpleNamespace(data_dir=data_dir, dataset="tiny"))[1]
        expected = rank_heads(server.playground.model, *val_slice(val, 16))
        assert [(h["layer"], h["head"], h["loss"]) for h in ranked["heads"]] == [
            (h["layer"], h["head"], h["loss"]) for h in expected["heads"]
        ]
        assert ranked["batch"] == [32, 16] and ranked["loss"] == expected["loss"]
        assert call(server, "GET", "/api/heads")[2] == ranked  # computed once: the same answer, its seconds too


@pytest.mark.parametrize(
    "method, path, body, status, field, message",
    [
        ("POST", "/api/generate", b"{not json", 400, "body", "not valid JSON"),
        ("POST", "/api/generate", b'["ROMEO"]', 400, "body", "expected a JSON object"),
        ("POST", "/api/generate", b'{"prompt": "KING", "temperature": NaN}', 400, "temperature", "finite"),
        ("POST", "/api/generate", b'{"prompt": "KING", "temperature": 1' + b"0" * 400 + b"}", 400, "temperature", "finite"),
        ("POST", "/api/generate", b'{"seed": 1' + b"0" * 5000 + b"}", 400, "body", "not valid JSON"),
        ("POST", "/api/generate", b"[" * 100_000, 400, "body", "not valid JSON"),
        ("POST", "/api/generate", b'{"prompt": "\xff"}', 400, "body", "not valid JSON"),
        ("POST", "/api/generate", {"prompt": "ROMEO ✓ §"}, 400, "prompt", "not in the vocabulary: '§' '✓'"),
        ("POST", "/api/generate", {"prompt": ""}, 400, "prompt", "empty"),
        ("POST", "/api/generate", {"prompt": "k" * 501}, 413, "prompt", "501 characters, more than this server's limit of 500"),
        ("POST", "/api/generate", {"prompt": 7}, 400, "prompt", "expected a string, got 7"),
        ("POST", "/api/generate", {"prompt": "KING", "temperature": -1}, 400, "temperature", "must be 0 or more"),
        ("POST", "/api/generate", {"prompt": "KING", "temperature": "hot"}, 400, "temperature", "expected a number"),
        ("POST", "/api/generate", {"prompt": "KING", "top_p": 0}, 400, "top_p", "must be in (0, 1]"),
        ("POST", "/api/generate", {"prompt": "KING", "top_p": 1.5}, 400, "top_p", "must be in (0, 1]"),
        ("POST", "/api/generate", {"prompt": "KING", "top_k": -1}, 400, "top_k", "must be 0 or more"),
        ("POST", "/api/generate", {"prompt": "KING", "top_k": 2.5}, 400, "top_k", "expected an integer"),
        ("POST", "/api/generate", {"prompt": "KING", "max_new_tokens": -1}, 400, "max_new_tokens", f"must be in 0..{LIMIT}"),
        (
            "POST",
            "/api/generate",
            {"prompt": "KING", "max_new_tokens": LIMIT + 1},
            400,
            "max_new_tokens",
            "--max_new_tokens_limit",
        ),
        ("POST", "/api/generate", {"prompt": "KING", "seed": -1}, 400, "seed", "must be in 0..2**64-1"),
        ("POST", "/api/generate", {"prompt": "KING", "seed": True}, 400, "seed", "expected an integer, got true"),
        ("POST", "/api/generate", {"prompt": "KING", "colour": "red"}, 400, "colour", "unknown field"),
        ("POST", "/api/attention", {"text": "KING §"}, 400, "text", "not in the vocabulary: '§'"),
        ("POST", "/api/attention", {}, 400, "text", "missing"),
        ("POST", "/api/attention", {"text": None}, 400, "text", "got null"),
        ("POST", "/api/attention", {"text": "k" * 501}, 413, "text", "--max_chars"),
        ("POST", "/api/lens", {"heads_off": []}, 400, "text", "missing"),
        ("POST", "/api/lens", {"text": "KING §"}, 400, "text", "not in the vocabulary: '§'"),
        ("POST", "/api/lens", {"text": "KING", "heads_off": "0,1"}, 400, "heads_off", 'expected a list, got "0,1"'),
        ("POST", "/api/lens", {"text": "KING", "heads_off": [[2, 0]]}, 400, "heads_off", "layer 2 is not one of the model's 2"),
        ("POST", "/api/lens", {"text": "KING", "heads_off": [[0, 1, 2]]}, 400, "heads_off", "[layer, head] pairs"),
        ("POST", "/api/lens", {"text": "KING", "heads": []}, 400, "heads", "unknown field"),
        ("GET", "/api/heads", None, 404, "dataset", "val.bin not found"),  # the fixture's dataset is gone
        ("POST", "/api/heads", {}, 405, "method", "POST is not allowed on /api/heads (only GET)"),
        ("GET", "/api/nothing", None, 404, "path", "/api/nothing"),
        ("GET", "/api/generate", None, 405, "method", "GET is not allowed on /api/generate"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server, method, path, body, status, field, message):
    raw = body if isinstance(body, bytes) else None
    got, _, answer = call(server, method, path, body=None if raw else body, raw=raw)
    assert (got, answer["field"]) == (status, field) and answer["error"].startswith(f"{field}: "), answer
    assert message in answer["error"] and "\n" not in answer["error"], answer
    assert call(server, "GET", "/api/info")[0] == 200  # still serving


def test_requests_the_server_refuses_before_reading(server):
    status, _, answer = call(server, "POST", "/api/attention", raw=b'{"text": "KING"}', headers={"Content-Type": "text/plain"})
    assert status == 415 and answer["field"] == "Content-Type"
    # a body over the limit is refused from its Content-Length, unread
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60) as client:
        client.sendall(
            b"POST /api/attention HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 2000000\r\n\r\n{"text": "kkkk'
        )
        reply = client.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.0 413") and '"field": "body"' in reply and "2,000,000 bytes, more than the limit" in reply
    # a page elsewhere that points its own name at 127.0.0.1 (DNS rebinding) is not this machine's page
    status, _, answer = call(server, "GET", "/api/info", headers={"Host": "evil.example:80"})
    assert status == 403 and answer["field"] == "Host"
    assert call(server, "GET", "/api/info", headers={"Host": "localhost:1"})[0] == 200


def test_a_client_leaving_mid_stream_stops_its_generation(server):
    playground = server.playground
    before = len(playground.finished)
    body = json.dumps({"prompt": "KING:", "max_new_tokens": LIMIT, "seed": 3}).encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60) as client:
        client.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 5:  # a few characters arrive, then the client goes
            received += client.recv(4096)
    deadline = time.time() + 60
    while len(playground.finished) == before and time.time() < deadline:
        time.sleep(0.05)
    generated, asked, left = playground.finished[-1]
    assert (asked, left) == (LIMIT, True) and 5 <= generated < LIMIT
    wait_for(lambda: playground.turns.counts()["computing"] == 0, "its slot given back")
    assert call(server, "GET", "/api/info")[0] == 200


def test_concurrent_clients_each_get_their_own_stream(server):
    playground = server.playground
    requests = [
        {"prompt": prompt, "max_new_tokens": 60, "seed": seed, "temperature": 1.0}
        for prompt, seed in [("ROMEO:", 1), ("JULIET:", 2), ("KING:", 3), ("QUEEN:", 4), ("ROMEO:", 5), ("KING:", 1)]
    ]
    expected = []
    for r in requests:
        config = SampleConfig(start=r["prompt"], max_new_tokens=60, seed=r["seed"], temperature=1.0)
        tokens = generate_tokens(playground.model, playground.tokenizer.encode(r["prompt"]), config)
        expected.append(playground.tokenizer.decode([t.item() for t in tokens]))
    got = [None] * len(requests)

    def client(i):
        got[i] = streamed_text(server, **requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert got == expected and len(set(got)) == len(got)


def test_metrics_are_the_runs_and_follow_the_file(server, trained):
    status, response, answer = call(server, "GET", "/api/metrics")
    records = read_records(str(trained / "metrics.jsonl"))
    assert status == 200 and answer["exists"] and answer["records"] == records
    assert {r["type"] for r in records} == {"train", "eval", "health", "done"} and any(r.get("sample") for r in records)
    etag = response.getheader("ETag")
    assert call(server, "GET", "/api/metrics", headers={"If-None-Match": etag})[0] == 304  # unchanged: nothing sent
    with open(trained / "metrics.jsonl", "a", encoding="utf-8") as f:  # a run goes on writing
        f.write(json.dumps({"type": "train", "iter": 70, "loss": float("nan"), "time": 0.0}) + "\n")
    status, _, answer = call(server, "GET", "/api/metrics", headers={"If-None-Match": etag})
    assert status == 200 and answer["records"][-1] == {"type": "train", "iter": 70, "loss": None, "time": 0.0}


def test_metrics_carry_the_runs_limits_and_no_nan_in_lists(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # one step of a run gone non-finite
        f.write(json.dumps({"type": "train", "iter": 62, "loss": 1.5, "losses": [1.5, float("nan")], "time": 0.0}) + "\n")
    with running(out) as server:
        answer = call(server, "GET", "/api/metrics")[2]
        assert answer["run"] == {"max_iters": 60, "time_budget": 0.0}  # from the run's config.json
        assert answer["records"][-1]["losses"] == [1.5, None]  # JSON.parse refuses NaN
        os.remove(out / "config.json")
        assert call(server, "GET", "/api/metrics")[2]["run"] is None


def write_checkpoint(source, path, iter_num, seed):
    """A checkpoint like source's, at step iter_num, with other weights (noise added by seed),
    written as train.py writes one: whole, then renamed into place."""
    checkpoint = torch.load(source, weights_only=True)
    noise = torch.Generator().manual_seed(seed)
    checkpoint["model"] = {
        k: v + 0.3 * torch.randn(v.shape, generator=noise) if v.is_floating_point() else v for k, v in checkpoint["model"].items()
    }
    checkpoint["iter_num"] = iter_num
    save_checkpoint(checkpoint, str(path))


def expected_text(model, tokenizer, prompt, **settings):
    config = SampleConfig(start=prompt, **settings)
    return tokenizer.decode([t.item() for t in generate_tokens(model, tokenizer.encode(prompt), config)])


def test_a_new_checkpoint_is_served_without_a_restart_and_a_stream_keeps_its_model(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    lines = []
    with running(out, log=lines.append, decode_dtype="float32") as server:
        status, response, info = call(server, "GET", "/api/info")
        assert status == 200 and info["iter_num"] == 60 and info["has_model"] and info["notice"] is None
        etag = response.getheader("ETag")
        assert call(server, "GET", "/api/info", headers={"If-None-Match": etag})[0] == 304  # unchanged: nothing sent
        old = server.playground.loaded
        # a stream begins with the old model ...
        streaming, received = open_stream(server, max_new_tokens=2000, seed=5)
        # ... and a run writes a better model meanwhile
        write_checkpoint(out / "best.pt", out / "best.pt", 80, seed=1)
        status, response, info = call(server, "GET", "/api/info", headers={"If-None-Match": etag})
        assert status == 200 and info["iter_num"] == 80 and info["checkpoint_id"] != old.info["checkpoint_id"]
        assert response.getheader("ETag") != etag and lines[-1].startswith(f"new checkpoint: {out / 'best.pt'}: gpt")
        assert server.playground.turns.counts()["computing"] == 1  # the stream is still going
        new = server.playground.loaded
        with streaming:
            received += streaming.makefile("rb").read()
        stream = [json.loads(line[6:]) for line in received.decode().split("\n") if line.startswith("data: ")]
        settings = {"max_new_tokens": 2000, "seed": 5, "decode_dtype": "float32"}
        assert stream[-1]["text"] == expected_text(old.model, old.tokenizer, "KING:", **settings)
        # the next generation and attention map are the new model's
        text = streamed_text(server, prompt="KING:", max_new_tokens=40, seed=5)
        assert text == expected_text(new.model, new.tokenizer, "KING:", **{**settings, "max_new_tokens": 40})
        assert text != stream[-1]["text"][:40]
        weights = torch.tensor(call(server, "POST", "/api/attention", {"text": "KING:"})[2]["weights"], dtype=torch.float64)
        idx = torch.tensor([new.tokenizer.encode("KING:")])
        torch.testing.assert_close(weights, new.model.attention_maps(idx).double(), atol=1e-5, rtol=0)


def test_a_damaged_checkpoint_leaves_the_old_model_serving_and_says_why(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    lines = []
    with running(out, log=lines.append) as server:
        whole = (out / "best.pt").read_bytes()
        write_atomic(str(out / "best.pt"), whole[: len(whole) // 2])  # a copy cut short, say
        for _ in range(3):  # looked at once: not loaded again at every request
            info = call(server, "GET", "/api/info")[2]
            assert info["iter_num"] == 60 and info["has_model"]
            assert "not a readable checkpoint" in info["notice"] and "still serving" in info["notice"]
        assert [line for line in lines if line.startswith("not loaded: ")] == [lines[-1]] and "\n" not in lines[-1]
        assert len(streamed_text(server, prompt="KING:", max_new_tokens=10)) == 10
        write_checkpoint(out / "ckpt.pt", out / "best.pt", 90, seed=2)  # the next eval writes a whole one
        info = call(server, "GET", "/api/info")[2]
        assert info["iter_num"] == 90 and info["notice"] is None


def test_a_folder_without_a_checkpoint_yet_is_served_until_one_lands(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "metrics.jsonl", out / "metrics.jsonl")  # a run has begun writing
    with running(out) as server:
        status, _, info = call(server, "GET", "/api/info")
        assert status == 200 and not info["has_model"] and info["checkpoint"] is None and info["vocab"] == ""
        assert info["notice"] == f"no checkpoint yet in {out}: the run has not reached its first eval"
        assert info["limits"]["max_chars"] == 500
        assert call(server, "GET", "/api/metrics")[2]["exists"]
        for path, body in [("/api/generate", {"prompt": "KING:"}), ("/api/attention", {"text": "KING:"})]:
            status, response, answer = call(server, "POST", path, body)
            assert (status, answer["field"]) == (503, "checkpoint") and response.getheader("Retry-After") is None
            assert answer["error"] == f"checkpoint: {info['notice']}"
        # bad fields are still named first
        assert call(server, "POST", "/api/generate", {"prompt": "KING:", "top_p": 2})[2]["field"] == "top_p"
        shutil.copy(trained / "ckpt.pt", out / ".tmp-ckpt")
        os.replace(out / ".tmp-ckpt", out / "ckpt.pt")  # the first eval's checkpoint lands
        info = call(server, "GET", "/api/info")[2]
        assert info["has_model"] and info["checkpoint"] == str(out / "ckpt.pt") and info["notice"] is None
        assert len(streamed_text(server, prompt="KING:", max_new_tokens=10)) == 10
        os.remove(out / "ckpt.pt")  # a new run with --overwrite clears the folder
        info = call(server, "GET", "/api/info")[2]
        assert not info["has_model"] and "no checkpoint yet" in info["notice"]
    assert serve.Playground(serve.ServeConfig(out_dir=str(out), device="cpu")).loaded is None


def test_a_bigram_checkpoint_has_next_characters_but_no_attention(tmp_path, data_dir):
    train_tiny(data_dir, tmp_path / "out", model_type="bigram", max_iters=1, eval_interval=1, eval_iters=1)
    server = start_server(tmp_path / "out")
    try:
        info = call(server, "GET", "/api/info")[2]
        assert info["model_type"] == "bigram" and not info["has_attention"] and info["n_layer"] == 0
        status, _, answer = call(server, "POST", "/api/attention", {"text": "KING"})
        assert status == 200 and answer["weights"] == [] and len(answer["top5"]) == 4
        for path, body in (("/api/lens", {"text": "KING"}), ("/api/heads", None)):
            status, _, answer = call(server, "POST" if body else "GET", path, body)
            assert status == 400 and answer["error"] == "checkpoint: a bigram model has no layers or heads to look into"
        assert len(streamed_text(server, prompt="KING", max_new_tokens=10)) == 10
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_with_the_speed_record_options_serves_the_same(tmp_path, data_dir, capsys):
    """Rotary positions, qk_norm and relu2 change the attention math: the playground still
    shows GPT.attention_maps and streams sample.py's text."""
    train_tiny(
        data_dir,
        tmp_path / "out",
        position="rotary",
        qk_norm=True,
        activation="relu2",
        max_iters=5,
        eval_interval=5,
        eval_iters=1,
    )
    server = start_server(tmp_path / "out")
    try:
        playground, prompt = server.playground, "QUEEN:\nmy lord"
        answer = call(server, "POST", "/api/attention", {"text": prompt})[2]
        idx = torch.tensor([playground.tokenizer.encode(prompt)])
        torch.testing.assert_close(
            torch.tensor(answer["weights"], dtype=torch.float64), playground.model.attention_maps(idx).double(), atol=1e-5, rtol=0
        )
        streamed = streamed_text(server, prompt="QUEEN:", max_new_tokens=30, seed=2)
        assert (
            sample.main([f"--out_dir={tmp_path / 'out'}", "--start=QUEEN:", "--device=cpu", "--max_new_tokens=30", "--seed=2"])
            == 0
        )
        assert capsys.readouterr().out == "QUEEN:" + streamed + "\n"
    finally:
        server.shutdown()
        server.server_close()


# -----------------------------------------------------------------------------
# limits: a few clients cannot stop the server for everyone else


def test_a_slow_client_is_answered_408_by_the_timeout_while_others_are_served(trained):
    with running(trained, timeout=1.0) as server:
        silent = send_raw(server, b"")  # connects and says nothing
        half = send_raw(server, b"POST /api/attention HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half its headers
        short = send_raw(server, request_bytes("POST", "/api/attention", b'{"text": "KING"}')[:-4])  # most of its body
        for _ in range(3):  # meanwhile, everyone else is served
            assert call(server, "GET", "/api/info")[0] == 200
        for client in (silent, half, short):
            status, _, body = read_reply(client)
            answer = json.loads(body)
            assert status == 408 and answer["field"] == "request" and "--timeout=1 seconds" in answer["error"], answer
        # a byte at a time, each well within the timeout: the whole request is still due by then
        trickle = send_raw(server, b"G")
        for byte in b"ET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 300:
            if select.select([trickle], [], [], 0.1)[0]:
                break  # answered
            trickle.sendall(bytes([byte]))
        else:
            pytest.fail("a client sending a byte every 0.1 s held its connection for 30 s with --timeout=1")
        assert read_reply(trickle)[0] == 408


def test_a_long_answer_to_a_client_that_reads_steadily_outlasts_the_timeout(trained):
    """--timeout bounds a client that reads nothing, not a long answer: 8 MB (an attention map of a
    big model) read at a few MB/s takes longer than the 0.5 s here, and arrives whole."""
    with running(trained, timeout=0.5) as server:
        server.playground.info["padding"] = "x" * 8_000_000
        client = send_raw(server, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", receive_buffer=65536)
        reply = bytearray()
        with client:
            while chunk := client.recv(65536):
                reply += chunk
                time.sleep(0.02)  # at most 3 MB/s: what the kernel's buffers do not hold takes seconds
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["padding"] == "x" * 8_000_000


def held(server):
    """The bytes each connection still arriving has sent, as the event loop has received them."""
    return sorted(len(a.data) for a in list(server.arriving.values()))


def test_at_max_connections_the_connection_that_sent_least_for_longest_makes_room(trained):
    with running(trained, max_connections=3, timeout=60) as server:
        half = b"GET /api/info HTTP/1.1\r\n"  # a request that never ends
        idle = [send_raw(server, data) for data in (half, b"", half)]
        # held, and what each sent received (the loop may take a connection before its bytes)
        wait_for(lambda: held(server) == [0, len(half), len(half)], "three connections held, their bytes received")
        assert call(server, "GET", "/api/info")[0] == 200  # the newcomer is served ...
        status, headers, body = read_reply(idle[1])  # ... and the one that sent nothing was closed for it
        answer = json.loads(body)
        assert status == 503 and headers["retry-after"] == "1" and headers["content-type"].startswith("application/json")
        assert answer["field"] == "server" and "closed for a newer connection" in answer["error"] and b"\n" not in body
        assert "--max_connections=3" in answer["error"]
        # of those that sent as much, the oldest goes
        wait_for(lambda: server.open_connections() == 2, "the newcomer's answer done")
        idle.append(send_raw(server, half))
        wait_for(lambda: held(server) == [len(half)] * 3, "three connections held, their bytes received")
        assert call(server, "GET", "/api/info")[0] == 200
        assert read_reply(idle[0])[0] == 503
        assert {a.address[1] for a in server.arriving.values()} == {c.getsockname()[1] for c in idle[2:]}
        for client in idle:
            client.close()


def test_when_every_connection_is_being_answered_a_newcomer_gets_503_at_once(trained):
    with running(trained, max_connections=2) as server:
        streams = [open_stream(server, seed=seed)[0] for seed in (1, 2)]  # two answers in progress, a thread each
        status, headers, body = read_reply(send_raw(server, request_bytes("GET", "/api/info")))
        assert status == 503 and headers["retry-after"] == "1" and "being answered" in json.loads(body)["error"]
        streams[0].close()  # one leaves: its place is free for the next
        wait_for(lambda: call(server, "GET", "/api/info")[0] == 200, "a free connection")
        streams[1].close()


def test_a_burst_of_connects_waits_in_the_listen_backlog(trained):
    """100 connects to a server that is not accepting yet all complete their handshake in the
    listen backlog (socketserver's default of 5 left the rest resending their SYN a second
    later, then 3 s later, ...), and each is answered once the server accepts."""
    server = start_server(trained, accept=False, max_connections=128)
    accepting = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        clients = [send_raw(server, request_bytes("GET", "/api/info"), timeout=10) for _ in range(100)]
        accepting.start()
        assert [read_reply(client)[0] for client in clients] == [200] * 100
    finally:
        if accepting.ident is None:
            accepting.start()  # shutdown() waits for serve_forever to return
        server.shutdown()
        server.server_close()


def waiting_client(server, seed, max_new_tokens=40):
    """(socket, its file) of a /api/generate whose reply's head has been read: its events follow."""
    body = json.dumps({"prompt": "KING:", "max_new_tokens": max_new_tokens, "seed": seed}).encode()
    client = send_raw(server, request_bytes("POST", "/api/generate", body))
    reader = client.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.0 200 ")
    while reader.readline() != b"\r\n":
        pass
    return client, reader


def next_event(reader):
    """(event, data) of the next Server-Sent Event."""
    event, data = "message", None
    while (line := reader.readline().decode()) != "\n":
        assert line, "the stream ended"
        name, _, value = line.rstrip("\n").partition(": ")
        event, data = (value, data) if name == "event" else (event, json.loads(value))
    return event, data


def test_generations_beyond_the_slots_wait_in_order_hear_their_place_and_get_their_seeds_text(trained):
    with running(trained, max_generations=1, max_queue=3) as server:
        playground = server.playground
        streaming, _ = open_stream(server)  # holds the only slot
        waiting = [waiting_client(server, seed) for seed in (1, 2, 3)]
        assert [next_event(reader) for _, reader in waiting] == [("queued", {"queued": n}) for n in (0, 1, 2)]
        status, _, info = call(server, "GET", "/api/info")
        assert info["generations"] == {"computing": 1, "waiting": 3}
        # the queue is full: 503, with a Retry-After from the pace of the generations
        status, response, answer = call(server, "POST", "/api/generate", {"prompt": "KING:", "max_new_tokens": 5})
        assert status == 503 and int(response.getheader("Retry-After")) >= 1 and answer["field"] == "server"
        assert "busy: 3 generation(s) waiting" in answer["error"] and "--max_queue" in answer["error"]
        assert call(server, "POST", "/api/attention", {"text": "KING"})[0] == 200  # the rest of the API is not held up

        # the first in line leaves: out of the queue at once, and those behind it move up
        waiting[0][1].close()  # the file first: the socket stays open while a file of it is
        waiting[0][0].close()
        assert next_event(waiting[1][1]) == ("queued", {"queued": 0})
        assert next_event(waiting[2][1]) == ("queued", {"queued": 1})
        assert playground.turns.counts() == {"computing": 1, "waiting": 2}

        streaming.close()  # the stream ends: the next in line starts, then the last
        for (client, reader), seed in zip(waiting[1:], (2, 3)):
            with client, reader:
                events = []
                while not events or events[-1][0] != "done":
                    events.append(next_event(reader))
            text = "".join(data["char"] for event, data in events if event == "message")
            expected = expected_text(playground.model, playground.tokenizer, "KING:", max_new_tokens=40, seed=seed)
            assert text == events[-1][1]["text"] == expected
        assert [event for event, _ in events if event == "queued"] == ["queued"]  # the last: 0 ahead, once
        wait_for(lambda: playground.turns.counts() == {"computing": 0, "waiting": 0}, "an empty queue")


def test_turns_are_first_come_first_served():
    from chargpt.turns import Turns

    turns = Turns(slots=1, max_waiting=2)
    first = turns.join()
    second, third = turns.join(), turns.join()
    assert first.started and not second.started and (turns.ahead(second), turns.ahead(third)) == (0, 1)
    assert turns.join() is None  # the queue is full
    turns.leave(second)  # leaves while waiting: the one behind moves up
    assert turns.ahead(third) == 0 and turns.wait(third, 0) == 0 and not third.started
    turns.leave(first)  # the slot goes to the first in line at once ...
    assert third.started
    fourth = turns.join()
    assert not fourth.started  # ... and a newcomer waits behind it
    turns.leave(third)
    assert fourth.started
    turns.leave(fourth)
    turns.leave(fourth)  # leaving twice is leaving once
    assert turns.counts() == {"computing": 0, "waiting": 0} and 1 <= turns.retry_after() <= 60


def test_many_clients_at_once_each_get_their_seeds_text(trained):
    """A class at once, in small: twelve clients, two slots, the rest queued; each gets the
    text its seed gives alone, and every one finishes."""
    with running(trained, max_generations=2, max_queue=12) as server:
        playground = server.playground
        texts = {}

        def client(seed):
            texts[seed] = streamed_text(server, prompt="KING:", max_new_tokens=60, seed=seed)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for seed in range(12):
            assert texts.get(seed) == expected_text(
                playground.model, playground.tokenizer, "KING:", max_new_tokens=60, seed=seed
            ), seed


def test_a_normal_client_is_served_beside_300_idle_connections(trained):
    with running(trained, timeout=60) as server:
        assert server.max_connections >= 310, "the test process may open too few files"
        idle = [send_raw(server, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else b"") for i in range(300)]
        try:
            wait_for(lambda: len(server.arriving) == 300, "300 connections held")
            assert not server.answering  # held by the event loop: no thread each
            assert call(server, "GET", "/api/info")[0] == 200
            assert len(streamed_text(server, prompt="KING:", max_new_tokens=5)) == 5
            assert len(server.arriving) == 300  # none of them shed: the cap is far above
        finally:
            for client in idle:
                client.close()
        wait_for(lambda: server.open_connections() == 0, "the idle connections closed")


def test_a_client_that_stops_reading_frees_its_generation_after_the_timeout(trained):
    with running(trained, max_generations=1, timeout=1.0) as server:
        playground = server.playground
        body = json.dumps({"prompt": "KING:", "max_new_tokens": LIMIT, "seed": 3}).encode()
        stalled = send_raw(server, request_bytes("POST", "/api/generate", body), receive_buffer=4096)  # never read
        wait_for(lambda: playground.finished, "end of the unread generation")
        generated, asked, left = playground.finished[-1]
        assert left and 0 < generated < asked
        assert len(streamed_text(server, prompt="KING:", max_new_tokens=5)) == 5
        stalled.close()


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("PUT", "/api/generate", 405),
        ("DELETE", "/api/info", 405),
        ("PATCH", "/api/attention", 405),
        ("OPTIONS", "/api/generate", 405),
        ("TRACE", "/", 405),
        ("BREW", "/api/metrics", 405),
        ("get", "/api/info", 405),
        ("PUT", "/api/nothing", 404),
        ("POST", "/api/info", 405),
    ],
)
def test_unknown_methods_get_the_same_json_error(server, method, path, status):
    got, response, answer = call(server, method, path, body={"prompt": "KING"})
    field = "method" if status == 405 else "path"
    assert (got, answer["field"]) == (status, field) and answer["error"].startswith(f"{field}: "), answer
    if status == 405:
        assert f"{method} is not allowed on {path}" in answer["error"]
        assert response.getheader("Allow") == ("POST" if path in ("/api/generate", "/api/attention") else "GET")
    assert response.getheader("Access-Control-Allow-Origin") is None  # an OPTIONS preflight allows no other site


def test_head_gets_the_headers_of_the_json_error_alone(server):
    status, headers, body = read_reply(send_raw(server, b"HEAD /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert status == 405 and headers["allow"] == "GET" and int(headers["content-length"]) > 0 and body == b""


def test_clients_that_leave_before_their_answer_cost_a_log_line_at_most(trained, capfd):
    lines = []
    server = start_server(trained, log=lines.append)
    try:
        refused = request_bytes("POST", "/api/attention")[:-4] + b"\r\nContent-Length: 2000000\r\n\r\n"
        for data in [refused, request_bytes("POST", "/api/attention", b"{not json"), b"GET /api/nothing HTTP/1.1\r\n\r\n"] * 30:
            client = send_raw(server, data)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # leave with a reset
            client.close()
        # every thread has ended (the semaphore counts them)
        wait_for(lambda: server.open_connections() == 0, "end of the requests")
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err
    assert len(lines) <= 90 and all("\n" not in line and len(line) < 200 for line in lines), lines


def test_stop_ends_open_streams_between_characters(trained):
    with running(trained) as server:
        playground = server.playground
        streaming, received = open_stream(server)
        assert playground.stop()
        assert playground.turns.counts() == {"computing": 0, "waiting": 0}
        with streaming:
            received += streaming.makefile("rb").read()
        assert received.endswith(b'event: error\ndata: {"error": "server: stopped (Ctrl-C)", "field": "server"}\n\n')
        status, _, answer = call(server, "POST", "/api/generate", {"prompt": "KING:"})
        assert status == 503 and answer["error"] == "server: stopping (Ctrl-C)"


def serve_process(trained, *flags, preexec_fn=None):
    """(serve.py started in a process of its own, its port, its stderr's lines so far)."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={trained}", "--device=cpu", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    url = process.stdout.readline().split()
    if not url:  # it did not start: what it said is the test's message
        process.wait(timeout=60)
        return process, None, process.stderr.read()
    return process, int(url[2].rstrip("/").rsplit(":", 1)[1]), None  # playground at http://127.0.0.1:PORT/


def ignore_sigint():
    # as a shell without job control starts a background job (`pytest ... &` in a script): SIGINT
    # ignored, which Python then leaves ignored; the whole suite run that way failed here
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, preexec_fn", [(signal.SIGINT, None), (signal.SIGINT, ignore_sigint), (signal.SIGTERM, None)])
def test_ctrl_c_with_a_stream_and_a_queue_open_exits_cleanly(trained, sig, preexec_fn):
    """Python exiting while a generation's thread is inside PyTorch aborted the process
    ("terminate called without an active exception", exit status -6); a SIGINT that the
    parent ignored was ignored by serve.py too, which then never exited."""
    process, port, err = serve_process(trained, "--decode_dtype=float32", "--max_generations=1", preexec_fn=preexec_fn)
    assert port is not None, f"serve.py did not start: {err}"
    try:
        body = json.dumps({"prompt": "KING:", "max_new_tokens": 5000}).encode()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=60) as client,
            socket.create_connection(("127.0.0.1", port), timeout=60) as queued,
        ):
            client.sendall(request_bytes("POST", "/api/generate", body))
            received = b""
            while received.count(b"data: ") < 3:
                received += client.recv(4096)
            queued.sendall(request_bytes("POST", "/api/generate", body))
            waited = b""
            while b"event: queued" not in waited:
                waited += queued.recv(4096)
            process.send_signal(sig)
            try:
                code = process.wait(timeout=60)  # a bound for a stuck server, not a measurement
            except subprocess.TimeoutExpired:
                pytest.fail(f"serve.py did not exit within 60 s of {sig.name} with a stream and a queued client open")
            assert code == 0
            queued.settimeout(10)
            waited += queued.makefile("rb").read()
        assert waited.endswith(b'event: error\ndata: {"error": "server: stopped (Ctrl-C)", "field": "server"}\n\n')
        err = process.stderr.read()
        assert "generate: stopped (Ctrl-C) after" in err and "terminate" not in err and "Traceback" not in err, err
        # the queued client: stopped in the queue, or as its turn came
        assert "in the queue" in err or "generate: stopped (Ctrl-C) after 0 of 5000" in err, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_open_files_limit_sets_the_connection_cap_and_too_low_a_one_is_refused(trained):
    import resource

    def limit(n):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    process, port, err = serve_process(trained, preexec_fn=limit(256))  # macOS's default
    assert port is not None, f"serve.py did not start: {err}"
    try:
        status, _, info = call(type("At", (), {"server_address": ("127.0.0.1", port)}), "GET", "/api/info")
        cap = info["limits"]["max_connections"]
        assert status == 200 and FEW_CONNECTIONS <= cap < 256
        # one more idle connection than the cap: the first is closed for it, and a normal client is still served
        idle = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(cap + 1)]
        assert read_reply(idle[0])[0] == 503
        assert call(type("At", (), {"server_address": ("127.0.0.1", port)}), "GET", "/api/info")[0] == 200
        for client in idle:
            client.close()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    err = process.stderr.read()
    assert f"open files: 256; connections: {cap} at once (--max_connections)" in err, err

    process, port, err = serve_process(trained, preexec_fn=limit(40))
    assert port is None and process.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("serve.py: error: this process may open 40 files (ulimit -n) and needs "), err


def test_command_line_errors_are_one_line(trained, tmp_path, capsys):
    def run(*flags):
        code = serve.main(list(flags))
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and err.startswith("serve.py: error: "), err
        return err

    assert str(tmp_path / "nowhere") in run(f"--out_dir={tmp_path / 'nowhere'}")
    assert "--port must be in 0..65535" in run(f"--out_dir={trained}", "--port=70000")
    assert "--decode_dtype must be" in run(f"--out_dir={trained}", "--decode_dtype=int4")
    assert "unknown config key 'colour'" in run("--colour=red")
    assert "--timeout must be a positive number of seconds, got 0" in run(f"--out_dir={trained}", "--timeout=0")
    assert "--timeout must be" in run(f"--out_dir={trained}", "--timeout=inf")
    assert "--max_generations must be 0 or more, got -1" in run(f"--out_dir={trained}", "--max_generations=-1")
    assert "--max_connections must be 0 or more, got -2" in run(f"--out_dir={trained}", "--max_connections=-2")
    assert "--max_queue must be 0 or more, got -1" in run(f"--out_dir={trained}", "--max_queue=-1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on --host=127.0.0.1 --port={port}" in run(f"--out_dir={trained}", f"--port={port}")


def test_help_lists_every_option(capsys):
    import dataclasses

    assert serve.main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(serve.ServeConfig):
        assert f"--{f.name}=" in out and f.metadata["help"] in out


# -----------------------------------------------------------------------------
# the page in a real browser


def browser():
    """A headless Chromium driven by Selenium, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("the browser test needs selenium (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("the browser test needs Chromium and its driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))  # a fresh profile of its own


def test_the_page_generates_and_shows_attention_in_a_browser(server, tmp_path):
    driver = browser()  # first: it skips, saying why, where selenium or Chromium is missing
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait.until(lambda d: d.find_element(By.ID, "facts").text)
        assert "2 layers × 2 heads" in driver.find_element(By.ID, "facts").text

        def fill(element_id, value):
            element = driver.find_element(By.ID, element_id)
            element.clear()
            element.send_keys(value)

        fill("prompt", "KING:")
        fill("max_new_tokens", "30")
        fill("seed", "11")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.ID, "status").get_attribute("data-state") == "done"
        spans = driver.find_elements(By.CSS_SELECTOR, "#text span.c")
        shown = "".join("\n" if "nl" in s.get_attribute("class") else s.text or " " for s in spans)
        assert shown == "KING:" + streamed_text(server, prompt="KING:", max_new_tokens=30, seed=11)

        # a generated character, clicked: the characters it reads light up, with their weights
        spans[20].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#text span[data-weight]"))
        lit = driver.find_elements(By.CSS_SELECTOR, "#text span[data-weight]")
        assert "sel" in spans[20].get_attribute("class")
        window_start = 20 + 1 - 16  # block_size 16: the window that ends at the character
        assert [int(s.get_attribute("data-i")) for s in lit] == list(range(window_start, 21))
        assert sum(float(s.get_attribute("data-weight")) for s in lit) == pytest.approx(1.0, abs=1e-3)
        assert any(s.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent") for s in lit)
        heatmap = driver.find_element(By.ID, "heatmap")
        assert heatmap.get_attribute("data-row") == "15"
        # 16 characters fit a label each, on both axes, as sample.py --attention labels them
        assert heatmap.get_attribute("data-label-step") == "1" and heatmap.get_attribute("data-labels") == shown[5:21]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#top5 li")) == 5
        # the average over heads is another row of weights that also sums to 1
        first = [s.get_attribute("data-weight") for s in lit]
        driver.find_element(By.CSS_SELECTOR, "#head option[value=avg]").click()
        lit = driver.find_elements(By.CSS_SELECTOR, "#text span[data-weight]")
        assert sum(float(s.get_attribute("data-weight")) for s in lit) == pytest.approx(1.0, abs=1e-3)
        assert [s.get_attribute("data-weight") for s in lit] != first

        # a prompt the model cannot read: the panels no longer describe the text before it
        fill("prompt", "KING §")
        assert heatmap.get_attribute("data-row") is None and not driver.find_elements(By.CSS_SELECTOR, "#top5 li")
        assert not driver.find_elements(By.CSS_SELECTOR, "#text span[data-weight]")
        assert "unknown" in driver.find_elements(By.CSS_SELECTOR, "#text span.c")[-1].get_attribute("class")
        driver.find_elements(By.CSS_SELECTOR, "#text span.c")[0].click()  # its window holds the §: a 400
        wait.until(lambda d: d.find_element(By.ID, "attn-caption").get_attribute("data-state") == "error")
        assert "not in the vocabulary: '§'" in driver.find_element(By.ID, "attn-caption").text
        assert heatmap.get_attribute("data-state") == "error" and not driver.find_elements(By.CSS_SELECTOR, "#top5 li")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "error")
        assert "prompt: 1 character(s) not in the vocabulary: '§'" in driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "attn-caption").text.startswith("The text was refused: prompt: ")
        assert heatmap.get_attribute("data-row") is None and not driver.find_elements(By.CSS_SELECTOR, "#top5 li")

        # Stop ends a long generation, and the server sees the client go
        fill("prompt", "KING:")
        finished = len(server.playground.finished)
        fill("max_new_tokens", str(LIMIT))
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#text span.g")) >= 3)
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "stopped")
        wait.until(lambda d: len(server.playground.finished) > finished)
        generated, asked, left = server.playground.finished[-1]
        assert left and generated < asked == LIMIT
    finally:
        driver.quit()


def test_the_page_follows_the_folder_from_no_checkpoint_to_a_newer_one(trained, tmp_path):
    """Started before the run's first checkpoint: the live curve and a notice, then the model
    when ckpt.pt lands, then a newer best.pt in the header and the facts, without a reload.
    The run's state comes from its records: writing until its "done" record, then done."""
    driver = browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "config.json", out / "config.json")  # max_iters 60, no time budget
    records = [r for r in read_records(str(trained / "metrics.jsonl")) if r["type"] in ("train", "eval") and r["iter"] <= 40]
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:  # a run at step 40, writing now
        f.writelines(json.dumps({**r, "time": time.time()}) + "\n" for r in records)
    try:
        with running(out) as server:
            wait = WebDriverWait(driver, 30)
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            header = driver.find_element(By.ID, "ckpt-name")
            wait.until(lambda d: header.text == "no model yet:")
            notice = driver.find_element(By.ID, "ckpt-notice").text
            assert notice == f"no checkpoint yet in {out}: the run has not reached its first eval"
            assert not driver.find_element(By.ID, "generate").is_enabled()
            assert driver.find_element(By.ID, "no-model").is_displayed()
            run = driver.find_element(By.ID, "run-status")
            wait.until(lambda d: run.get_attribute("data-state") == "writing")
            assert "a run is writing: step 40 of 60" in run.text
            losses = driver.find_element(By.ID, "losses")
            steps = sum(len(r.get("losses") or [r["loss"]]) for r in records if r["type"] == "train")
            assert int(losses.get_attribute("data-steps")) == steps > 1  # every step's loss, not one a record

            shutil.copy(trained / "ckpt.pt", out / ".tmp-ckpt")
            os.replace(out / ".tmp-ckpt", out / "ckpt.pt")  # the first eval's checkpoint lands
            wait.until(lambda d: header.get_attribute("data-step") == "60")
            assert not driver.find_element(By.ID, "ckpt-notice").is_displayed()
            assert driver.find_element(By.ID, "generate").is_enabled()
            write_checkpoint(trained / "best.pt", out / "best.pt", 80, seed=1)  # then a better one
            wait.until(lambda d: header.get_attribute("data-step") == "80")
            assert header.text.startswith(f"{out / 'best.pt'} · step 80")
            assert "80 of 60" in driver.find_element(By.ID, "facts").text

            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # the run ends
                f.write(
                    json.dumps({"type": "done", "iter": 60, "time_budget": None, "elapsed": 75.0, "time": time.time()}) + "\n"
                )
            wait.until(lambda d: run.get_attribute("data-state") == "done")
            assert run.text.startswith("done: 60 steps in 1m15s")
    finally:
        driver.quit()


def test_the_page_waits_its_turn_and_asks_a_full_server_again_until_it_gets_in(trained):
    driver = browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lines = []
    try:
        with running(trained, max_generations=1, max_queue=1, log=lines.append) as server:
            streaming, _ = open_stream(server)  # holds the only slot ...
            queued, reader = waiting_client(server, seed=1)  # ... and the only place in the queue
            assert next_event(reader) == ("queued", {"queued": 0})
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
            driver.find_element(By.ID, "max_new_tokens").clear()
            driver.find_element(By.ID, "max_new_tokens").send_keys("30")
            driver.find_element(By.ID, "generate").click()
            status = driver.find_element(By.ID, "status")
            # the queue is full: the page says so and asks again, and again
            wait.until(lambda d: "(asked 2 times)" in status.text)
            assert status.get_attribute("data-state") == "waiting" and "busy: 1 generation(s) waiting" in status.text
            reader.close()
            queued.close()  # the place in the queue frees: the page gets it, and hears it is next
            wait.until(lambda d: status.get_attribute("data-queued") == "0")
            assert status.text == "next in line: waiting for a generation to end"
            streaming.close()  # the slot frees: its text streams in, to the end
            wait.until(lambda d: status.get_attribute("data-state") in ("done", "error"))
            assert status.get_attribute("data-state") == "done", status.text
            spans = driver.find_elements(By.CSS_SELECTOR, "#text span.g")
            assert len(spans) == 30 and not driver.find_elements(By.CSS_SELECTOR, "#text span.unknown")
    finally:
        driver.quit()


def test_the_health_panel_shows_the_runs_health_records(server, trained):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    health = [r for r in read_records(str(trained / "metrics.jsonl")) if r["type"] == "health"]
    last = health[-1]
    driver = browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#health-table tr[data-layer]"))
        assert driver.find_element(By.ID, "health-step").text.startswith(f"step {last['iter']}, loss {last['loss']:.4f}")
        rows = driver.find_elements(By.CSS_SELECTOR, "#health-table tr[data-layer]")
        assert [row.get_attribute("data-layer") for row in rows] == [layer["name"] for layer in last["layers"]]
        for row, layer in zip(rows, last["layers"]):
            for cell in row.find_elements(By.CSS_SELECTOR, "td[data-key]"):
                value = layer[cell.get_attribute("data-key")]
                shown = cell.get_attribute("data-value")
                assert (shown is None) if value is None else float(shown) == value
        for canvas in ("health-act", "health-grad", "health-ratio", "health-entropy"):
            assert driver.find_element(By.ID, canvas).is_displayed()
        # the histograms' centre tick: a float sum's 8.9e-16 reads 0, a real value as it is
        for canvas in ("health-act", "health-grad"):
            assert "e-1" not in driver.find_element(By.ID, canvas).get_attribute("data-xticks")
        heads = len(last["entropy"][0])
        assert (
            driver.find_element(By.ID, "health-entropy-legend").text.split()
            == " ".join(f"head {h}" for h in range(heads)).split()
        )
        muon = any(m["muon"] for m in last["matrices"])
        caption = driver.find_element(By.ID, "health-ratio-caption").text
        assert ("Muon's fixed-size step" in caption) == muon and "makemore rule for AdamW" in caption
        assert driver.find_element(By.ID, "health-status").text == "no warnings"

        # a warning the run writes shows up at the next poll
        message = "overfitting: the val loss has risen (a test's record)"
        with open(trained / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"type": "warning", "iter": 60, "kind": "overfitting", "message": message, "time": 0.0}) + "\n")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#health-warnings li"))
        item = driver.find_element(By.CSS_SELECTOR, "#health-warnings li")
        assert item.text == message and item.get_attribute("data-kind") == "overfitting"
    finally:
        driver.quit()


class BusyElsewhere:
    """chargpt.machine.CpuShare as it reads while another program keeps one core busy."""

    def since_last_look(self):
        return 1.0

    def others(self):
        return 1.0


def test_the_page_shows_the_lens_and_switches_heads_off_in_a_browser(tmp_path, data_dir):
    """Pointing at a character shows its lens, one row per layer, ending with the model's own
    guess; the heads view ranks every head as /api/heads does, and a click on one switches it
    off for the page's next questions: the lens, the top-5 and the marked characters follow."""
    driver = browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    train_tiny(data_dir, tmp_path / "out", max_iters=30)
    try:
        with running(tmp_path / "out") as server:
            wait = WebDriverWait(driver, 30)
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            wait.until(lambda d: d.find_element(By.ID, "heads-status").get_attribute("data-state") == "shown")
            ranked = call(server, "GET", "/api/heads")[2]
            assert "32 windows of 16 characters" in driver.find_element(By.ID, "heads-status").text
            buttons = driver.find_elements(By.CSS_SELECTOR, "#heads-grid button.head")
            rises = {
                (int(b.get_attribute("data-layer")), int(b.get_attribute("data-head"))): b.get_attribute("data-rise")
                for b in buttons
            }
            assert rises == {(h["layer"], h["head"]): str(h["rise"]) for h in ranked["heads"]}
            order = [
                (int(li.get_attribute("data-layer")), int(li.get_attribute("data-head")))
                for li in driver.find_elements(By.CSS_SELECTOR, "#heads-rank li")
            ]
            assert order == [(h["layer"], h["head"]) for h in ranked["heads"]]

            text = "KING:\nthe king an"  # 17 characters: one window of block_size + 1
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys(text)
            driver.find_elements(By.CSS_SELECTOR, "#text span.c")[8].click()
            table = driver.find_element(By.ID, "lens-table")
            wait.until(lambda d: table.get_attribute("data-state") == "shown" and table.get_attribute("data-row") == "8")
            spans = driver.find_elements(By.CSS_SELECTOR, "#text span.c")
            assert "".join("\n" if "nl" in s.get_attribute("class") else s.text or " " for s in spans) == text
            lens = call(server, "POST", "/api/lens", {"text": text})[2]
            assert lens["offset"] == 0 and len(lens["chars"]) == 17
            rows = driver.find_elements(By.CSS_SELECTOR, "#lens-table tr[data-layer]")
            assert [r.get_attribute("data-layer") for r in rows] == ["embeddings", "Block 0", "Block 1"]
            for row, expected in zip(rows, lens["lens"][8]):
                guesses = row.find_elements(By.CSS_SELECTOR, ".guess")
                assert [g.get_attribute("data-char") for g in guesses] == [g["char"] for g in expected["top5"]]
                assert row.find_element(By.CSS_SELECTOR, "td.next").get_attribute("data-prob") == str(expected["next"])
            # the last row is the next-character panel's guess
            first = driver.find_element(By.CSS_SELECTOR, "#top5 li .ch").text
            assert rows[-1].find_element(By.CSS_SELECTOR, ".guess .ch").text == first  # both as label() shows it
            assert not driver.find_elements(By.CSS_SELECTOR, "#text span.hurt")

            # a head switched off: the lens, the top-5 and the marks are those of /api/lens with it off
            driver.find_element(By.CSS_SELECTOR, '#heads-grid button[data-layer="1"][data-head="0"]').click()
            wait.until(lambda d: table.get_attribute("data-heads") == "1.0")
            off = call(server, "POST", "/api/lens", {"text": text, "heads_off": [[1, 0]]})[2]
            rows = driver.find_elements(By.CSS_SELECTOR, "#lens-table tr[data-layer]")
            assert [g.get_attribute("data-char") for g in rows[-1].find_elements(By.CSS_SELECTOR, ".guess")] == [
                g["char"] for g in off["lens"][8][-1]["top5"]
            ]
            assert "with 1 head off" in driver.find_element(By.ID, "top5-caption").text
            rises = sorted(
                ((a - b, t) for t, (a, b) in enumerate(zip(off["loss"], off["loss_intact"])) if a - b > 0.01), reverse=True
            )
            marked = sorted(int(s.get_attribute("data-i")) for s in driver.find_elements(By.CSS_SELECTOR, "#text span.hurt"))
            assert marked == sorted(t + 1 for _, t in rises[:10]) and marked
            assert (
                f"went from {off['mean_loss_intact']:.3f} to {off['mean_loss']:.3f}"
                in driver.find_element(By.ID, "ablation").text
            )
            # every head on again: nothing marked, the model's own guesses
            driver.find_element(By.ID, "heads-reset").click()
            wait.until(lambda d: table.get_attribute("data-heads") == "")
            assert not driver.find_elements(By.CSS_SELECTOR, "#text span.hurt")
            assert "head off" not in driver.find_element(By.ID, "top5-caption").text
    finally:
        driver.quit()


def test_a_generation_leaves_a_busy_core_to_the_program_on_it(trained):
    from chargpt.machine import Threads

    lines = []
    with running(trained, log=lines.append) as server:
        server.playground.threads = Threads(0, share=BusyElsewhere())
        server.playground.threads.cores = 2  # a 2-core machine, whatever this one is
        text = streamed_text(server, prompt="KING", max_new_tokens=30, seed=4)
    generations = [line for line in lines if line.startswith("generate:")]
    assert len(generations) == 1 and generations[0].startswith("generate: generated 30 of 30 characters in ")
    assert generations[0].endswith(", 1 thread"), generations
    with running(trained, threads=1) as fixed:
        assert streamed_text(fixed, prompt="KING", max_new_tokens=30, seed=4) == text  # the same text


def test_generations_at_once_share_the_free_cores(trained):
    from chargpt.machine import Threads

    with running(trained) as server:
        playground = server.playground
        playground.threads = Threads(0, share=FakeQuiet())
        playground.threads.cores = 2
        shares = []
        for running_now in (1, 2):
            playground.turns.running = running_now
            worker = threading.Thread(target=lambda: shares.append(playground.share_cores()))  # a generation's own thread
            worker.start()
            worker.join()
        playground.turns.running = 0
    assert shares == [2, 1]  # alone: both cores; two at once: one each


class FakeQuiet(BusyElsewhere):
    def others(self):
        return 0.0


def test_a_negative_number_of_threads_is_refused(trained):
    with pytest.raises(ValueError, match=r"--threads must be 0 \(automatic\) or more, got -1"):
        serve.Playground(serve.ServeConfig(out_dir=str(trained), threads=-1))


def test_the_main_thread_leaves_the_teams_of_threads_to_the_generations(trained):
    """A team of threads in the thread that loads the model would make every generation's team
    (in a request's thread) wait in the kernel at each operation: 4x slower measured."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        playground = serve.Playground(serve.ServeConfig(out_dir=str(trained), device="cpu", threads=2))
        assert torch.get_num_threads() == 1 and playground.threads.fixed == 2
        shares = []
        worker = threading.Thread(target=lambda: shares.append((playground.share_cores(), torch.get_num_threads())))
        worker.start()
        worker.join()
        assert shares == [(2, 2)]  # --threads=2: each generation's own team of two
    finally:
        torch.set_num_threads(before)
