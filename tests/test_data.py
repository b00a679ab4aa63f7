"""The data pipeline: the builtin vocabulary, batch layout, determinism and every bad input
(equivalence with torchtext: tests/test_torchtext.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flax_gpt import prepare
from flax_gpt.core import data
from flax_gpt.core.data import TokenDataset
from flax_gpt.core.errors import DatasetError
from flax_gpt.core.files import sha256_bytes, sha256_file
from tests import datasets
from tests.conftest import REPO, assert_same, run_cli
from tests.datasets import prepare_dataset


def write(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload if isinstance(payload, bytes) else payload.encode("utf-8"))
    return path


def make(tmp_path, text, name="ds", **options):
    out = tmp_path / name
    prepare_dataset([("text.txt", text.encode("utf-8"))], out, **options)
    return TokenDataset.load(out)


# ---- the builtin vocabulary (torchtext's rules, worked by hand) ------------------------------

SPECIALS = list(data.SPECIALS)


def test_build_vocab_ranks_by_count_then_code_point():
    assert data.build_vocab([["c", "a", "c"], ["b", "b", "c"]]) == SPECIALS + ["c", "b", "a"]
    assert data.build_vocab([["b", "a", "B", "\u00e9", "z"]]) == SPECIALS + ["B", "a", "b", "z", "\u00e9"]


def test_build_vocab_max_tokens_counts_specials_and_cuts_before_dropping_them():
    lines = [["a", "a", "a", "d", "d", "b", "c"]]
    assert data.build_vocab(lines, max_tokens=5) == SPECIALS + ["a", "d"]
    assert data.build_vocab(lines, min_freq=2) == SPECIALS + ["a", "d"]
    assert data.build_vocab(lines, min_freq=3, max_tokens=5) == SPECIALS + ["a"]
    # A word spelled like a special takes a place in the cut and is then dropped, as in
    # torchtext 0.18: the vocabulary comes out shorter than max_tokens.
    assert data.build_vocab([["<unk>", "<unk>", "a", "b"]], max_tokens=5) == SPECIALS + ["a"]
    assert data.build_vocab([["<unk>", "<unk>", "a", "b"]]) == SPECIALS + ["a", "b"]
    with pytest.raises(ValueError, match="no room"):
        data.build_vocab(lines, max_tokens=3)


def test_min_freq_and_max_vocab_in_prepare(tmp_path):
    text = "a a a b b c d d d d e\nf g a b\nlast line\n"
    ds = make(tmp_path, text, min_freq=2, max_vocab=5, val_fraction=0.34)
    assert ds.itos == SPECIALS + ["a", "d"]  # a and d tie at 4 (a first); b (3) is cut
    assert ds.decode(ds.train[:6]) == "<bos> a a a <unk> <unk>"


def test_builtin_writes_the_golden_files_on_every_stack():
    """builtin's files for a fixed text have the checksums torchtext's have (tests/
    test_torchtext.py holds torchtext to the same numbers): folders prepared on either stack,
    with either implementation, are interchangeable."""
    files, manifest = prepare.build(datasets.golden_sources(), implementation="builtin",
                                    **datasets.GOLDEN_OPTIONS)
    assert {name: sha256_bytes(payload) for name, payload in files.items()} == {
        **datasets.GOLDEN_SHA256, "manifest.json": datasets.GOLDEN_BUILTIN_MANIFEST_SHA256}, (
        "builtin, numpy's .npy bytes or english_like_text changed: if on purpose, record the "
        "checksums again from torchtext (tests/datasets.py)")
    assert manifest["implementation"] == "builtin" and manifest["torchtext_version"] is None


def test_missing_torchtext_is_one_line_that_says_how_to_get_it(tmp_path):
    """As on a stack without torchtext: the default fails before any work, saying what to
    install and that --implementation builtin needs nothing."""
    write(tmp_path, "good.txt", "a b c\nd e\n")
    code = ("import sys; sys.modules['torchtext'] = None\n"  # any import of it now fails
            "from flax_gpt.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["prepare", "--text-file", tmp_path / "good.txt", "--out", tmp_path / "out"]
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pip install 'flax-gpt[torchtext]' in a Python 3.11 environment" in lines[0]
    assert "--implementation builtin" in lines[0]
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "-c", code, *map(str, args),
                             "--implementation", "builtin", "--val-fraction", "0.5"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert TokenDataset.load(tmp_path / "out").manifest["implementation"] == "builtin"


def test_unknown_implementation_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown implementation 'spacy'"):
        prepare.prepare([("t.txt", b"a b\nc d\n")], tmp_path / "out", implementation="spacy")
    assert not (tmp_path / "out").exists()


# ---- text <-> ids -------------------------------------------------------------------------

def test_encode_decode_round_trip(shakespeare, shakespeare_dataset):
    ds = TokenDataset.load(shakespeare_dataset)
    text = " ".join(shakespeare.read_text("utf-8").splitlines()[:3])  # "First Citizen: ..."
    ids = ds.encode(text)
    assert data.UNK not in ids and len(ids) > 5
    assert ds.decode(ids) == " ".join(data.basic_english(text))
    assert ds.encode(ds.decode(ids)) == ids
    assert ds.encode("the king\nspeak", bos_eos=True) == [
        1, ds.stoi["the"], ds.stoi["king"], 2, 1, ds.stoi["speak"], 2]


def test_unknown_words_encode_as_unk(shakespeare_dataset):
    ds = TokenDataset.load(shakespeare_dataset)
    assert ds.encode("hear zyzzyva") == [ds.stoi["hear"], data.UNK]
    assert ds.unknown_words("hear zyzzyva me") == ["zyzzyva"]


# ---- batches --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counting_ds(tmp_path_factory):
    """A dataset whose train ids are distinct enough to check batch layout by value."""
    words = " ".join(f"w{i}" for i in range(200))
    tmp = tmp_path_factory.mktemp("count")
    return make(tmp, f"{words}\n{words}\nval line\n", val_fraction=0.34)


@pytest.mark.parametrize("batch_size,seq_len", [(1, 1), (2, 5), (3, 16), (7, 3)])
def test_batch_layout_is_spec(counting_ds, batch_size, seq_len):
    rows = counting_ds.train[: len(counting_ds.train) // seq_len * seq_len].reshape(-1, seq_len)
    batches = list(counting_ds.batches("train", batch_size, seq_len))
    assert len(batches) == len(rows) // batch_size == counting_ds.num_batches("train", batch_size, seq_len)
    for b, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (batch_size, seq_len)
        assert x.dtype == y.dtype == np.int32
        assert_same(x, rows[b * batch_size:(b + 1) * batch_size])
        assert_same(y[:, :-1], x[:, 1:])
        assert_same(y[:, -1], data.IGNORE_INDEX)


def test_drop_last_false_yields_the_short_batch(counting_ds):
    n_rows = len(counting_ds.train) // 10
    batches = list(counting_ds.batches("train", 7, 10, drop_last=False))
    assert sum(len(x) for x, _ in batches) == n_rows
    assert len(batches[-1][0]) == n_rows % 7 or n_rows % 7 == 0


def test_shuffle_is_a_seeded_permutation(counting_ds):
    def rows(**kw):
        return np.concatenate([x for x, _ in counting_ds.batches("train", 4, 8, **kw)])

    plain, shuffled = rows(), rows(shuffle=True, seed=3)
    assert_same(shuffled, rows(shuffle=True, seed=3))
    assert not np.array_equal(plain, shuffled)
    assert not np.array_equal(shuffled, rows(shuffle=True, seed=3, epoch=1))
    assert not np.array_equal(shuffled, rows(shuffle=True, seed=4))
    everything = rows(drop_last=False)
    assert sorted(map(tuple, everything)) == sorted(map(tuple, rows(shuffle=True, drop_last=False)))


def test_start_resumes_the_same_sequence(counting_ds):
    full = list(counting_ds.batches("train", 3, 6, shuffle=True, seed=1, epoch=2))
    resumed = list(counting_ds.batches("train", 3, 6, shuffle=True, seed=1, epoch=2, start=4))
    assert len(resumed) == len(full) - 4
    for (x0, y0), (x1, y1) in zip(full[4:], resumed):
        assert_same(x0, x1)
        assert_same(y0, y1)


def test_seq_len_larger_than_split_is_refused(counting_ds):
    with pytest.raises(DatasetError, match="larger than the val split"):
        next(counting_ds.batches("val", 1, len(counting_ds.val) + 1))
    with pytest.raises(DatasetError, match="fewer than batch_size"):
        next(counting_ds.batches("val", 100, 2))
    with pytest.raises(DatasetError, match="unknown split"):
        next(counting_ds.batches("test", 1, 2))


def test_id_dtype_is_smallest_that_fits():
    assert data.id_dtype(256) == np.uint8
    assert data.id_dtype(257) == np.uint16
    assert data.id_dtype(65536) == np.uint16
    assert data.id_dtype(65537) == np.uint32


# ---- determinism ------------------------------------------------------------------------------

def test_prepare_twice_is_byte_identical(shakespeare, shakespeare_dataset, tmp_path):
    out = tmp_path / "again"
    prepare_dataset([(shakespeare.name, shakespeare.read_bytes())], out)
    names = sorted(p.name for p in shakespeare_dataset.iterdir())
    assert names == sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "train.npy", "val.npy", "vocab.txt"]
    for name in names:
        assert (out / name).read_bytes() == (shakespeare_dataset / name).read_bytes(), name


def test_manifest_records_sources_options_and_counts(shakespeare, shakespeare_dataset):
    manifest = json.loads((shakespeare_dataset / "manifest.json").read_text())
    assert manifest["sources"] == [{
        "name": shakespeare.name, "bytes": shakespeare.stat().st_size,
        "sha256": sha256_file(shakespeare)}]
    assert manifest["tokenizer"] == "basic_english"
    assert manifest["specials"] == ["<unk>", "<bos>", "<eos>"]
    assert manifest["options"] == {"min_freq": 1, "max_vocab": None, "val_fraction": 0.1,
                                   "errors": "strict"}
    assert manifest["implementation"] == datasets.implementation()
    if datasets.implementation() == "torchtext":
        assert manifest["torchtext_version"].startswith("0.18.0")
    else:
        assert manifest["torchtext_version"] is None
    ds = TokenDataset.load(shakespeare_dataset)
    assert manifest["counts"]["vocab_size"] == ds.vocab_size
    assert manifest["counts"]["train_tokens"] == len(ds.train)


def test_split_is_by_lines_from_the_end(tmp_path):
    ds = make(tmp_path, "one\ntwo\n\nthree\nfour\n", val_fraction=0.25)
    assert ds.decode(ds.val) == "<bos> <unk> <eos>"  # "four" is seen only in validation
    assert ds.decode(ds.train) == "<bos> one <eos> <bos> two <eos> <bos> three <eos>"


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("payload,message", [
    (b"", "has no tokens"),
    (b"  \n\t\n", "has no tokens"),
    (b"fine\nthen \xff bad\n", r"byte 10 \(0xff\) is not valid UTF-8"),
])
def test_bad_text_is_refused(tmp_path, payload, message):
    with pytest.raises(DatasetError, match=message):
        prepare_dataset([("t.txt", payload)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "no temporary folder may be left behind"


def test_errors_replace_reads_bad_bytes(tmp_path):
    prepare_dataset([("t.txt", b"fine\nthen \xff bad\nmore\n")], tmp_path / "out",
                    errors="replace", val_fraction=0.3)
    ds = TokenDataset.load(tmp_path / "out")
    assert "\ufffd" in ds.itos


@pytest.mark.parametrize("options,message", [
    ({"val_fraction": 0.0}, "between 0 and 1"),
    ({"val_fraction": 1.0}, "between 0 and 1"),
    ({"val_fraction": -0.5}, "between 0 and 1"),
    ({"val_fraction": 0.01}, "leaves the validation split empty"),
    ({"val_fraction": 0.99}, "leaves the training split empty"),
    ({"max_vocab": 3}, "no room for words"),
    ({"min_freq": 0}, "min-freq"),
])
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(DatasetError, match=message):
        prepare_dataset([("t.txt", b"a b\nc d\n")], tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path):
    make(tmp_path, "a b\nc\n", val_fraction=0.5)
    with pytest.raises(DatasetError, match="already exists: pass --force"):
        make(tmp_path, "x y\nz\n", val_fraction=0.5)
    assert TokenDataset.load(tmp_path / "ds").itos[3:] == ["a", "b"]
    assert make(tmp_path, "x y\nz\n", val_fraction=0.5, force=True).itos[3:] == ["x", "y"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_read_text_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        prepare.read_text_file(tmp_path / "missing.txt")
    with pytest.raises(DatasetError, match="is a folder"):
        prepare.read_text_file(tmp_path)


@pytest.fixture
def damaged(tmp_path):
    make(tmp_path, "alpha beta gamma\ndelta epsilon\nzeta eta\n", val_fraction=0.34)
    return tmp_path / "ds"


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-3])


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
    (lambda d: _truncate(d / "manifest.json"), "unreadable or truncated"),
    (lambda d: (d / "train.npy").unlink(), "train.npy is missing"),
    (lambda d: _truncate(d / "val.npy"), "does not match its checksum"),
    (lambda d: _truncate(d / "vocab.txt"), "does not match its checksum"),
    (lambda d: _edit_manifest(d, lambda m: m["counts"].update(vocab_size=99)), "manifest says 99"),
    (lambda d: _edit_manifest(d, lambda m: m["counts"].update(train_tokens=3)), "expects uint8"),
    (lambda d: _edit_manifest(d, lambda m: m["files"].pop("val")), "bad entry 'val'"),
    (lambda d: _edit_manifest(d, lambda m: m.update(format_version=7)), "format 7"),
])
def test_damaged_dataset_is_refused(damaged, damage, message):
    damage(damaged)
    with pytest.raises(DatasetError, match=message):
        TokenDataset.load(damaged)


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="run 'flax-gpt prepare' first"):
        TokenDataset.load(tmp_path / "nope")


# ---- the corpus fixture: the real corpus, or a stand-in outside CI ------------------------------

@pytest.mark.parametrize("value,is_ci", [(None, False), ("", False), ("false", False), ("0", False),
                                         ("true", True), ("1", True)])
def test_ci_is_read_from_the_environment(monkeypatch, value, is_ci):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert datasets.ci() is is_ci


def test_present_corpus_is_used_even_in_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    corpus = write(tmp_path, "corpus.txt", "some text\n")
    assert datasets.corpus_or_stand_in(corpus, tmp_path) == corpus


def test_missing_corpus_in_ci_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="absent.txt is missing and CI is set"):
        datasets.corpus_or_stand_in(tmp_path / "absent.txt", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_corpus_elsewhere_is_a_stand_in_like_it(tmp_path, monkeypatch):
    """The stand-in must serve every test that reads the corpus: a uint16 vocabulary,
    validation words unseen in training, the words tests encode."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.warns(UserWarning, match="absent.txt not found: the tests that read it use"):
        stand_in = datasets.corpus_or_stand_in(tmp_path / "absent.txt", tmp_path)
    text = stand_in.read_text("ascii")
    assert text == datasets.english_like_text() and len(text) > 1_000_000
    prepare.prepare([(stand_in.name, text.encode())], tmp_path / "ds", implementation="builtin")
    ds = TokenDataset.load(tmp_path / "ds")
    assert ds.train.dtype == np.uint16 and (ds.val == data.UNK).any()
    assert data.UNK not in ds.encode("the king hear me speak")


# ---- corpus download -------------------------------------------------------------------------

@pytest.fixture
def corpus_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    corpus = dict(prepare.CORPORA["tinyshakespeare"])
    monkeypatch.setitem(prepare.CORPORA, "tinyshakespeare", corpus)
    return corpus


def test_corpus_downloads_once_and_verifies(shakespeare, corpus_env, tmp_path):
    corpus_env["url"] = shakespeare.as_uri()
    assert prepare.fetch_corpus("tinyshakespeare") == shakespeare.read_bytes()
    assert (tmp_path / "cache" / "tinyshakespeare.txt").is_file()
    corpus_env["url"] = (tmp_path / "gone.txt").as_uri()  # the cache must answer now
    assert prepare.fetch_corpus("tinyshakespeare") == shakespeare.read_bytes()


def test_corpus_checksum_mismatch_is_refused(corpus_env, tmp_path):
    corpus_env["url"] = write(tmp_path, "other.txt", "not shakespeare").as_uri()
    with pytest.raises(DatasetError, match="expected 86c4e6aa"):
        prepare.fetch_corpus("tinyshakespeare")
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()


def test_corpus_without_network_says_pass_text_file(corpus_env):
    corpus_env["url"] = "http://127.0.0.1:9/tinyshakespeare.txt"  # the discard port refuses
    with pytest.raises(DatasetError, match="pass a local copy with --text-file PATH"):
        prepare.fetch_corpus("tinyshakespeare")


# ---- the CLI, through a subprocess -----------------------------------------------------------

def test_cli_prepare_builtin_writes_the_stacks_files(shakespeare, shakespeare_dataset, tmp_path):
    """--implementation builtin on any stack; on the torchtext stack the fixture's folder is
    torchtext's, so this holds the two equal through the command line too."""
    result = run_cli("prepare", "--text-file", shakespeare, "--out", tmp_path / "ds",
                     "--implementation", "builtin")
    assert result.returncode == 0, result.stderr
    expected = TokenDataset.load(shakespeare_dataset)
    mb = shakespeare.stat().st_size / 1e6
    assert f"vocabulary {expected.vocab_size:,}" in result.stdout
    assert f" s from {mb:.2f} MB" in result.stdout and result.stdout.strip().endswith("(basic_english, builtin)")
    for name in ("vocab.txt", "train.npy", "val.npy"):
        assert (tmp_path / "ds" / name).read_bytes() == (shakespeare_dataset / name).read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--text-file", "missing.txt"], "does not exist"),
    (["--text-file", "bad.txt"], "is not valid UTF-8"),
    (["--text-file", "empty.txt"], "has no tokens"),
    (["--text-file", "good.txt", "--val-fraction", "2"], "between 0 and 1"),
    (["--text-file", "good.txt", "--max-vocab", "2"], "no room for words"),
    (["--text-file", "good.txt", "--out", "exists"], "already exists: pass --force"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    write(tmp_path, "bad.txt", b"ok\n\xc3\x28\n")
    write(tmp_path, "empty.txt", b"")
    write(tmp_path, "good.txt", "a b c\nd e\n")
    (tmp_path / "exists").mkdir()
    args = [str(tmp_path / a) if a.endswith(".txt") or a == "exists" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = run_cli("prepare", *args, "--implementation", datasets.implementation())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.txt", "empty.txt", "exists", "good.txt"]


def test_cli_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "prepare" in result.stdout

