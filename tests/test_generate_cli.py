"""`flax-gpt generate` in both frameworks, `decode-parity` and `bench-decode`, end to end.
The commands run in this process (tests.conftest.run_cli_here), so that the Flax
generations share their compiled steps."""

import json

import pytest

from tests.conftest import run_cli_here
from tests.datasets import prepare_dataset


@pytest.fixture(scope="module")
def run(shakespeare, tmp_path_factory, worker_id):
    """A tiny run (vocabulary 128 from the first 200 kB of tinyshakespeare), 6 steps, trained
    once for all pytest-xdist workers: the first to take the lock trains it in the base
    temporary folder they share, the others wait and read it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # each worker's base folder sits in this session's folder
        shared = shared.parent
    folder = shared / "generate_cli_run"
    with FileLock(str(shared / "generate_cli_run.lock")):
        if not (folder / "run" / "weights.safetensors").is_file():
            prepare_dataset([(shakespeare.name, shakespeare.read_bytes()[:200_000])], folder / "ds",
                            max_vocab=128)
            result = run_cli_here("train", "--preset", "tiny", "--data", folder / "ds", "--steps", "6",
                                  "--batch-size", "4", "--eval-every", "0", "--out", folder / "run")
            assert result.returncode == 0, result.stderr
    return folder / "run"


def generated(run, *options):
    result = run_cli_here("generate", "--run", run, "--prompt", "and the", "--max-new-tokens", "40", *options)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_both_frameworks_generate_the_same_text(run):
    """Greedy and sampled (one seed, top-k and top-p): the same text from Flax and PyTorch,
    past the window (seq_len 16), streamed to stdout; --json records the generation."""
    for options in (["--temperature", "0"], ["--temperature", "1.2", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]):
        flax, torch = generated(run, *options), generated(run, *options, "--framework", "torch")
        assert flax == torch and flax.startswith("and the") and len(flax.split()) >= 30
    record = json.loads(generated(run, "--temperature", "0", "--framework", "torch", "--json"))
    assert record["framework"] == "torch" and record["generation"]["slides"] >= 1
    assert len(record["ids"]) == 3 + 40 and record["generation"]["steps"] == 40
    uncached = json.loads(generated(run, "--temperature", "0", "--no-cache", "--json"))
    assert uncached["ids"] == record["ids"]


def test_torch_generates_in_bf16_under_autocast(run):
    """--precision bf16 runs PyTorch under autocast, as Flax computes its matmuls in bf16:
    its text is not the float32 text (bf16 rounding differs between the two frameworks, so
    their sampled bf16 texts may part at a near tie)."""
    sampled = ["--temperature", "1.2", "--top-k", "50", "--seed", "3", "--framework", "torch", "--precision"]
    assert generated(run, *sampled, "bf16") != generated(run, *sampled, "highest")


def test_streamed_text_is_the_returned_text(run):
    """What generate prints token by token is the text it returns: line ends for <eos> and
    no <bos>, or with --show-specials every token as it is."""
    for options in ([], ["--show-specials"]):
        sampled = ["--temperature", "1.5", "--seed", "2", *options]
        streamed = generated(run, *sampled)
        record = json.loads(generated(run, *sampled, "--json"))
        assert streamed.rstrip("\n") == record["text"]
        specials = ("<eos>" in record["text"], "<bos>" in record["text"])
        assert specials == ((True, True) if options else (False, False)), specials


def test_stop_word_ends_the_text(run):
    from flax_gpt.core.data import TokenDataset

    sampled = ["--temperature", "1.5", "--seed", "1", "--json"]
    free = json.loads(generated(run, *sampled))["ids"][3:]  # after <bos> and the prompt
    stop = free[4]
    word = TokenDataset.load(run.parent / "ds").itos[stop]
    record = json.loads(generated(run, *sampled, "--stop", word))
    assert record["generation"]["stopped"] == [True]
    assert record["ids"][3:] == free[:free.index(stop) + 1]


@pytest.mark.parametrize("options,message", [
    (["--top-p", "0"], "top_p must be in (0, 1]"), (["--window-keep", "17"], "window_keep"),
    (["--stop", "zyzzyva"], "not in the vocabulary"), (["--top-k", "-2"], "top_k")])
def test_bad_generate_options_are_one_line(run, options, message):
    result = run_cli_here("generate", "--run", run, *options)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_decode_parity_command(run, tmp_path):
    result = run_cli_here("decode-parity", "--run", run, "--prompt", "the king", "--prompt", "to be",
                     "--max-new-tokens", "24", "--json", tmp_path / "d.json")
    assert result.returncode == 0, result.stderr
    assert "float64: same tokens over 24 steps" in result.stdout
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["agree"] and report["max_logits_diff"] <= 1e-12 and report["slides"] >= 1
    assert report["texts"]["flax"] == report["texts"]["torch"] and len(report["flax"]) == 2


def test_bench_decode_command(tmp_path):
    result = run_cli_here("bench-decode", "--preset", "tiny", "--batch-sizes", "1,2", "--contexts", "6",
                     "--new-tokens", "3", "--rounds", "2", "--variants", "flax-loop-fp32,flax-step-fp32,torch-eager-fp32",
                     "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["complete"] and [s["batch_size"] for s in report["shapes"]] == [1, 2]
    assert report["memory_bandwidth_bytes_per_s"]["best"] > 0
    for shape in report["shapes"]:
        assert shape["seq_len"] == 9 and "flax-loop-fp32 / torch-eager-fp32" in shape["flax_over_torch"]
        for r in shape["results"]:
            assert r["tpot_s"] > 0 and r["uncached_tpot_s"] > 0 and r["ttft_s"] > 0
            assert len(r["round_tpot_s"]) == 2 and r["bytes_per_step"] > 4 * report["matmul_params"]
            assert r["decode_tokens_per_s"] == pytest.approx(shape["batch_size"] / r["tpot_s"])
            assert 0 < r["bandwidth_fraction"] == pytest.approx(r["achieved_bytes_per_s"] / report["memory_bandwidth_bytes_per_s"]["best"])
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    bad = run_cli_here("bench-decode", "--variants", "flax-loop-fp64")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "unknown variant" in bad.stderr


def test_a_crashed_decode_variant_fails_the_command(tmp_path, monkeypatch):
    """A variant that raises is reported beside the others, marked crashed, and the exit
    status is 1; the other variants still ran."""
    from flax_gpt.sidebyside import decode_bench

    build = decode_bench.build

    def broken(name, *args):
        if name == "torch-eager-fp32":
            raise RuntimeError("broken on purpose")
        return build(name, *args)

    monkeypatch.setattr(decode_bench, "build", broken)
    result = run_cli_here("bench-decode", "--preset", "tiny", "--batch-sizes", "1", "--contexts", "6",
                          "--new-tokens", "3", "--rounds", "1", "--variants", "flax-loop-fp32,torch-eager-fp32",
                          "--json", tmp_path / "b.json")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("bench-decode: torch-eager-fp32 crashed at batch 1, "
                                                      "context 6: RuntimeError: broken on purpose")
    results = {r["variant"]: r for r in json.loads((tmp_path / "b.json").read_text())["shapes"][0]["results"]}
    assert results["torch-eager-fp32"]["crashed"] and results["flax-loop-fp32"]["decode_tokens_per_s"] > 0
