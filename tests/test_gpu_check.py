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
# what the smoke mode writes: every file the GPU run writes, with `tiny` for the big preset
PARITY = [f"parity_tiny_{p}.json" for p in ("highest", "default", "bf16", "float64", "fused")]


def run(*args, cwd=REPO):
    # the Python under test first on PATH: the script calls `python`, as a user's shell would
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(implementation() == "torchtext", reason="the smoke mode runs on the modern "
                    "stack, the kind the GPU machines have (no torchtext); on this one the suite "
                    "runs each command it calls elsewhere")
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
    assert variants == {"flax-jit-fp32", "flax-jit-bf16", "flax-nnx-jit-fp32", "torch-eager-fp32"}
    assert (out / "bench_tiny.png").stat().st_size > 0
    report = json.loads((out / "compare_tiny" / "report.json").read_text())
    assert report["steps"] == 2 and report["judgement"]["passed"] is not None
    assert "compare_tiny/report.json: max |loss diff|" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device must be cuda or cpu, got 'tpu'"),
    (["--fast"], "unknown argument '--fast'"),
    (["--out", ""], "--out needs a folder"),
    (["--device", "cpu", "--out"], "--out needs a value"),  # before: shift 2 looped for ever
    (["--device"], "--device needs a value"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("gpu_check.sh: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
