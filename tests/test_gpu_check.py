"""scripts/gpu_check.sh, the one-command GPU run, in its CPU smoke mode: the same commands on
tiny shapes, so that the script cannot rot between the machines that lend a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets import implementation

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
# what the smoke mode writes: the GPU run's files for `tiny`, one precision of the loop over
# them (the same command line) and the float64 and fused ones
PARITY = [f"parity_tiny_{p}.json" for p in ("highest", "float64", "fused")]


def run(*args, cwd=REPO, env=None):
    # the Python under test first on PATH: the script calls `python`, as a user's shell would
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


modern_stack_only = pytest.mark.skipif(
    implementation() == "torchtext", reason="the smoke mode runs on the modern stack, the kind "
    "the GPU machines have (no torchtext); on this one the suite runs each command it calls "
    "elsewhere")

# Put on PYTHONPATH as sitecustomize.py, so that every Python the script starts imports it
# first: PyTorch's AdamW raises when it is made, as a broken install would, so the bench's
# PyTorch variant crashes while it is built (the Flax variants use optax's AdamW and run).
BROKEN_ADAMW = """
import torch


class AdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("AdamW broken on purpose")


torch.optim.AdamW = AdamW
"""


@modern_stack_only
def test_smoke_mode_runs_every_check_and_summarises(tmp_path):
    out = tmp_path / "out"
    result = run("--device", "cpu", "--out", out, cwd=tmp_path)  # from anywhere, not installed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every check passed" in result.stdout
    for name in PARITY:
        d = json.loads((out / name).read_text())
        assert d["passed"] and d["rows"], name
        assert d["jax_backend"] == "cpu" and d["torch_device"] == "cpu"
        assert f"  {name}: " in result.stdout and "passed" in result.stdout
    bench = json.loads((out / "bench_tiny.json").read_text())
    variants = {r["variant"] for r in bench["results"]}
    assert variants == {"flax-jit-fp32", "torch-eager-fp32"}
    assert (out / "bench_tiny.png").stat().st_size > 0
    decode = json.loads((out / "bench_decode_tiny.json").read_text())
    assert [r["variant"] for r in decode["shapes"][0]["results"]] == ["flax-loop-fp32", "torch-eager-fp32"]
    assert all(r["decode_tokens_per_s"] > 0 for r in decode["shapes"][0]["results"])
    assert "bench_decode_tiny.json: batch 1: flax-loop-fp32 " in result.stdout
    report = json.loads((out / "compare_tiny" / "report.json").read_text())
    assert report["steps"] == 2 and report["judgement"]["passed"] is not None
    assert "compare_tiny/report.json: max |loss diff|" in result.stdout


@modern_stack_only
def test_a_crashed_bench_variant_fails_the_run(tmp_path):
    """A bench variant that raises is a failure (exit 1, the variant and its error named),
    where a variant that cannot run here would be skipped. `--checks bench` runs the bench
    alone."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BROKEN_ADAMW)
    out = tmp_path / "out"
    result = run("--device", "cpu", "--checks", "bench", "--out", out,
                 env={"PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every check passed" not in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "failed: bench-tiny"
    error = "RuntimeError: AdamW broken on purpose"
    assert f"bench: torch-eager-fp32 crashed at batch 2: {error}" in result.stderr
    assert f"torch-eager-fp32 CRASHED ({error})" in result.stdout  # the summary's line
    report = json.loads((out / "bench_tiny.json").read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert results.pop("torch-eager-fp32")["crashed"] is True
    assert set(results) == {"flax-jit-fp32"}
    assert all(r["tokens_per_s"] > 0 for r in results.values())  # the others ran
    assert sorted(p.name for p in out.iterdir()) == ["bench_tiny.json", "bench_tiny.png"]


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device must be cuda or cpu, got 'tpu'"),
    (["--fast"], "unknown argument '--fast'"),
    (["--out", ""], "--out needs a folder"),
    (["--device", "cpu", "--out"], "--out needs a value"),  # before: shift 2 looped for ever
    (["--device"], "--device needs a value"),
    (["--checks", "bench,train"], "--checks takes parity, compare, bench and decode, comma-separated; "
                                  "got 'train'"),
    (["--checks", ""], "--checks needs at least one of parity, compare, bench"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("gpu_check.sh: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
