"""GPT-2's options (the `gpt2` preset at a tiny shape) through every command that builds a
model: train in both frameworks (Flax on a mesh with the tied head split by tensor, PyTorch
on two ranks), eval, compare, bench and bench-decode, then export-hf and import-hf of the
trained weights. One process for all (tests.conftest.run_cli_many); cached generation of the
options is held to the full forward in parity_tests/test_decode.py."""

import json

import numpy as np

from flax_gpt.core import runfolder, weights
from flax_gpt.core.config import GPT2
from tests.conftest import assert_same, run_cli_many
from tests.test_mesh import FOUR

GPT2_TINY = ["--preset", "gpt2", "--vocab-size", "64", "--seq-len", "16", "--d-model", "32",
             "--n-heads", "2", "--n-layers", "2"]


def test_gpt2_options_through_every_command(tmp_path):
    common = [*GPT2_TINY, "--synthetic", "--steps", "2", "--batch-size", "4", "--eval-batches", "0"]
    small = ["--rounds", "1", "--variants", "flax-jit-fp32,torch-eager-fp32"]
    flax_run, torch_run, evaluated, compare, bench, decode, exported, imported, parity = run_cli_many(
        ["train", *common, "--dropout", "0.1", "--mesh", "data=2,tensor=2", "--out", tmp_path / "flax"],
        ["train", *common, "--framework", "torch", "--nproc", "2", "--out", tmp_path / "torch"],
        ["eval", "--run", tmp_path / "flax", "--json"],
        ["compare", *common, "--out", tmp_path / "compare"],
        ["bench", *GPT2_TINY, "--batch-size", "2", "--warmup", "0", "--steps", "1", *small,
         "--json", tmp_path / "bench.json"],
        ["bench-decode", *[a for a in GPT2_TINY if a not in ("--seq-len", "16")], "--batch-sizes", "1", "--contexts", "6", "--new-tokens", "3",
         "--rounds", "1", "--variants", "flax-loop-fp32,torch-eager-fp32", "--json", tmp_path / "decode.json"],
        ["export-hf", tmp_path / "flax", "--out", tmp_path / "hf"],
        ["import-hf", tmp_path / "hf", "--out", tmp_path / "again.safetensors", "--json"],
        # an imported GPT-2 carries its dropout (0.1): parity compares at 0 all the same
        ["parity", "--weights", tmp_path / "again.safetensors", "--train-steps", "2"],
        env={"XLA_FLAGS": FOUR})
    for result in (flax_run, torch_run, evaluated, compare, bench, decode, exported, imported,
                   parity):
        assert result.returncode == 0, result.stderr[-3000:]

    for framework in ("torch", "flax"):  # the Flax run's config is kept for the import below
        record = json.loads((tmp_path / framework / runfolder.CONFIG).read_text())
        assert {k: record["model"][k] for k in GPT2} == GPT2, record["model"]
        config, tensors = weights.load(tmp_path / framework / runfolder.WEIGHTS)
        assert "pred.weight" not in tensors and "embed.position.weight" in tensors
        assert "decoder.final_norm.weight" in tensors
    assert "decoder.layers.*.mhma.q.weight [32:tensor, 32:-]" in flax_run.stderr
    assert np.isfinite(json.loads(evaluated.stdout)["loss"])
    report = json.loads((tmp_path / "compare" / "report.json").read_text())
    assert [len(f["loss"]) for f in report["frameworks"].values()] == [2, 2]
    for name in ("bench.json", "decode.json"):
        text = (tmp_path / name).read_text()
        assert '"skipped"' not in text, text[:2000]
        assert json.loads(text)["config"]["norm"] == "pre"

    # the trained weights through Hugging Face's layout and back, bit for bit
    assert json.loads(imported.stdout)["config"] == config.to_dict()
    again = weights.load(tmp_path / "again.safetensors")[1]
    assert again.keys() == tensors.keys()
    flax_tensors = weights.load(tmp_path / "flax" / runfolder.WEIGHTS)[1]
    for name, t in flax_tensors.items():
        assert_same(again[name], t, err_msg=name)
