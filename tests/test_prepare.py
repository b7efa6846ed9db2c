"""prepare.py and the tokenizer: split, vocabulary, bad inputs, and the download against a local server."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import prepare
from chargpt.tokenizer import CharTokenizer
from conftest import ROOT


def test_encode_decode_round_trip(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert list(tok.chars) == sorted(set(text))


def test_encode_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'x'.*'z'|'z'.*'x'"):
        tok.encode("abxz")


def test_prepare_writes_split_and_vocabulary(tmp_path, text):
    out = tmp_path / "d"
    meta = prepare.prepare(text, str(out))
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    stored = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert stored["chars"] == "".join(sorted(set(text))) == meta["chars"]
    tok = CharTokenizer(stored["chars"])
    assert tok.decode(train.tolist()) == text[: len(train)]
    assert tok.decode(val.tolist()) == text[len(train) :]


def test_prepare_any_utf8_text(tmp_path):
    text = "Ça va? Привет, мир! 日本語のテキスト。\n" * 20
    src = tmp_path / "mine.txt"
    src.write_text(text, encoding="utf-8")
    assert prepare.main(["--input", str(src), "--out_dir", str(tmp_path / "mine")]) == 0
    stored = json.loads((tmp_path / "mine" / "meta.json").read_text(encoding="utf-8"))
    assert set(stored["chars"]) == set(text)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"abc\x00def" * 10, "binary"), (b"caf\xe9 au lait" * 10, "not UTF-8")],
    ids=["empty", "binary", "latin1"],
)
def test_prepare_rejects_bad_text(tmp_path, capsys, content, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    out = tmp_path / "out"
    assert prepare.main(["--input", str(src), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(src) in err and len(err.strip().splitlines()) == 1
    assert not (out / "train.bin").exists()


def test_prepare_missing_input(tmp_path, capsys):
    assert prepare.main(["--input", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "o")]) == 1
    assert "nope.txt" in capsys.readouterr().err


# -- the download, against a server on 127.0.0.1 ----------------------------------------

BODY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/missing":
            self.send_error(404)
            return
        body = BODY if self.path != "/changed" else BODY.replace(b"speak", b"shout")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if self.path == "/truncated" else 0)))
        self.end_headers()
        self.wfile.write(body)  # /truncated closes the connection 100 bytes short

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_good_file(tmp_path, server):
    out = tmp_path / "d"
    sha = hashlib.sha256(BODY).hexdigest()
    assert prepare.main(["--url", f"{server}/good", "--sha256", sha, "--out_dir", str(out)]) == 0
    assert (out / "input.txt").read_bytes() == BODY
    assert (out / "train.bin").exists() and (out / "meta.json").exists()


@pytest.mark.parametrize("path, message", [("/missing", "404"), ("/truncated", "failed|cut short"), ("/changed", "wrong sha256")])
def test_download_failures_leave_nothing(tmp_path, server, capsys, path, message):
    out = tmp_path / "d"
    sha = hashlib.sha256(BODY).hexdigest()
    assert prepare.main(["--url", f"{server}{path}", "--sha256", sha, "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert any(m in err for m in message.split("|")), err
    assert "--input" in err  # says how to supply the file by hand
    assert sorted(os.listdir(out)) == []  # no input.txt, no half-written file


def test_prepare_cli_uses_existing_input(tmp_path, text):
    out = tmp_path / "data" / "shakespeare_char"
    out.mkdir(parents=True)
    (out / "input.txt").write_text(text, encoding="utf-8")
    # an unreachable URL proves nothing is downloaded when input.txt is there
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "prepare.py"), "--out_dir", str(out), "--url", "http://127.0.0.1:9/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "train.bin").exists()
