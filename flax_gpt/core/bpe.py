"""GPT-2's byte-level BPE, restated without torchtext (SPEC.md, "GPT-2 family options"): the
tokenizer of GPT-2 checkpoints, read from its two files.

    encoder.json   {token: id}; a token is a string of byte-level characters (below)
    vocab.bpe      "#version" line, then one merge per line, "left right", best first

Text is split by PATTERN into words (a leading space stays with its word); each word's UTF-8
bytes become printable characters (`bytes_to_unicode`, so that no byte is whitespace or a
control character), and the pair of adjacent symbols with the best merge rank is merged until
none is left. Decoding joins the tokens' bytes before reading UTF-8, since one character's
bytes may be split across tokens.

`flax-gpt prepare --tokenizer gpt2` uses torchtext's `GPT2BPETokenizer` where it loads and
this one elsewhere; tests/test_bpe.py holds the two (and tiktoken, seeded from the same
files) equal id for id.
"""

import functools
import json

import numpy as np
import regex

from flax_gpt.core.errors import DatasetError
from flax_gpt.core.files import sha256_bytes

ENCODER_FILE, MERGES_FILE = "encoder.json", "vocab.bpe"
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token: id 50256, between documents
URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_SHA256 = {  # GPT-2's own files (SPEC.md): any other pair is not GPT-2's vocabulary
    ENCODER_FILE: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    MERGES_FILE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# openai/gpt-2's src/encoder.py: contractions, letters, digits, other symbols (each with one
# leading space), then whitespace, of which a run before a word leaves its last space to it
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@functools.cache
def bytes_to_unicode():
    """{byte: character}: printable Latin-1 bytes stand for themselves, the other 68 (space,
    control characters, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + i) for i, b in enumerate(others)}}


class BPE:
    """GPT-2's tokenizer from `encoder` ({token: id}) and `merges` ([(left, right)], best
    first). `encode(text)` -> ids, `decode_bytes(ids)` -> bytes, `decode(ids)` -> text."""

    def __init__(self, encoder, merges):
        self.encoder = encoder
        self.tokens = {i: token for token, i in encoder.items()}  # id -> token
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.eot = encoder.get(END_OF_TEXT)
        self._word = functools.lru_cache(maxsize=1 << 16)(self._merge)

    @property
    def vocab_size(self):
        return len(self.tokens)

    @property
    def itos(self):
        """The tokens in id order."""
        return [self.tokens[i] for i in range(self.vocab_size)]

    @classmethod
    def from_bytes(cls, encoder_json, merges_bpe, where="the BPE files"):
        """The tokenizer of the two files' contents, or a DatasetError that names what is
        wrong with them (`where`: how to name them)."""
        try:
            encoder = json.loads(encoder_json.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{where}: {ENCODER_FILE} is not JSON ({e})") from None
        if (not isinstance(encoder, dict) or not encoder
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                           for i in encoder.values())):
            raise DatasetError(f"{where}: {ENCODER_FILE} is not an object of token -> id")
        if sorted(encoder.values()) != list(range(len(encoder))):
            raise DatasetError(f"{where}: {ENCODER_FILE}'s ids are not 0 to {len(encoder) - 1}, "
                               f"each once")
        try:
            lines = merges_bpe.decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{where}: {MERGES_FILE} is not UTF-8 (byte {e.start})") from None
        # as openai/gpt-2, torchtext and tiktoken read it: the "#version" line, then merges
        # up to the final newline
        if not lines[0].startswith("#version") or lines[-1] != "":
            raise DatasetError(f"{where}: {MERGES_FILE} must start with a '#version' line and "
                               f"end with a newline")
        merges = [tuple(line.split(" ")) for line in lines[1:-1]]
        for n, pair in enumerate(merges, start=2):
            if len(pair) != 2 or not all(pair) or "".join(pair) not in encoder:
                raise DatasetError(f"{where}: {MERGES_FILE} line {n} is not a merge of two "
                                   f"symbols whose join is in {ENCODER_FILE}")
        byte_chars = set(bytes_to_unicode().values())
        missing = byte_chars - set(encoder)
        if missing:
            raise DatasetError(f"{where}: {ENCODER_FILE} lacks {len(missing)} of the 256 "
                               f"byte tokens: not a byte-level BPE vocabulary")
        foreign = next((t for t in encoder if not set(t) <= byte_chars), None)
        if foreign is not None:
            raise DatasetError(f"{where}: {ENCODER_FILE}'s token {foreign!r} is not written in "
                               f"byte tokens: not a byte-level BPE vocabulary")
        return cls(encoder, merges)

    def encode(self, text):
        """GPT-2's ids of `text` (a str). `<|endoftext|>` in the text is read as text, as
        GPT-2's own encoder reads it; the id goes between documents (data preparation)."""
        ids = []
        for word in PATTERN.findall(text):
            ids.extend(self._word("".join(self.byte_char[b] for b in word.encode("utf-8"))))
        return ids

    def _merge(self, word):
        """The ids of one pre-tokenized word, its byte characters merged by rank."""
        symbols = list(word)
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)

    def token_bytes(self, i):
        """The bytes token `i` stands for (b"" for an id the vocabulary lacks)."""
        return bytes(self.char_byte[c] for c in self.tokens.get(int(i), ""))

    def byte_lengths(self):
        """numpy array: the number of text bytes each id stands for, 0 for `<|endoftext|>`
        (a document boundary, not text)."""
        lengths = np.array([len(self.token_bytes(i)) for i in range(self.vocab_size)])
        if self.eot is not None:
            lengths[self.eot] = 0
        return lengths

    def decode_bytes(self, ids):
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids, errors="replace"):
        """The text of `ids`: their bytes joined, then read as UTF-8 (`errors` for bytes that
        are not, e.g. a character cut off at the end of a sample)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


def sha256s(encoder_json, merges_bpe):
    return {ENCODER_FILE: sha256_bytes(encoder_json), MERGES_FILE: sha256_bytes(merges_bpe)}


def is_gpt2(digests):
    """True when the two files' sha256 (`sha256s`) are GPT-2's own."""
    return digests == GPT2_SHA256
