"""`flax-gpt parity` end to end, through a subprocess."""

import json

from flax_gpt.core import weights
from parity_tests.conftest import CONFIGS, tensors_for
from tests.conftest import run_cli


def test_parity_command_passes_and_writes_json(tmp_path):
    weights.save(tmp_path / "w.safetensors", CONFIGS["d36-3heads"], tensors_for("d36-3heads"))
    result = run_cli("parity", "--weights", tmp_path / "w.safetensors", "--train-steps", "5",
                     "--attention", "fused", "--json", tmp_path / "parity.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all within tolerance" in result.stdout
    assert "step 5/5" in result.stderr  # not minutes of silence: progress, as plain lines
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["precision"] == "highest" and report["attention"] == "fused"
    assert report["jax_default_matmul_precision"] == "highest"
    assert report["config"] == CONFIGS["d36-3heads"].to_dict()
    assert {"jax", "flax", "optax", "torch", "numpy"} <= report["versions"].keys()
    quantities = [row["quantity"] for row in report["rows"]]
    assert "logits" in quantities and "layer 1 output" in quantities
    assert all(row["passed"] for row in report["rows"] if row["tolerance"] is not None)


def test_parity_bf16_reports_distribution_figures(tmp_path):
    result = run_cli("parity", "--preset", "tiny", "--precision", "bf16", "--train-steps", "0",
                     "--json", tmp_path / "p.json")
    assert result.returncode == 0, result.stderr
    rows = {r["quantity"]: r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    assert 0.9 <= rows["top-1 agreement"]["max_abs"] <= 1.0
    assert rows["mean KL(torch || flax) per token"]["max_abs"] < 1e-3


def test_parity_bad_weights_is_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a weights file")
    result = run_cli("parity", "--weights", tmp_path / "bad.safetensors")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "truncated or corrupt" in result.stderr


def test_fused_attention_with_dropout_is_one_line():
    result = run_cli("bench", "--preset", "tiny", "--attention", "fused", "--dropout", "0.1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fused attention has no attention dropout" in lines[0]
