"""serve.py under odd input: hypothesis over JSON bodies, header values and request lines. Each
request gets its answer, or one line of JSON naming what is wrong (a 4xx): never a 5xx, a
traceback, an HTML page or silence."""

import json
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serve
import train
from conftest import tiny_configs

FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# what a fuzzer tries in strings: lone surrogates (JSON can carry them as "\ud800"), NUL, line
# breaks Unicode has beyond \n, non-ASCII digits that str.isdigit takes, a long s and a Kelvin
# sign that case-insensitive matching folds to ASCII, fullwidth letters that NFKC folds
ODD = [
    "\ud800",
    "\udfff",
    "\x00",
    "\n",
    "\r",
    "\x85",
    "\u2028",
    "\ufeff",
    "\U0010ffff",
    "٣",
    "²",
    "ſ",
    "\u212a",
    "ｌ",
    "[",
    "]",
    ":",
    "/",
    "@",
    "%",
    "é",
    "§",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, text):
    """A server on a one-step checkpoint (the answers, not the text, are under test) with small
    limits, so that a valid generation takes milliseconds; and the lines it logs."""
    from prepare import prepare

    root = tmp_path_factory.mktemp("fuzz")
    prepare(text, str(root / "data" / "tiny"))
    train.train(
        *tiny_configs(
            str(root / "data"), root / "out", max_iters=1, eval_interval=1, eval_iters=1, sample_chars=0, eval_sample_chars=0
        ),
        log=lambda m: None,
    )
    log = []
    config = serve.ServeConfig(out_dir=str(root / "out"), device="cpu", max_new_tokens_limit=20, max_chars=64, timeout=5.0)
    server = serve.Server(serve.Playground(config, log=log.append))
    server.log = log
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def exchange(server, data):
    """All the server answers to data (bytes), sent whole, then the client's end closed."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as client:
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)  # what was sent is all there is: no wait for the timeout
        except ConnectionError:
            pass  # it answered (a line too long) and closed before reading the rest
        return client.makefile("rb").read()


def request(method=b"POST", path=b"/api/generate", body=b"", host=b"127.0.0.1", content_type=b"application/json", length=None):
    length = str(len(body)).encode() if length is None else length
    return (
        method
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + length
        + b"\r\n\r\n"
        + body
    )


def answer(reply, to_head=False):
    """(status, content type, body) of a reply, after checking the one thing every reply must be:
    a status line, and a 4xx's body one line of JSON {"error": "FIELD: ...", "field": FIELD}
    (its headers alone for a HEAD request)."""
    top, _, body = reply.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.0 "), reply[:300]
    status = int(lines[0].split()[1])
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    assert 200 <= status < 500, reply[:300]
    if status >= 400:
        assert headers["content-type"] == "application/json; charset=utf-8" and b"\n" not in body, reply[:300]
        if to_head and not body:  # "HEAD" that the server read as the method (not in a line too broken to have one)
            assert int(headers["content-length"]) > 0
            return status, headers["content-type"], body
        error = json.loads(body)
        assert set(error) == {"error", "field"} and error["error"].startswith(f"{error['field']}: "), error
        assert len(body) == int(headers["content-length"])
    return status, headers.get("content-type", ""), body


def check_stream(body):
    """A 200 from /api/generate: its events end with "done", and no "error" event on the way."""
    blocks = body.decode().split("\n\n")[:-1]
    assert blocks and blocks[-1].startswith("event: done\n"), body[-300:]
    assert not any(block.startswith("event: error") for block in blocks), body[-300:]


def check_log(server, capfd):
    """Short lines in the log, none for a bug (a 500, an exception that escaped a request's
    thread, a stream's error), and nothing at all on stderr."""
    err, lines = capfd.readouterr().err, server.log[:]
    server.log.clear()  # the next check reads the next lines alone
    assert "Traceback" not in err and "Exception" not in err, err
    for line in lines:
        assert "\n" not in line and len(line) < 600, line
        assert " 500 " not in line and not line.startswith("127.0.0.1: "), line
        assert not line.startswith("generate: ") or " characters in " in line, line
    assert server.playground.turns.counts() == {"computing": 0, "waiting": 0}  # every generation gave its slot back


def texts(vocab):
    """Strings of the model's own characters and odd ones: some prompts are valid, most are not."""
    return st.text(alphabet=st.sampled_from(vocab) | st.sampled_from(ODD) | st.characters(), max_size=12)


def json_values(strings):
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | strings
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3), max_leaves=6
    )


@st.composite
def generate_bodies(draw, vocab):
    """A /api/generate body: mostly its own fields, each a plausible value, an edge of its range
    or any JSON value; now and then an unknown key, or no object at all."""
    strings = texts(vocab)
    anything = json_values(strings)
    fields = {
        "prompt": strings | anything,
        "max_new_tokens": st.integers(-2, 25) | st.integers() | anything,
        "temperature": st.sampled_from([0, 1e-310, 5e-324, 1e-40, 1e300, 0.8]) | st.floats() | st.integers() | anything,
        "top_k": st.integers(-2, 100) | st.integers() | anything,
        "top_p": st.sampled_from([5e-324, 1e-45, 1e-30, 0.5, 1]) | st.floats() | anything,
        "seed": st.integers(-1, 2**64) | st.integers() | anything,
    }
    if draw(st.integers(0, 9)) == 0:
        return draw(anything)
    body = draw(st.fixed_dictionaries({}, optional=fields))
    if draw(st.integers(0, 4)) == 0:
        body.update(draw(st.dictionaries(strings, anything, min_size=1, max_size=2)))
    return body


@given(data=st.data())
@FUZZ
def test_fuzzed_json_bodies_get_their_answer_or_a_json_4xx(server, capfd, data):
    vocab = server.playground.tokenizer.chars
    if data.draw(st.booleans()):
        path, body = b"/api/generate", data.draw(generate_bodies(vocab))
    else:
        path, body = (
            b"/api/attention",
            data.draw(st.fixed_dictionaries({}, optional={"text": texts(vocab)}) | json_values(texts(vocab))),
        )
    # ensure_ascii: a lone surrogate travels as "\ud800", which is valid JSON; NaN and Infinity too, as Python writes them
    status, content_type, reply = answer(exchange(server, request(path=path, body=json.dumps(body).encode())))
    if status == 200 and path == b"/api/generate":
        assert content_type.startswith("text/event-stream")
        check_stream(reply)
    check_log(server, capfd)


@given(data=st.data())
@FUZZ
def test_fuzzed_lens_bodies_get_their_answer_or_a_json_4xx(server, capfd, data):
    """/api/lens with texts and heads_off of every shape: pairs in and out of range, pairs of
    the wrong length or type, anything at all."""
    vocab = server.playground.tokenizer.chars
    strings = texts(vocab)
    anything = json_values(strings)
    pairs = st.lists(st.lists(st.integers(-1, 4) | anything, max_size=3), max_size=4)
    body = data.draw(st.fixed_dictionaries({}, optional={"text": strings | anything, "heads_off": pairs | anything}) | anything)
    status, _, reply = answer(exchange(server, request(path=b"/api/lens", body=json.dumps(body).encode())))
    if status == 200:
        lens = json.loads(reply)
        assert len(lens["lens"]) == min(len(lens["chars"]), server.playground.model.config.block_size)
        assert len(lens["loss"]) == len(lens["chars"]) - 1 == len(lens["loss_intact"])
    check_log(server, capfd)


@given(
    body=st.binary(max_size=40),
    content_type=st.sampled_from(
        [b"application/json", b"application/JSON; charset=utf-8", b"text/plain", b"", b"application/json;;;=\xff"]
    ),
)
@FUZZ
def test_fuzzed_raw_bodies_get_a_json_answer(server, capfd, body, content_type):
    answer(exchange(server, request(path=b"/api/attention", body=body, content_type=content_type)))
    check_log(server, capfd)


def header_values():
    """A header value's text, as bytes (HTTP headers are bytes; the server reads them as
    Latin-1): any characters but the line break that would end the header."""
    alphabet = st.sampled_from([c for c in ODD if c not in "\r\n"]) | st.characters(exclude_characters="\r\n")
    return st.text(alphabet=alphabet, max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass"))


@given(
    length=header_values() | st.integers(-(10**6), 10**30).map(lambda n: str(n).encode()),
    host=header_values(),
    method=st.sampled_from([b"GET", b"POST"]),
)
@FUZZ
def test_fuzzed_content_length_and_host_get_a_json_answer(server, capfd, length, host, method):
    path = b"/api/info" if method == b"GET" else b"/api/attention"
    status, _, _ = answer(exchange(server, request(method, path, body=b'{"text": "KING"}', host=host, length=length)))
    assert status == 403 or serve.LOOPBACK_HOST.fullmatch(host.decode("latin-1")), (host, status)  # a foreign Host is refused
    check_log(server, capfd)


@given(
    method=st.binary(min_size=1, max_size=10) | st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"HEAD"]),
    path=st.binary(max_size=30) | st.sampled_from([b"/", b"/api/info", b"//[", b"/api/info?x=%ff", b"/../../etc/passwd"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1", b"HTTP/a.b", b"", b"http/1.1"]),
)
@FUZZ
def test_fuzzed_request_lines_get_a_json_answer(server, capfd, method, path, version):
    line = b" ".join(part for part in (method, path, version) if part).replace(b"\r", b"").replace(b"\n", b"")
    words = line.decode("latin-1").split()  # as the server splits it: "\x85" and "\x1c" are spaces to str.split
    status, content_type, body = answer(exchange(server, line + b"\r\nHost: 127.0.0.1\r\n\r\n"), to_head=words[:1] == ["HEAD"])
    assert status != 200 or (words[0] == "GET" and content_type.startswith(("text/html", "application/json")))
    assert status == 200 or b"<html" not in body.lower()  # never the standard library's error page
    check_log(server, capfd)


@pytest.mark.parametrize(
    "length, status",
    # headers arrive as Latin-1: b"\xb2" is "²", which str.isdigit takes and int() does not
    [
        (b"-1", 400),
        (b"1e3", 400),
        (b"+16", 400),
        (b"0x10", 400),
        (b"1_6", 400),
        ("٣".encode(), 400),
        (b"\xb2", 400),
        (b"1\xb9", 400),
        (b"", 400),
        (b" 16 ", 200),
        (b"0" * 30 + b"16", 200),
        pytest.param(b"9" * 5000, 413, id="5000 digits"),
        (b"99999999999999999999", 413),
    ],
)
def test_odd_content_lengths(server, capfd, length, status):
    reply = exchange(server, request(b"POST", b"/api/attention", body=b'{"text": "KING"}', length=length))
    assert answer(reply)[0] == status, reply[:300]
    check_log(server, capfd)


@pytest.mark.parametrize(
    "host, status",
    [
        (b"localhost", 200),
        (b"LOCALHOST:80", 200),
        (b"[::1]:8000", 200),
        (b"127.0.0.1:1", 200),
        (b"", 403),
        (b"[", 403),
        (b"[::1", 403),
        (b"localhost:abc", 403),
        ("localhoſt".encode(), 403),
        ("\u212aing".encode(), 403),
        (b"localhost.", 403),
        ("ｌocalhost".encode(), 403),
        (b"user@localhost", 403),
        (b"127.0.0.1.nip.io", 403),
        (b"evil.example:80", 403),
        ("\u2100".encode(), 403),
        (b"localhost\x00", 403),
    ],
)
def test_odd_hosts(server, capfd, host, status):
    assert answer(exchange(server, request(b"GET", b"/api/info", host=host)))[0] == status
    check_log(server, capfd)


def test_many_headers_a_long_line_and_an_empty_request_line_are_json(server, capfd):
    too_many = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n"
    too_long = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n"
    long_path = b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"
    for data, status in [(too_many, 431), (too_long, 431), (long_path, 414), (b"\r\n\r\n", 400), (b"GET /\r\n\r\n", 403)]:
        assert answer(exchange(server, data))[0] == status
    check_log(server, capfd)
