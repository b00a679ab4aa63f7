"""Datasets for the suite on either stack: the corpus (or a generated stand-in for it) and
`prepare` with whichever implementation the stack has."""

import functools
import itertools
import os
import random
import warnings

import pytest

from flax_gpt import prepare
from flax_gpt.core.errors import DependencyError

STAND_IN_NAME = "english-like.txt"


@functools.cache
def implementation():
    """torchtext where it loads (the reference that builtin is held to), else builtin: both
    write the same files, so every test that only needs a dataset runs on both stacks."""
    try:
        prepare.load_implementation("torchtext")
    except DependencyError:
        return "builtin"
    return "torchtext"


def prepare_dataset(sources, out, **options):
    """flax_gpt.prepare.prepare with the stack's implementation."""
    return prepare.prepare(sources, out, implementation=implementation(), **options)


def ci():
    """Whether this is a CI run: CI set to anything but empty, 0 or false (CI=true there)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def corpus_or_stand_in(corpus, folder):
    """`corpus` if it is there; else, in CI, a loud failure (CI must test on the real
    corpus, not pass on a stand-in); else generated English-like text written into `folder`,
    with a warning, so that no test skips for want of the corpus."""
    if corpus.is_file():
        return corpus
    if ci():
        pytest.fail(f"{corpus} is missing and CI is set: CI tests on the real corpus; put "
                    f"the shared folder beside the checkout", pytrace=False)
    stand_in = folder / STAND_IN_NAME
    stand_in.write_text(english_like_text(), encoding="ascii")
    warnings.warn(f"{corpus} not found: the tests that read it use generated English-like text "
                  f"({stand_in}) instead", stacklevel=2)
    return stand_in


_COMMON = """the and i to of a you my that in is not it me his be your with for he this have
as thou so him will what but all her thy do shall by no we are our on thee if o lord now good
from at they sir more or come let how well would there love then should king was when man
here which must know yet hath than like upon one make may did say see go such speak hear
first before proceed any further citizen""".split()
_ONSETS = "b br c ch d f g gr h l m n p pr r s sh st t th tr w v y".split()
_VOWELS = "a e i o u ea ou ai ie oo".split()
_CODAS = ["", "", "n", "r", "s", "th", "ll", "nd", "st", "ght", "ck", "m"]
_ENDS = [".", ".", ".", "?", "!", ";", ":", ","]


def english_like_text(size=1_100_000, seed=0):
    """About `size` bytes of ASCII text shaped like tinyshakespeare: speakers' names, then
    lines of words with Zipf-like frequencies (a long tail, so the validation split has
    words training never saw), sentence capitals, punctuation, contractions and quotes.
    Deterministic: Python's `random.Random` (stable across versions and stacks)."""
    rng = random.Random(seed)

    def made_up():
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.choice([1, 1, 2, 2, 3])))

    words = list(dict.fromkeys(_COMMON + [made_up() for _ in range(16_000)]))
    cumulative = list(itertools.accumulate(1 / (rank + 3) ** 1.1 for rank in range(len(words))))
    speakers = [made_up().upper() for _ in range(40)] + ["FIRST CITIZEN", "SECOND LORD"]

    def sentence():
        tokens = rng.choices(words, cum_weights=cumulative, k=rng.randint(3, 11))
        tokens[0] = tokens[0].capitalize()
        for i in range(1, len(tokens)):
            roll = rng.random()
            if roll < 0.04:
                tokens[i] += "'s"
            elif roll < 0.06:
                tokens[i] = "'tis" if rng.random() < 0.5 else "o'er"
            elif roll < 0.07:
                tokens[i] = f'"{tokens[i]}"'
            elif roll < 0.075:
                tokens[i] = f"({tokens[i]})"
            elif roll < 0.15:
                tokens[i] += ","
        return " ".join(tokens) + rng.choice(_ENDS)

    out, length = [], 0
    while length < size:
        speech = [rng.choice(speakers) + ":"] + [sentence() for _ in range(rng.randint(1, 5))]
        speech.append("")
        out.extend(speech)
        length += sum(len(line) + 1 for line in speech)
    return "\n".join(out) + "\n"


def golden_sources():
    """A fixed text whose prepared files every stack must reproduce (GOLDEN_SHA256)."""
    return [(STAND_IN_NAME, english_like_text(60_000).encode("ascii"))]


GOLDEN_OPTIONS = {"max_vocab": 600}
# The files torchtext 0.18 writes for golden_sources() with GOLDEN_OPTIONS (recorded on the
# torchtext stack). builtin must write the same on every stack; its manifest differs from
# torchtext's only in "implementation" and "torchtext_version", so it has its own checksum.
GOLDEN_SHA256 = {
    "vocab.txt": "0ccc29d2285504b29094e46892c7adf9af94d7c4ebacaa9e650d8abb1ce569a8",
    "train.npy": "9df7cddaa0545c3c975529542e8498fd8890618e3a88d9fb4f9b293b6a38aae2",
    "val.npy": "3db2c8afcfa1616f4347d3749caaaf531316f9ca11de7209a2787b147834fee6",
}
GOLDEN_BUILTIN_MANIFEST_SHA256 = "daa31c49ae73708461d1dcab648f492d1b8eea83e07d7aac9839627990427885"
