"""`flax-gpt prepare`: text -> torchtext vocabulary and ids -> a framework-free dataset folder.

This is the only module of the project that imports torchtext (SPEC.md, "Data").
"""

import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torchtext

torchtext.disable_torchtext_deprecation_warning()  # 0.18 is final; the warning says only that
from torchtext.data.utils import get_tokenizer  # noqa: E402
from torchtext.vocab import build_vocab_from_iterator  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flax_gpt.core import data  # noqa: E402
from flax_gpt.core.errors import DatasetError  # noqa: E402
from flax_gpt.core.files import atomic_dir, sha256_bytes, sha256_file  # noqa: E402

CORPORA = {
    "tinyshakespeare": {
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "file": "tinyshakespeare.txt",
    },
}
PROGRESS_MIN_BYTES = 8 << 20  # a progress bar only where the work takes a while


def cache_dir():
    """Where downloaded corpora live: $FLAX_GPT_CACHE, else $XDG_CACHE_HOME/flax_gpt."""
    if os.environ.get("FLAX_GPT_CACHE"):
        return Path(os.environ["FLAX_GPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flax_gpt"


def corpus_path(name):
    """Where the cache keeps corpus `name` (a copy placed there is used, sha256-checked)."""
    return cache_dir() / CORPORA[name]["file"]


def fetch_corpus(name, *, offline="pass a local copy with --text-file PATH"):
    """The bytes of a public corpus, from the cache or downloaded once and checksum-verified.
    `offline`: what the error says to do without a network (the command's own options)."""
    corpus = CORPORA[name]
    path = corpus_path(name)
    if path.is_file() and sha256_file(path) == corpus["sha256"]:
        return path.read_bytes()
    try:
        with urllib.request.urlopen(corpus["url"], timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise DatasetError(
            f"cannot download corpus {name!r} ({getattr(e, 'reason', e)}): with no network, "
            f"{offline}"
        ) from None
    digest = sha256_bytes(payload)
    if digest != corpus["sha256"]:
        raise DatasetError(
            f"downloaded {name!r} has sha256 {digest}, expected {corpus['sha256']}: "
            f"the source changed or the download is damaged; pass --text-file PATH instead"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return payload


def read_text_file(path):
    """The bytes of a user's text file, or a DatasetError that says why not."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"text file {path} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(f"{path} is a folder: pass a text file with --text-file") from None
    except OSError as e:
        raise DatasetError(f"cannot read text file {path}: {e.strerror}") from None


def decode(name, payload, errors):
    try:
        return payload.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{name}: byte {e.start} (0x{payload[e.start]:02x}) is not valid UTF-8: fix the file "
            f"or pass --errors replace to read it as U+FFFD"
        ) from None


def prepare(sources, out, *, min_freq=1, max_vocab=None, val_fraction=0.1, errors="strict",
            force=False):
    """Tokenize `sources` (a list of `(name, bytes)`), build the vocabulary, write `out`.

    Returns the manifest. Lines with no tokens are skipped; the last `val_fraction` of the
    remaining lines is the validation split, so the split is deterministic and contiguous.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():  # --force replaces a dataset folder, never a file
        raise DatasetError(f"--out {out} is a file, not a dataset folder: choose another --out")
    if out.exists() and not force:
        raise DatasetError(f"output folder {out} already exists: pass --force to replace it")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if max_vocab is not None and max_vocab < len(data.SPECIALS) + 1:
        raise DatasetError(
            f"--max-vocab {max_vocab} leaves no room for words beside the "
            f"{len(data.SPECIALS)} specials {', '.join(data.SPECIALS)}: use at least "
            f"{len(data.SPECIALS) + 1}"
        )
    if min_freq < 1:
        raise DatasetError(f"--min-freq must be at least 1, got {min_freq}")

    tokenizer = get_tokenizer("basic_english")
    total_bytes = sum(len(payload) for _, payload in sources)
    lines = []
    for name, payload in sources:
        text = decode(name, payload, errors)
        tokenized = [
            tokens
            # a bar on a terminal only: redirected to a log, its frames would fill it
            for tokens in map(tokenizer, tqdm(text.splitlines(), desc=f"tokenizing {name}",
                                              unit=" lines",
                                              disable=total_bytes < PROGRESS_MIN_BYTES
                                              or not sys.stderr.isatty()))
            if tokens
        ]
        if not tokenized:
            raise DatasetError(f"{name} has no tokens: pass a file with some text in it")
        lines.extend(tokenized)

    n_val = round(len(lines) * val_fraction)
    if n_val == 0 or n_val == len(lines):
        raise DatasetError(
            f"--val-fraction {val_fraction} of {len(lines)} lines leaves the "
            f"{'validation' if n_val == 0 else 'training'} split empty: choose another fraction "
            f"or pass more text"
        )
    train_lines, val_lines = lines[: len(lines) - n_val], lines[len(lines) - n_val:]

    vocab = build_vocab_from_iterator(
        iter(train_lines), min_freq=min_freq, specials=list(data.SPECIALS), special_first=True,
        max_tokens=max_vocab,
    )
    vocab.set_default_index(data.UNK)
    itos = vocab.get_itos()
    if len(itos) == len(data.SPECIALS):
        raise DatasetError(f"--min-freq {min_freq} leaves no word in the vocabulary (every word "
                           f"would read as <unk>): use a smaller --min-freq")
    dtype = data.id_dtype(len(itos))

    def ids(split_lines):
        stream = []
        for tokens in split_lines:
            stream.append(data.BOS)
            stream.extend(vocab(tokens))
            stream.append(data.EOS)
        return np.asarray(stream, dtype=dtype)

    arrays = {"train": ids(train_lines), "val": ids(val_lines)}
    vocab_bytes = "".join(f"{token}\n" for token in itos).encode("utf-8")
    files = {"vocab": {"name": data.VOCAB_FILE, "sha256": sha256_bytes(vocab_bytes)}}
    npy = {}
    for split, array in arrays.items():
        npy[split] = _npy_bytes(array)
        files[split] = {"name": f"{split}.npy", "sha256": sha256_bytes(npy[split])}

    manifest = {
        "format_version": data.FORMAT_VERSION,
        "sources": [
            {"name": name, "bytes": len(payload), "sha256": sha256_bytes(payload)}
            for name, payload in sources
        ],
        "tokenizer": "basic_english",
        "specials": list(data.SPECIALS),
        "options": {"min_freq": min_freq, "max_vocab": max_vocab,
                    "val_fraction": val_fraction, "errors": errors},
        "counts": {
            "vocab_size": len(itos),
            "train_lines": len(train_lines),
            "val_lines": len(val_lines),
            "train_tokens": len(arrays["train"]),
            "val_tokens": len(arrays["val"]),
        },
        "dtype": dtype.name,
        "files": files,
        "torchtext_version": torchtext.__version__,
    }
    try:
        with atomic_dir(out, force=force) as tmp:
            (tmp / data.VOCAB_FILE).write_bytes(vocab_bytes)
            for split in data.SPLITS:
                (tmp / files[split]["name"]).write_bytes(npy[split])
            (tmp / data.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
    except FileExistsError:
        raise DatasetError(f"output folder {out} already exists: pass --force to replace it") from None
    except OSError as e:
        raise DatasetError(f"cannot write {out}: {e.strerror}") from None
    return manifest


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
