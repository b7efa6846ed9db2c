"""Turn a text file into the token files train.py reads.

    python prepare.py                                    # tiny Shakespeare -> data/shakespeare_char/
    python prepare.py --input my.txt --out_dir data/mytext   # any UTF-8 text

Writes out_dir/train.bin and out_dir/val.bin (uint16 token ids: the first 90% of the text
for training, the rest for validation) and out_dir/meta.json (the vocabulary: the sorted
distinct characters, as plain JSON).

Without --input it uses out_dir/input.txt if present, else downloads tiny Shakespeare from
the char-rnn repository and checks its sha256. Nothing is half-written: every file goes to
a temporary name first and is renamed into place when whole.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np

from chargpt.atomic import write_atomic
from chargpt.tokenizer import CharTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


def download(url, path, sha256=None, timeout=30):
    """Fetch url into path, checking length and hash first; raise RuntimeError saying what failed."""
    import requests  # only needed when downloading

    how_by_hand = f"download it by hand and save it as {path}, or pass --input FILE"
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
        body = response.content
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if getattr(e, "response", None) is not None else type(e).__name__
        raise RuntimeError(f"download of {url} failed ({reason}); {how_by_hand}") from None
    expected_length = response.headers.get("Content-Length")
    if expected_length is not None and "Content-Encoding" not in response.headers and len(body) != int(expected_length):
        raise RuntimeError(f"download of {url} was cut short ({len(body)} of {expected_length} bytes); {how_by_hand}")
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise RuntimeError(f"download of {url} has the wrong sha256 (truncated or changed?); {how_by_hand}")
    write_atomic(path, body)


def read_text(path):
    """The contents of a UTF-8 text file; an empty, binary or non-UTF-8 file is a ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"{path} is empty")
    if b"\x00" in raw:
        raise ValueError(f"{path} looks binary (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def prepare(text, out_dir, source=""):
    """Write train.bin, val.bin and meta.json for text into out_dir; return the meta dict."""
    tokenizer = CharTokenizer.from_text(text)
    if tokenizer.vocab_size > 2**16:
        raise ValueError(f"the text has {tokenizer.vocab_size} distinct characters; uint16 tokens hold at most 65536")
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    n = int(TRAIN_FRACTION * len(ids))
    if n < 2 or len(ids) - n < 2:
        raise ValueError(f"the text has {len(ids)} characters: too short to split into train and val")
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "chars": tokenizer.chars,
        "train_tokens": n,
        "val_tokens": len(ids) - n,
        "source": source,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    write_atomic(os.path.join(out_dir, "train.bin"), ids[:n].tobytes())
    write_atomic(os.path.join(out_dir, "val.bin"), ids[n:].tobytes())
    # meta.json last: its presence says the other two are complete
    write_atomic(os.path.join(out_dir, "meta.json"), json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a UTF-8 text file to prepare (default: tiny Shakespeare)")
    parser.add_argument(
        "--out_dir", default=os.path.join("data", "shakespeare_char"), help="where the token files go (default: %(default)s)"
    )
    parser.add_argument("--url", default=SHAKESPEARE_URL, help="where to download the text from when there is no input file")
    parser.add_argument(
        "--sha256", default=None, help="expected sha256 of the download (default: tiny Shakespeare's, for its URL)"
    )
    args = parser.parse_args(argv)
    try:
        if args.input is not None:
            path = args.input
        else:
            path = os.path.join(args.out_dir, "input.txt")
            if not os.path.exists(path):
                os.makedirs(args.out_dir, exist_ok=True)
                sha256 = args.sha256 or (SHAKESPEARE_SHA256 if args.url == SHAKESPEARE_URL else None)
                print(f"downloading {args.url} -> {path}")
                download(args.url, path, sha256)
        text = read_text(path)
        meta = prepare(text, args.out_dir, source=path)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{path}: {len(text):,} characters, vocabulary of {meta['vocab_size']}")
    print(f"wrote {args.out_dir}/train.bin ({meta['train_tokens']:,} tokens), val.bin ({meta['val_tokens']:,} tokens), meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
