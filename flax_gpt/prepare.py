"""`flax-gpt prepare`: text -> token ids -> a framework-free dataset folder, with one of two
tokenizers: `basic_english` (words, and a vocabulary built on the training split; SPEC.md
"Data") or `gpt2` (GPT-2's byte-level BPE and its fixed vocabulary of 50,257, for GPT-2
checkpoints).

Two interchangeable implementations write the same files: `torchtext` (the default:
torchtext's own `get_tokenizer("basic_english")`, `build_vocab_from_iterator` and
`GPT2BPETokenizer`) and `builtin` (their restatements in flax_gpt.core.data and
flax_gpt.core.bpe, for stacks without torchtext; tests/test_torchtext.py and
tests/test_bpe.py hold them equal). This is the only module of the project that imports
torchtext, and only when asked to.
"""

import io
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from flax_gpt.core import bpe, data
from flax_gpt.core.errors import DatasetError, DependencyError
from flax_gpt.core.files import atomic_dir, sha256_bytes, sha256_file

IMPLEMENTATIONS = ("torchtext", "builtin")
TOKENIZERS = ("basic_english", "gpt2")
TORCHTEXT_INSTALL = "pip install 'flax-gpt[torchtext]' in a Python 3.11 environment"

CORPORA = {
    "tinyshakespeare": {
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "file": "tinyshakespeare.txt",
    },
}
BPE_FILES = {name: {"url": bpe.URL + name, "sha256": digest, "file": f"gpt2/{name}"}
             for name, digest in bpe.GPT2_SHA256.items()}
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
    return _fetch(f"corpus {name!r}", CORPORA[name], corpus_path(name), offline)


def fetch_bpe_files(offline="pass local copies with --bpe-files DIR"):
    """(encoder.json, vocab.bpe) bytes of GPT-2's tokenizer, from the cache or downloaded once
    from OpenAI's public location, checked against their sha256 in SPEC.md."""
    return tuple(_fetch(f"GPT-2's {name}", entry, cache_dir() / entry["file"], offline)
                 for name, entry in BPE_FILES.items())


def read_bpe_files(folder):
    """(encoder.json, vocab.bpe) bytes from a user's folder, or a DatasetError that says why
    not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--bpe-files {folder} is not a folder: pass the folder that holds "
                           f"{bpe.ENCODER_FILE} and {bpe.MERGES_FILE}")
    missing = [name for name in BPE_FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"--bpe-files {folder} has no {' or '.join(missing)}: pass the folder "
                           f"that holds {bpe.ENCODER_FILE} and {bpe.MERGES_FILE}")
    return tuple((folder / name).read_bytes() for name in BPE_FILES)


def gpt2_files(folder=None):
    """(encoder.json bytes, vocab.bpe bytes, how to name them in an error): from the user's
    `folder` (read_bpe_files), else GPT-2's own (fetch_bpe_files)."""
    if folder:
        return (*read_bpe_files(folder), f"--bpe-files {folder}")
    return (*fetch_bpe_files(), "GPT-2's BPE files")


def _fetch(what, entry, path, offline):
    if path.is_file() and sha256_file(path) == entry["sha256"]:
        return path.read_bytes()
    try:
        with urllib.request.urlopen(entry["url"], timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise DatasetError(
            f"cannot download {what} ({getattr(e, 'reason', e)}): with no network, {offline}"
        ) from None
    digest = sha256_bytes(payload)
    if digest != entry["sha256"]:
        raise DatasetError(
            f"downloaded {what} has sha256 {digest}, expected {entry['sha256']}: the source "
            f"changed or the download is damaged; {offline}"
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


@dataclass(frozen=True)
class Implementation:
    """Who tokenizes a line and builds the vocabulary. `vocabulary(token_lines, min_freq,
    max_tokens)` returns `(itos, ids_of)`, `ids_of(tokens)` giving ids with `<unk>` for words
    outside it. `gpt2(tokenizer, encoder_json, vocab_bpe)` returns `encode(text) -> ids` of
    GPT-2's BPE from the two files (`tokenizer`: the checked flax_gpt.core.bpe.BPE of them)."""

    name: str
    tokenize: Callable
    vocabulary: Callable
    gpt2: Callable
    torchtext_version: str | None  # the torchtext that produced the files; None for builtin


def load_implementation(name):
    """The implementation called `name` (one of IMPLEMENTATIONS), or a FlaxGPTError that says
    how to get it."""
    if name == "builtin":
        return Implementation("builtin", data.basic_english, _builtin_vocabulary,
                              lambda tokenizer, *files: tokenizer.encode, None)
    if name == "torchtext":
        return _torchtext()
    raise DatasetError(f"unknown implementation {name!r}: use one of {', '.join(IMPLEMENTATIONS)}")


def _builtin_vocabulary(token_lines, min_freq, max_tokens):
    itos = data.build_vocab(token_lines, min_freq=min_freq, max_tokens=max_tokens)
    stoi = {token: i for i, token in enumerate(itos)}
    return itos, lambda tokens: [stoi.get(token, data.UNK) for token in tokens]


def _torchtext():
    try:
        import torchtext

        torchtext.disable_torchtext_deprecation_warning()  # 0.18 is final; the warning says only that
        from torchtext.data.utils import get_tokenizer
        from torchtext.transforms import GPT2BPETokenizer
        from torchtext.vocab import build_vocab_from_iterator
    except (ImportError, OSError) as e:  # OSError: 0.18 beside a torch newer than 2.3 (undefined symbol)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DependencyError(
            f"--implementation torchtext (the default) needs torchtext, which does not load here "
            f"({reason}): {TORCHTEXT_INSTALL}, or pass --implementation builtin, the project's "
            f"restatement of it, which writes the same files"
        ) from None

    def vocabulary(token_lines, min_freq, max_tokens):
        vocab = build_vocab_from_iterator(
            iter(token_lines), min_freq=min_freq, specials=list(data.SPECIALS),
            special_first=True, max_tokens=max_tokens,
        )
        vocab.set_default_index(data.UNK)
        return vocab.get_itos(), vocab

    def gpt2(tokenizer, encoder_json, vocab_bpe):
        with tempfile.TemporaryDirectory() as folder:  # GPT2BPETokenizer reads paths
            paths = [Path(folder) / name for name in BPE_FILES]
            for path, payload in zip(paths, (encoder_json, vocab_bpe)):
                path.write_bytes(payload)
            encode = GPT2BPETokenizer(*map(str, paths))
        return lambda text: [int(i) for i in encode(text)]  # it returns ids as strings

    return Implementation("torchtext", get_tokenizer("basic_english"), vocabulary, gpt2,
                          torchtext.__version__)


def prepare(sources, out, *, force=False, **options):
    """Tokenize `sources` (a list of `(name, bytes)`), build the vocabulary, write the folder
    `out` (complete or absent). `options` are build()'s. Returns the manifest."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # --force replaces a dataset folder, never a file
        raise DatasetError(f"--out {out} is a file, not a dataset folder: choose another --out")
    if out.exists() and not force:
        raise DatasetError(f"output folder {out} already exists: pass --force to replace it")
    files, manifest = build(sources, **options)
    try:
        with atomic_dir(out, force=force) as tmp:
            for name, payload in files.items():
                (tmp / name).write_bytes(payload)
    except FileExistsError:
        raise DatasetError(f"output folder {out} already exists: pass --force to replace it") from None
    except OSError as e:
        raise DatasetError(f"cannot write {out}: {e.strerror}") from None
    return manifest


def check_options(tokenizer, min_freq, max_vocab, val_fraction):
    """Refuse options out of range or that `tokenizer` does not take (DatasetError), before
    any work."""
    if tokenizer not in TOKENIZERS:
        raise DatasetError(f"unknown tokenizer {tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if tokenizer == "gpt2" and (min_freq is not None or max_vocab is not None):
        raise DatasetError("--min-freq and --max-vocab build a basic_english vocabulary; GPT-2's "
                           "is fixed (its encoder.json): leave them out with --tokenizer gpt2")
    if max_vocab is not None and max_vocab < len(data.SPECIALS) + 1:
        raise DatasetError(
            f"--max-vocab {max_vocab} leaves no room for words beside the "
            f"{len(data.SPECIALS)} specials {', '.join(data.SPECIALS)}: use at least "
            f"{len(data.SPECIALS) + 1}"
        )
    if min_freq is not None and min_freq < 1:
        raise DatasetError(f"--min-freq must be at least 1, got {min_freq}")


def build(sources, *, tokenizer="basic_english", implementation="torchtext", min_freq=None,
          max_vocab=None, val_fraction=0.1, errors="strict", bpe_files=None,
          bpe_source="the BPE files"):
    """The dataset folder of `sources` (a list of `(name, bytes)`), in memory: `(files,
    manifest)`, `files` mapping each file name to its bytes.

    `tokenizer` "basic_english": lines with no tokens are skipped, each remaining line is
    `<bos> words <eos>`, and the vocabulary is built on the training split (`min_freq`
    default 1, `max_vocab` default no limit). "gpt2": GPT-2's
    BPE of `bpe_files` ((encoder.json, vocab.bpe) bytes, copied into the folder so that it
    decodes on its own; `bpe_source` names them in an error); every line is kept, newlines included, since they are text to GPT-2,
    and each source is one document, ending in `<|endoftext|>` as GPT-2's training data
    (the split's cut, inside a document, gets none).
    Either way the last `val_fraction` of the lines is the validation split, so the split is
    deterministic and contiguous. `implementation` (one of IMPLEMENTATIONS) changes only the
    manifest's `implementation` and `torchtext_version`.
    """
    check_options(tokenizer, min_freq, max_vocab, val_fraction)
    if tokenizer == "basic_english":
        min_freq = 1 if min_freq is None else min_freq
    impl = load_implementation(implementation)
    texts = [(name, decode(name, payload, errors)) for name, payload in sources]
    show = sum(len(payload) for _, payload in sources) >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    if tokenizer == "gpt2":
        contents, arrays, fields = _gpt2(texts, impl, bpe_files, bpe_source, val_fraction)
    else:
        contents, arrays, fields = _basic_english(texts, impl, min_freq, max_vocab, val_fraction,
                                                  show)
    files = {key: {"name": name, "sha256": sha256_bytes(contents[name])}
             for key, name in fields.pop("files").items()}
    for split, array in arrays.items():
        name = f"{split}.npy"
        contents[name] = _npy_bytes(array)
        files[split] = {"name": name, "sha256": sha256_bytes(contents[name])}
    manifest = {
        "format_version": data.FORMAT_VERSION,
        "sources": [
            {"name": name, "bytes": len(payload), "sha256": sha256_bytes(payload)}
            for name, payload in sources
        ],
        "tokenizer": tokenizer,
        "implementation": impl.name,
        "options": {"min_freq": min_freq, "max_vocab": max_vocab,
                    "val_fraction": val_fraction, "errors": errors},
        **fields,
        "dtype": arrays["train"].dtype.name,
        "files": files,
        "torchtext_version": impl.torchtext_version,
    }
    contents[data.MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return contents, manifest


def _split(n_lines, val_fraction):
    """The number of validation lines of `n_lines`, refused where a split would be empty."""
    n_val = round(n_lines * val_fraction)
    if n_val == 0 or n_val == n_lines:
        raise DatasetError(
            f"--val-fraction {val_fraction} of {n_lines} lines leaves the "
            f"{'validation' if n_val == 0 else 'training'} split empty: choose another fraction "
            f"or pass more text"
        )
    return n_val


def _basic_english(texts, impl, min_freq, max_vocab, val_fraction, show):
    lines = []
    for name, text in texts:
        tokenized = [
            tokens
            # a bar on a terminal only: redirected to a log, its frames would fill it
            for tokens in map(impl.tokenize, tqdm(text.splitlines(), desc=f"tokenizing {name}",
                                                  unit=" lines", disable=not show))
            if tokens
        ]
        if not tokenized:
            raise DatasetError(f"{name} has no tokens: pass a file with some text in it")
        lines.extend(tokenized)
    n_val = _split(len(lines), val_fraction)
    train_lines, val_lines = lines[: len(lines) - n_val], lines[len(lines) - n_val:]

    itos, ids_of = impl.vocabulary(train_lines, min_freq, max_vocab)
    if len(itos) == len(data.SPECIALS):
        raise DatasetError(f"--min-freq {min_freq} leaves no word in the vocabulary (every word "
                           f"would read as <unk>): use a smaller --min-freq")
    dtype = data.id_dtype(len(itos))

    def ids(split_lines):
        stream = []
        for tokens in split_lines:
            stream.append(data.BOS)
            stream.extend(ids_of(tokens))
            stream.append(data.EOS)
        return np.asarray(stream, dtype=dtype)

    arrays = {"train": ids(train_lines), "val": ids(val_lines)}
    contents = {data.VOCAB_FILE: "".join(f"{token}\n" for token in itos).encode("utf-8")}
    counts = {"vocab_size": len(itos), "train_lines": len(train_lines),
              "val_lines": len(val_lines), "train_tokens": len(arrays["train"]),
              "val_tokens": len(arrays["val"])}
    return contents, arrays, {"specials": list(data.SPECIALS), "counts": counts,
                              "files": {"vocab": data.VOCAB_FILE}}


def _gpt2(texts, impl, bpe_files, bpe_source, val_fraction):
    encoder_json, vocab_bpe = bpe_files
    tokenizer = bpe.BPE.from_bytes(encoder_json, vocab_bpe, where=bpe_source)
    if tokenizer.eot is None:
        raise DatasetError(f"{bpe_source}: {bpe.ENCODER_FILE} has no {bpe.END_OF_TEXT} token, "
                           f"which ends each document: pass GPT-2's files")
    encode = impl.gpt2(tokenizer, encoder_json, vocab_bpe)
    documents = []  # (name, its lines with their line endings)
    for name, text in texts:
        if not text:
            raise DatasetError(f"{name} is empty: pass a file with some text in it")
        documents.append((name, text.splitlines(keepends=True)))
    n_lines = sum(len(lines) for _, lines in documents)
    n_val = _split(n_lines, val_fraction)
    dtype = data.id_dtype(tokenizer.vocab_size)
    # per split, (text, whether a document ends with it): the split's cut is no document's
    # end, so the part before it gets no <|endoftext|>
    parts = {"train": [], "val": []}
    seen = 0
    for _, lines in documents:
        cut = min(max(n_lines - n_val - seen, 0), len(lines))  # where val begins in this one
        for split, piece, ends in (("train", lines[:cut], cut == len(lines)),
                                   ("val", lines[cut:], True)):
            if piece:
                parts[split].append(("".join(piece), ends))
        seen += len(lines)
    arrays = {split: np.asarray([i for text, ends in pieces
                                 for i in [*encode(text), *[tokenizer.eot] * ends]], dtype=dtype)
              for split, pieces in parts.items()}
    contents = dict(zip(BPE_FILES, bpe_files))
    digests = bpe.sha256s(encoder_json, vocab_bpe)
    counts = {"vocab_size": tokenizer.vocab_size, "train_lines": n_lines - n_val,
              "val_lines": n_val, "train_tokens": len(arrays["train"]),
              "val_tokens": len(arrays["val"]),
              **{f"{split}_bytes": sum(len(text.encode("utf-8")) for text, _ in pieces)
                 for split, pieces in parts.items()}}
    return contents, arrays, {"specials": [bpe.END_OF_TEXT], "counts": counts,
                              "gpt2_files": bpe.is_gpt2(digests),
                              "files": {"encoder": bpe.ENCODER_FILE, "merges": bpe.MERGES_FILE}}


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
