"""The Flax trainer on a mesh of 8 fake CPU devices, held to the single-device run.

One subprocess (scripts/mesh_equivalence.py: XLA_FLAGS must be set before jax is imported)
trains a tiny config whose n_heads, d_ff and vocabulary divide 8 on the meshes 8x1x1, 1x8x1,
1x1x8 and 2x2x2 from the same weights on the same global batches, 30 steps each, and runs the
checkpoint checks; the tests below read its JSON. Compiling dominates (~10 s of CPU a train
step), so every run shares one persistent compilation cache.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from flax_gpt.core import runfolder, weights
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.sharding import MeshShape, per_device_elements, rules
from flax_gpt.sidebyside.tolerances import MIN_KEPT_SHARE
from tests.conftest import REPO, run_cli

LOSS_TOL = 1e-6  # per-step |loss difference|, float32 highest (~2 ulps of a loss of 4.2)
PARAM_TOL = 1e-5  # largest |parameter difference| after the last step, float32
FLOAT64_TOL = 1e-12  # loss and parameters, float64
MESHES = ["data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mesh")
    result = subprocess.run(
        [sys.executable, "scripts/mesh_equivalence.py", "--devices", "8", "--steps", "30",
         "--meshes", " ".join(MESHES), "--float64", MESHES[-1], "--checkpoints", str(folder),
         "--compilation-cache", str(folder / "jax-cache")],
        cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(result.stdout), "folder": folder}


def test_every_mesh_trains_as_one_device(report):
    """float32: every step's loss within LOSS_TOL. Parameters after 30 steps within PARAM_TOL
    on labels kept free of ReLU flips (one unit within rounding of 0 takes different
    branches in two correct runs, and AdamW carries the difference on: the parity suite's
    rule); the unmasked figure is in the report."""
    assert report["devices"] == 8
    for mesh in MESHES:
        run = report["float32"][mesh]
        assert len(run["loss_diff"]) == 30
        assert run["max_loss_diff"] <= LOSS_TOL, mesh
        masked = run["kink_masked"]
        assert masked["max_loss_diff"] <= LOSS_TOL, mesh
        assert masked["max_param_diff"] <= PARAM_TOL, mesh
        assert masked["kept_share"] >= MIN_KEPT_SHARE, mesh  # judged on nearly every label


def test_parameters_sit_where_the_rules_say(report):
    """The trained arrays carry the rules' sharding (the step's out_shardings hold it), and
    fsdp and tensor really cut what a device holds."""
    config = GPTConfig.from_dict(report["config"])
    total = 4 * sum(math.prod(s) for s in weights.canonical_shapes(config).values())
    for mesh in MESHES:
        run = report["float32"][mesh]
        expected = {name: list(spec) for name, spec in rules(config, MeshShape.parse(mesh)).items()}
        assert run["specs"] == expected, mesh
    assert report["float32"]["data=8"]["param_bytes_per_device"] == total  # replicated
    assert report["float32"]["fsdp=8"]["param_bytes_per_device"] == total // 8
    two = report["float32"]["data=2,fsdp=2,tensor=2"]
    assert two["specs"]["decoder.layers.0.mhma.q.weight"] == ["tensor", "fsdp"]
    assert two["specs"]["decoder.layers.0.ffn.fc2.weight"] == ["fsdp", "tensor"]
    assert two["param_bytes_per_device"] < total // 2
    assert two["optimizer_bytes_per_device"] >= 2 * two["param_bytes_per_device"]  # mu and nu


def test_gradient_accumulation_on_a_mesh_equals_one_batch(report):
    """2x2x2, grad_accum=2 micro-batches of 8 rows, against one device taking the 16 rows
    as one batch."""
    run = report["accumulation"]
    assert run["mesh"] == MESHES[-1] and len(run["loss_diff"]) == 30
    assert run["max_loss_diff"] <= LOSS_TOL
    assert run["max_param_diff"] <= PARAM_TOL


def test_float64_on_a_mesh_is_one_device_to_rounding(report):
    run = report["float64"][MESHES[-1]]
    assert run["max_loss_diff"] <= FLOAT64_TOL
    assert run["max_param_diff"] <= FLOAT64_TOL


def test_sharded_checkpoints_resume_and_restore_on_other_meshes(report):
    """Resumed on the same mesh: every loss bit for bit. Restored on another mesh and on one
    device: every weight and optimizer tensor bit for bit, and training goes on as the
    unbroken run within LOSS_TOL."""
    ck = report["checkpoints"]
    assert ck["mesh"] == MESHES[-1] and len(ck["unbroken"]) == 30
    assert ck["resume_bitwise"] and ck["resumed"] == ck["unbroken"]
    for label in (MESHES[0], "single device"):
        restored = ck[f"restored on {label}"]
        assert restored["step"] == 15 and restored["bitwise"], label
        assert restored["max_loss_diff_after"] <= LOSS_TOL, label


def test_sharded_run_writes_one_gathered_canonical_file(report):
    """RUN/weights.safetensors of the 2x2x2 run: one file of whole tensors, loadable by
    flax_gpt.load and torch_reference.load, equal to the last checkpoint's."""
    import flax_gpt
    import torch_reference

    run = report["folder"] / "unbroken"
    path = run / runfolder.WEIGHTS
    config, tensors = weights.load(path)  # checks every name and whole shape
    assert config == GPTConfig.from_dict(report["config"])
    assert path.read_bytes() == (runfolder.latest_checkpoint(run) / runfolder.WEIGHTS).read_bytes()
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".safetensors") == [runfolder.WEIGHTS]
    twin = torch_reference.load(path)
    for name, tensor in twin.state_dict().items():
        if name in tensors:
            assert np.array_equal(tensor.numpy(), tensors[name]), name
    model = flax_gpt.load(path)
    assert np.array_equal(np.asarray(model.pred.kernel[...]).T, tensors["pred.weight"])


def test_bench_on_a_mesh_reports_per_device(tmp_path):
    """`bench --mesh`: tokens/s per device, and the parameter and AdamW bytes one device holds,
    measured from the arrays: what the rules predict (core.sharding.per_device_elements)."""
    mesh = "data=2,fsdp=2,tensor=2"
    result = run_cli("bench", "--preset", "tiny", "--batch-size", "4", "--warmup", "0",
                     "--steps", "2", "--variants", "flax-jit-fp32,torch-eager-fp32",
                     "--mesh", mesh, "--json", tmp_path / "b.json",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/s/device" in result.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    flax, torch = report["results"]
    config = GPTConfig.from_dict(report["config"])
    assert report["mesh"] == mesh and flax["devices"] == 8 and torch["devices"] == 1
    assert flax["tokens_per_s_per_device"] == pytest.approx(flax["tokens_per_s"] / 8)
    assert flax["param_bytes_per_device"] == 4 * per_device_elements(config, MeshShape.parse(mesh))
    assert torch["param_bytes_per_device"] == 4 * per_device_elements(config, MeshShape())
    counts = 8 * len(weights.canonical_shapes(config))  # at most a step count per tensor
    for r in (flax, torch):  # AdamW's two moments
        assert 2 * r["param_bytes_per_device"] <= r["optimizer_bytes_per_device"] \
            <= 2 * r["param_bytes_per_device"] + counts
    assert flax["loss"] == pytest.approx(torch["loss"], abs=1e-4)  # the same step, laid out


def test_cli_train_on_a_mesh_prints_its_rules_and_resumes_on_one_device(tmp_path):
    """`train --mesh` prints the layout before training; its run resumes without a mesh."""
    run, eight = tmp_path / "run", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = ["--preset", "tiny", "--synthetic", "--batch-size", "4", "--eval-every", "2",
            "--eval-batches", "2", "--log-every", "1", "--out", run]
    first = run_cli("train", *args, "--steps", "3", "--stop-at", "2", "--mesh",
                    "data=2,fsdp=2,tensor=2", env=eight)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stderr.splitlines()
    assert lines[0].startswith("mesh data=2,fsdp=2,tensor=2 (8 devices): batch rows over data*fsdp = 4")
    assert "  decoder.layers.*.mhma.q.weight [32:tensor, 32:fsdp]" in lines
    assert "  pred.weight [64:tensor, 32:fsdp]" in lines
    assert "2 steps" in first.stdout and "val loss" in first.stdout  # evaluated on the mesh
    second = run_cli("train", *args, "--steps", "3", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert not second.stderr.startswith("mesh")
    logged = [json.loads(line) for line in (run / runfolder.METRICS).read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in logged if "val_loss" in r] == [2, 3]
