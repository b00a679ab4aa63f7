"""The builtin implementation (flax_gpt.core.data) held equal to torchtext 0.18, which it
restates: the tokenizer and the vocabulary on the whole corpus, on fuzzed text, and with
min_freq and max_vocab over frequency ties. With tests/test_data.py's golden checksums this
is what makes folders prepared on a stack without torchtext interchangeable with torchtext's.

The only tests that import torchtext; skipped on a stack without it.
"""

import json

import numpy as np
import pytest

torchtext = pytest.importorskip(
    "torchtext", reason="builtin is held equal to torchtext only where torchtext is installed "
                        "(pip install 'flax-gpt[torchtext]', Python 3.11)")
torchtext.disable_torchtext_deprecation_warning()  # 0.18 is final; the warning says only that

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torchtext.data.utils import get_tokenizer  # noqa: E402
from torchtext.vocab import build_vocab_from_iterator  # noqa: E402

from flax_gpt import prepare  # noqa: E402
from flax_gpt.core import data  # noqa: E402
from flax_gpt.core.data import TokenDataset  # noqa: E402
from flax_gpt.core.errors import DatasetError  # noqa: E402
from flax_gpt.core.files import sha256_bytes  # noqa: E402
from tests import datasets  # noqa: E402
from tests.conftest import assert_same  # noqa: E402

TOKENIZER = get_tokenizer("basic_english")
PROVENANCE = ("implementation", "torchtext_version")  # the manifest keys that name who wrote it


def torchtext_vocab(token_lines, min_freq=1, max_tokens=None):
    vocab = build_vocab_from_iterator(iter(token_lines), min_freq=min_freq,
                                      specials=list(data.SPECIALS), max_tokens=max_tokens)
    vocab.set_default_index(data.UNK)
    return vocab


# ---- the whole corpus ---------------------------------------------------------------------

def test_tokenizer_equal_on_every_line_of_the_corpus(shakespeare):
    lines = shakespeare.read_text("utf-8").splitlines()
    assert [data.basic_english(line) for line in lines] == [TOKENIZER(line) for line in lines]


def test_prepared_folder_equals_direct_torchtext(shakespeare, shakespeare_dataset):
    lines = [t for t in map(TOKENIZER, shakespeare.read_text("utf-8").splitlines()) if t]
    n_val = round(len(lines) * 0.1)
    train, val = lines[:-n_val], lines[-n_val:]
    vocab = torchtext_vocab(train)

    ds = TokenDataset.load(shakespeare_dataset)
    assert ds.manifest["implementation"] == "torchtext"  # the suite's choice on this stack
    assert ds.itos == vocab.get_itos()
    assert ds.itos[:3] == ["<unk>", "<bos>", "<eos>"]
    for split, split_lines in (("train", train), ("val", val)):
        expected = [i for tokens in split_lines for i in [1, *vocab(tokens), 2]]
        assert_same(ds.split(split), np.asarray(expected))
    assert ds.train.dtype == np.uint16
    assert (ds.val == data.UNK).any(), "validation words unseen in training must map to <unk>"


@pytest.mark.parametrize("options", [{"max_vocab": 500}, {"min_freq": 3}])
def test_builtin_folder_equals_torchtext_on_the_corpus(shakespeare, options):
    sources = [(shakespeare.name, shakespeare.read_bytes())]
    files, manifests = {}, {}
    for name in prepare.IMPLEMENTATIONS:
        files[name], manifests[name] = prepare.build(sources, implementation=name, **options)
    for name in ("vocab.txt", "train.npy", "val.npy"):
        assert files["builtin"][name] == files["torchtext"][name], name
    assert manifests["torchtext"]["torchtext_version"].startswith("0.18.0")
    assert manifests["builtin"]["torchtext_version"] is None
    assert ({k: v for k, v in manifests["builtin"].items() if k not in PROVENANCE}
            == {k: v for k, v in manifests["torchtext"].items() if k not in PROVENANCE})
    assert json.loads(files["builtin"][data.MANIFEST]) == manifests["builtin"]


def test_torchtext_writes_the_golden_files():
    """The checksums tests/test_data.py holds builtin to on every stack are torchtext's."""
    files, manifest = prepare.build(datasets.golden_sources(), implementation="torchtext",
                                    **datasets.GOLDEN_OPTIONS)
    assert {name: sha256_bytes(files[name]) for name in datasets.GOLDEN_SHA256} == datasets.GOLDEN_SHA256
    assert manifest["implementation"] == "torchtext"


# ---- fuzzed text ----------------------------------------------------------------------------

# Everything basic_english treats specially, and what str.lower, \s and str.split might treat
# differently: punctuation, quotes, <br />, letters whose lower case changes length (İ) or
# depends on position (Σ), combining marks, ligatures, and Unicode whitespace and line breaks.
ODD = st.sampled_from([
    "'", '"', ".", ",", "(", ")", "!", "?", ";", ":", "<br />", "<br/>", "<BR />", "<br  />",
    " ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u00a0", "\u2028", "\u3000",
    "<unk>", "<bos>", "<eos>", "don't", "o'er", "'tis", "word", "Word", "WORD", "\u00c9t\u00e9",
    "stra\u00dfe", "\u0130", "\u03a3\u03a3", "\u03c2", "\ufb01", "\u216b", "e\u0301", "...",
])
ODD_TEXT = st.lists(ODD | st.text(max_size=4), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(ODD_TEXT)
def test_tokenizer_equal_on_odd_text(text):
    assert data.basic_english(text) == TOKENIZER(text)


WORDS = st.sampled_from(["a", "b", "c", "B", "\u00e9", "e\u0301", "aa", "z", ".", "'",
                         "<unk>", "<bos>", "<eos>"])


# Few examples: each torchtext Vocab takes ~0.3 s to construct (its C++ object), whatever its size.
@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.lists(WORDS, max_size=8), max_size=12), st.integers(1, 4),
       st.none() | st.integers(4, 12))
def test_vocab_equal_with_ties_min_freq_and_max_tokens(token_lines, min_freq, max_tokens):
    """A small alphabet, so that counts tie often; words spelled like specials too."""
    vocab = torchtext_vocab(token_lines, min_freq, max_tokens)
    itos = data.build_vocab(token_lines, min_freq=min_freq, max_tokens=max_tokens)
    assert itos == vocab.get_itos()
    _, ids_of = prepare.load_implementation("builtin").vocabulary(token_lines, min_freq, max_tokens)
    probe = ["a", "<unk>", "<eos>", "z", "never seen", "\u00e9", "e\u0301"]
    assert ids_of(probe) == vocab(probe)


@settings(max_examples=25, deadline=None, database=None)
@given(st.lists(ODD_TEXT, min_size=2, max_size=16).map("\n".join), st.integers(1, 3),
       st.none() | st.integers(4, 20))
def test_build_equal_on_odd_text(text, min_freq, max_vocab):
    """Whole folders from fuzzed text: the same files, or the same refusal."""
    outcomes = []
    for name in prepare.IMPLEMENTATIONS:
        try:
            files, _ = prepare.build([("t.txt", text.encode("utf-8"))], implementation=name,
                                     min_freq=min_freq, max_vocab=max_vocab, val_fraction=0.5)
            outcomes.append({k: v for k, v in files.items() if k != data.MANIFEST})
        except DatasetError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]
