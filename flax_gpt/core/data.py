"""A prepared dataset folder, loaded and batched without torchtext, jax or torch.

`flax-gpt prepare` (flax_gpt/prepare.py, the one module that imports torchtext, and only
with its default --implementation torchtext) writes:

    vocab.txt       one token per line, in id order (tokens never contain whitespace)
    train.npy       training token ids, smallest unsigned dtype that fits the vocabulary
    val.npy         validation token ids, same dtype
    manifest.json   sources, tokenizer, specials, options, counts, file checksums

or, prepared with `--tokenizer gpt2`, GPT-2's encoder.json and vocab.bpe in place of
vocab.txt (flax_gpt.core.bpe), so that the folder encodes and decodes text on its own.

Batches follow SPEC.md: the token stream is cut into rows of `seq_len` tokens, `x` is a
`(batch_size, seq_len)` block of rows, `y[:, :-1] = x[:, 1:]` and `y[:, -1] = -100`.
"""

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flax_gpt.core.errors import DatasetError
from flax_gpt.core.files import sha256_bytes

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.txt"
SPLITS = ("train", "val")
SPECIALS = ("<unk>", "<bos>", "<eos>")
UNK, BOS, EOS = 0, 1, 2
IGNORE_INDEX = -100

_BASIC_ENGLISH = [  # torchtext 0.18's basic_english rules, for prepare and encode() without it
    (re.compile(r"\'"), " '  "),
    (re.compile(r"\""), ""),
    (re.compile(r"\."), " . "),
    (re.compile(r"<br \/>"), " "),
    (re.compile(r","), " , "),
    (re.compile(r"\("), " ( "),
    (re.compile(r"\)"), " ) "),
    (re.compile(r"\!"), " ! "),
    (re.compile(r"\?"), " ? "),
    (re.compile(r"\;"), " "),
    (re.compile(r"\:"), " "),
    (re.compile(r"\s+"), " "),
]


def basic_english(line):
    """torchtext's `basic_english` tokenizer, restated so that loading needs no torchtext.

    tests/test_torchtext.py holds it equal to torchtext's own on a whole corpus and on
    fuzzed text.
    """
    line = line.lower()
    for pattern, replacement in _BASIC_ENGLISH:
        line = pattern.sub(replacement, line)
    return line.split()


def build_vocab(token_lines, *, min_freq=1, specials=SPECIALS, max_tokens=None):
    """torchtext 0.18's `build_vocab_from_iterator(..., special_first=True)` restated: the
    vocabulary (id -> token) it builds from `token_lines` (lists of tokens).

    The specials come first; then the words by descending count, ties in Python's string
    order (code points), as torchtext sorts them. Its quirks are kept so that both give the
    same files (tests/test_torchtext.py holds them equal): `max_tokens` cuts the ranked words
    to `max_tokens - len(specials)` *before* words spelled like a special are dropped and
    before `min_freq` applies, so either can leave the vocabulary shorter than `max_tokens`.
    """
    if max_tokens is not None and max_tokens <= len(specials):
        raise ValueError(f"max_tokens {max_tokens} leaves no room beside {len(specials)} specials")
    counts = Counter()
    for tokens in token_lines:
        counts.update(tokens)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if max_tokens is not None:
        ranked = ranked[: max_tokens - len(specials)]
    return [*specials, *(token for token, n in ranked if n >= min_freq and token not in specials)]


def id_dtype(vocab_size):
    """The smallest unsigned integer dtype that holds every id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DatasetError(f"vocabulary of {vocab_size} tokens is too large for uint32 ids")


def make_batch(rows):
    """SPEC.md labels for a block of rows: next token inside the row, -100 at the end."""
    x = rows.astype(np.int32)
    y = np.empty_like(x)
    y[:, :-1] = x[:, 1:]
    y[:, -1] = IGNORE_INDEX
    return x, y


@dataclass
class TokenDataset:
    """A prepared dataset: vocabulary, train and validation ids, and the manifest."""

    itos: list
    train: np.ndarray
    val: np.ndarray
    manifest: dict
    path: Path | None = None
    bpe: object = None  # GPT-2's tokenizer (flax_gpt.core.bpe.BPE) of a gpt2 dataset
    stoi: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.stoi = {token: i for i, token in enumerate(self.itos)}

    @property
    def vocab_size(self):
        return len(self.itos)

    @property
    def vocab_sha256(self):
        """What fixes text <-> ids: the sha256 of vocab.txt, or of GPT-2's encoder.json and
        vocab.bpe's two sha256."""
        files = self.manifest["files"]
        if self.bpe:
            return sha256_bytes(f"{files['encoder']['sha256']} {files['merges']['sha256']}".encode())
        return files["vocab"]["sha256"]

    # ---- loading -------------------------------------------------------------------

    @classmethod
    def load(cls, path):
        """Open a folder written by `flax-gpt prepare`; raise DatasetError if it is damaged."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DatasetError(f"{path} is a file, not a dataset folder: pass the folder "
                               f"'flax-gpt prepare --out' wrote")
        if not path.is_dir():
            raise DatasetError(f"dataset folder {path} does not exist: run 'flax-gpt prepare' first")
        manifest = _read_manifest(path)
        files = manifest["files"]
        tokenizer = None
        if manifest["tokenizer"] == "gpt2":
            from flax_gpt.core import bpe

            tokenizer = bpe.BPE.from_bytes(
                *(_read_checked(path / files[key]["name"], files[key]["sha256"])
                  for key in ("encoder", "merges")), where=str(path))
            itos = tokenizer.itos
        else:
            itos = _read_vocab(path / files["vocab"]["name"], files["vocab"]["sha256"])
        counts = manifest["counts"]
        if len(itos) != counts["vocab_size"]:
            raise DatasetError(
                f"{path}: vocabulary has {len(itos)} tokens but the manifest says "
                f"{counts['vocab_size']}; prepare the dataset again"
            )
        if tokenizer is None and tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise DatasetError(f"{path}: vocabulary does not start with {', '.join(SPECIALS)}")
        arrays = {}
        for split in SPLITS:
            entry = files[split]
            arrays[split] = _read_ids(
                path / entry["name"], entry["sha256"], counts[f"{split}_tokens"], len(itos)
            )
        return cls(itos=itos, manifest=manifest, path=path, bpe=tokenizer, **arrays)

    @classmethod
    def of_bpe(cls, tokenizer):
        """No text, only GPT-2's tokenizer `tokenizer` (a flax_gpt.core.bpe.BPE): what generate
        reads a weights file's ids with."""
        empty = np.zeros(0, id_dtype(tokenizer.vocab_size))
        return cls(itos=tokenizer.itos, train=empty,
                   val=empty, manifest={"tokenizer": "gpt2", "files": {}}, bpe=tokenizer)

    # ---- text <-> ids --------------------------------------------------------------

    @property
    def start(self):
        """The id a sample starts from: `<bos>`, or GPT-2's `<|endoftext|>` (a document's
        start, as GPT-2 generates unconditioned text)."""
        return self.bpe.eot if self.bpe else BOS

    def token_id(self, token):
        """The id of `token` (a word, a special, or with GPT-2's BPE any text that is one
        token), or a DatasetError."""
        if self.bpe:
            ids = [self.bpe.eot] if token == self.bpe.tokens[self.bpe.eot] else self.bpe.encode(token)
            if len(ids) == 1:
                return ids[0]
        elif token in self.stoi:
            return self.stoi[token]
        hint = f"token, or {self.itos[self.bpe.eot]}" if self.bpe else f"word, or {self.itos[EOS]}"
        raise DatasetError(f"{token!r} is not in the vocabulary as one token: pass a single {hint}")

    def encode(self, text, *, bos_eos=False):
        """Token ids of `text`: GPT-2's BPE for a gpt2 dataset, else basic_english, unknown
        words mapping to `<unk>` (id 0).

        With `bos_eos` (basic_english), each non-empty line is wrapped in `<bos> ... <eos>`
        as in training.
        """
        if self.bpe:
            return self.bpe.encode(text)
        ids = []
        for line in text.splitlines() or [text]:
            tokens = [self.stoi.get(t, UNK) for t in basic_english(line)]
            if bos_eos and tokens:
                tokens = [BOS, *tokens, EOS]
            ids.extend(tokens)
        return ids

    def unknown_words(self, text):
        """The words of `text` that are not in the vocabulary (they would encode as <unk>;
        none with GPT-2's BPE, which encodes any text)."""
        return [] if self.bpe else [t for t in basic_english(text) if t not in self.stoi]

    def decode(self, ids):
        """basic_english: tokens joined by spaces (it drops the original spacing). GPT-2's
        BPE: the tokens' bytes joined, read as UTF-8 (U+FFFD where they are not)."""
        if self.bpe:
            return self.bpe.decode(ids)
        return " ".join(self.itos[int(i)] for i in ids)

    def render(self, ids, *, specials=False):
        """Text for a reader: each `<eos>` ends a line and `<bos>` is dropped, as they were
        added to mark the lines of the text; with `specials`, every token as is (`decode`).
        `<unk>` stays either way: it stands for a word. GPT-2's BPE: `decode`, its
        `<|endoftext|>` written out."""
        if specials or self.bpe:
            return self.decode(ids)
        lines, words = [], []
        for i in map(int, ids):
            if i == EOS:
                lines.append(" ".join(words))
                words = []
            elif i != BOS:
                words.append(self.itos[i])
        return "\n".join([*lines, " ".join(words)]).rstrip("\n")

    # ---- batches -------------------------------------------------------------------

    def split(self, name):
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def num_batches(self, split, batch_size, seq_len, *, drop_last=True):
        rows = _rows(self.split(split), seq_len, split)
        return len(rows) // batch_size if drop_last else -(-len(rows) // batch_size)

    def check_batches(self, split, batch_size, seq_len):
        """Raise DatasetError unless `split` gives at least one full batch."""
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}")
        rows = len(_rows(self.split(split), seq_len, split))
        if rows < batch_size:
            raise DatasetError(
                f"the {split} split has {rows} rows of {seq_len} tokens, fewer than "
                f"batch_size {batch_size}: use a smaller --batch-size or --seq-len, or more text"
            )

    def batches(self, split, batch_size, seq_len, *, shuffle=False, seed=0, epoch=0,
                start=0, drop_last=True):
        """Yield one pass of numpy `(x, y)` int32 batches of shape `(batch_size, seq_len)`.

        The stream is cut into `len // seq_len` rows (the tail that does not fill a row is
        dropped). With `shuffle`, row order is a permutation drawn from `(seed, epoch)`, so a
        run can be resumed exactly from `(epoch, start)`, `start` being a batch index.
        """
        if drop_last:
            self.check_batches(split, batch_size, seq_len)
        elif batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}")
        rows = _rows(self.split(split), seq_len, split)
        order = np.arange(len(rows))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        stop = len(rows) - len(rows) % batch_size if drop_last else len(rows)
        for begin in range(start * batch_size, stop, batch_size):
            yield make_batch(rows[order[begin:begin + batch_size]])


def _rows(ids, seq_len, split):
    if seq_len < 1:
        raise DatasetError(f"seq_len must be at least 1, got {seq_len}")
    n = len(ids) // seq_len
    if n == 0:
        raise DatasetError(
            f"seq_len {seq_len} is larger than the {split} split ({len(ids)} tokens): "
            f"use a smaller --seq-len or more text"
        )
    return ids[: n * seq_len].reshape(n, seq_len)  # (rows, seq_len)


def _read_manifest(path):
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} has no {MANIFEST}: it is not a prepared dataset folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path / MANIFEST} is unreadable or truncated ({e}); prepare again") from None
    try:
        if manifest["format_version"] != FORMAT_VERSION:
            raise DatasetError(
                f"{path} has dataset format {manifest['format_version']}, this flax-gpt reads "
                f"{FORMAT_VERSION}; prepare it again"
            )
        keys = {"basic_english": ("vocab",), "gpt2": ("encoder", "merges")}[manifest["tokenizer"]]
        for key in (*keys, *SPLITS):
            for field_name in ("name", "sha256"):
                if not isinstance(manifest["files"][key][field_name], str):
                    raise TypeError(f"files.{key}.{field_name} is not a string")
        for key in ("vocab_size", "train_tokens", "val_tokens"):
            int(manifest["counts"][key])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path / MANIFEST} is missing or has a bad entry {e}; prepare again") from None
    return manifest


def _read_checked(file, sha256):
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{file} is missing; prepare the dataset again") from None
    except OSError as e:
        raise DatasetError(f"cannot read {file}: {e}") from None
    if sha256_bytes(data) != sha256:
        raise DatasetError(f"{file} does not match its checksum in the manifest (truncated or "
                           f"modified); prepare the dataset again")
    return data


def _read_vocab(file, sha256):
    payload = _read_checked(file, sha256)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{file}: byte {e.start} is not valid UTF-8 (prepare writes UTF-8); "
                           f"prepare the dataset again") from None
    return text.split("\n")[:-1]


def _read_ids(file, sha256, count, vocab_size):
    try:
        ids = np.load(io.BytesIO(_read_checked(file, sha256)), allow_pickle=False)
    except ValueError as e:
        raise DatasetError(f"{file} is not a valid .npy array ({e}); prepare again") from None
    if ids.ndim != 1 or ids.dtype != id_dtype(vocab_size) or len(ids) != count:
        raise DatasetError(
            f"{file} holds {ids.dtype} {ids.shape}, the manifest expects "
            f"{id_dtype(vocab_size)} ({count},); prepare the dataset again"
        )
    if count and int(ids.max()) >= vocab_size:
        raise DatasetError(f"{file} has ids beyond the vocabulary of {vocab_size}; prepare again")
    return ids
