"""The Flax trainer on a mesh of 8 fake CPU devices, held to the single-device run.

Fake devices need XLA_FLAGS before jax is imported, so all of it runs in subprocesses, and
few: starting one and compiling in it is what costs. One runs scripts/mesh_equivalence.py
short: STEPS steps of both of its configs (8 heads, and 4) on every mesh, float64 and
accumulation on 2x2x2, the checkpoint runs, at one layer (the rules are the same for every
layer, and a layer less halves the compilation). Another runs `train --mesh`, a resume
without it and `bench --mesh` through the CLI; a third, `train` as two JAX processes of 4
devices, resumed in one. All compile with LLVM unoptimized (--fast-compile, see the script;
XLA_FLAGS here): the HLO, the sharding and the collectives are the default build's, and both
sides of each comparison compile alike. The script's full run (docs/devices.md) is 2
layers, 50 steps, default flags.
"""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from flax_gpt.core import runfolder, weights
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.sharding import MeshShape, per_device_elements, rules
from flax_gpt.sidebyside.tolerances import TRAIN_LOSS_ATOL
from tests.conftest import (REPO, assert_close, assert_same, has_fsdp2, run_cli_here,
                            run_cli_many)

LOSS_TOL = 1e-6  # per-step |loss difference|, float32 highest (~2 ulps of a loss of 4.2)
PARAM_TOL = 1e-5  # largest |parameter difference| after the last step, float32
FLOAT64_TOL = 1e-12  # loss and parameters, float64
MESHES = ["data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2"]
STEPS = 4  # the checkpoint runs stop and restore at step 2
EIGHT = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
FOUR = EIGHT.replace("=8", "=4")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mesh")
    result = subprocess.run(
        [sys.executable, "scripts/mesh_equivalence.py", "--devices", "8", "--steps", str(STEPS),
         "--meshes", " ".join(MESHES), "--float64", MESHES[-1], "--checkpoints", str(folder),
         "--layers", "1", "--fast-compile"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(result.stdout), "folder": folder}


def test_every_mesh_trains_as_one_device(report):
    """One test, so that the subprocess runs once (pytest-xdist would run a module fixture
    on every worker that takes one of its tests). Its parts are the checks below."""
    assert report["devices"] == 8 and set(report["configs"]) == {"heads8", "heads4"}
    for name, run in report["configs"].items():
        config = GPTConfig.from_dict(run["config"])
        check_float32(name, run["float32"])
        check_placement(name, config, run["float32"])
        check_float64(name, run["float64"][MESHES[-1]])
    check_accumulation(report["accumulation"])
    check_checkpoints(report["checkpoints"])
    check_gathered_export(report["folder"] / "unbroken",
                          GPTConfig.from_dict(report["configs"]["heads8"]["config"]))


def check_float32(name, runs):
    """Every step's loss within LOSS_TOL and the parameters after the last within PARAM_TOL,
    unmasked: over a few steps no ReLU unit sits within rounding of its kink (over 50 one
    does; docs/devices.md)."""
    for mesh in MESHES:
        run = runs[mesh]
        assert len(run["loss_diff"]) == STEPS
        assert run["max_loss_diff"] <= LOSS_TOL, (name, mesh, run["max_loss_diff"])
        assert run["max_param_diff"] <= PARAM_TOL, (name, mesh, run["max_param_diff"])


def check_placement(name, config, runs):
    """The trained arrays carry the rules' sharding (the step's out_shardings keep it), and
    fsdp and tensor really cut what a device holds."""
    total = 4 * sum(math.prod(s) for s in weights.canonical_shapes(config).values())
    for mesh in MESHES:
        expected = {n: list(spec) for n, spec in rules(config, MeshShape.parse(mesh)).items()}
        assert runs[mesh]["specs"] == expected, (name, mesh)
        assert runs[mesh]["param_bytes_per_device"] == 4 * per_device_elements(
            config, MeshShape.parse(mesh)), (name, mesh)
    assert runs["data=8"]["param_bytes_per_device"] == total  # replicated
    assert runs["fsdp=8"]["param_bytes_per_device"] == total // 8
    two = runs["data=2,fsdp=2,tensor=2"]
    assert two["specs"]["decoder.layers.0.mhma.q.weight"] == ["tensor", "fsdp"]
    assert two["specs"]["decoder.layers.0.ffn.fc2.weight"] == ["fsdp", "tensor"]
    assert two["param_bytes_per_device"] < total // 2
    assert two["optimizer_bytes_per_device"] >= 2 * two["param_bytes_per_device"]  # mu and nu
    heads_split = runs["tensor=8"]["specs"]["decoder.layers.0.mhma.q.weight"][0] == "tensor"
    assert heads_split == (config.n_heads % 8 == 0), name  # whole heads only


def check_float64(name, run):
    assert run["max_loss_diff"] <= FLOAT64_TOL, (name, run["max_loss_diff"])
    assert run["max_param_diff"] <= FLOAT64_TOL, (name, run["max_param_diff"])


def check_accumulation(run):
    """2x2x2, grad_accum=2 micro-batches of 8 rows, against one device taking the 16 rows
    as one batch."""
    assert run["mesh"] == MESHES[-1] and len(run["loss_diff"]) == STEPS
    assert run["max_loss_diff"] <= LOSS_TOL
    assert run["max_param_diff"] <= PARAM_TOL


def check_checkpoints(ck):
    """Resumed on the same mesh: every loss bit for bit. Restored on another mesh and on one
    device: every weight and optimizer tensor bit for bit, and training goes on as the
    unbroken run within LOSS_TOL."""
    assert ck["mesh"] == MESHES[-1] and len(ck["unbroken"]) == STEPS
    assert ck["resume_bitwise"] and ck["resumed"] == ck["unbroken"]
    for label in (MESHES[0], "single device"):
        restored = ck[f"restored on {label}"]
        assert restored["step"] == STEPS // 2 and restored["bitwise"], label
        assert restored["max_loss_diff_after"] <= LOSS_TOL, label


def check_gathered_export(run, config):
    """RUN/weights.safetensors of the 2x2x2 run: one file of whole tensors, loadable by
    flax_gpt.load and torch_reference.load, equal to the last checkpoint's."""
    import flax_gpt
    import torch_reference

    path = run / runfolder.WEIGHTS
    saved_config, tensors = weights.load(path)  # checks every name and whole shape
    assert saved_config == config
    assert path.read_bytes() == (runfolder.latest_checkpoint(run) / runfolder.WEIGHTS).read_bytes()
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".safetensors") == [runfolder.WEIGHTS]
    twin = torch_reference.load(path)
    for name, tensor in twin.state_dict().items():
        if name in tensors:
            assert np.array_equal(tensor.numpy(), tensors[name]), name
    model = flax_gpt.load(path)
    assert np.array_equal(np.asarray(model.pred.kernel[...]).T, tensors["pred.weight"])


def test_cli_on_a_mesh(tmp_path):
    """`train --mesh` prints the layout before training and evaluates on the mesh; its run
    resumes without a mesh. `compare --mesh` holds the sharded Flax run against PyTorch on
    two ranks (FSDP2 where the installed torch has it, else DDP). `bench --mesh` reports
    tokens/s per device, the scaling efficiency against the same variant on one device, and
    the parameter and AdamW bytes one device holds, measured from the arrays: what the rules
    predict (core.sharding.per_device_elements). One layer, as the module's note says."""
    run, mesh = tmp_path / "run", "data=2,fsdp=2,tensor=2"
    tiny = ["--preset", "tiny", "--n-layers", "1", "--batch-size", "4"]
    common = [*tiny, "--synthetic", "--eval-every", "2", "--eval-batches", "2", "--log-every",
              "1", "--steps", "3"]  # one schedule: compare reuses train's compiled step
    args = [*common, "--out", run]
    first, second, compare, bench = run_cli_many(
        ["train", *args, "--stop-at", "2", "--mesh", mesh],
        ["train", *args, "--resume"],
        ["compare", *common, "--mesh", mesh, "--nproc", "2", *["--fsdp"] * has_fsdp2(),
         "--out", tmp_path / "compare"],
        ["bench", *tiny, "--warmup", "0", "--steps", "2", "--rounds", "1", "--variants", "flax-jit-fp32,torch-eager-fp32", "--mesh", mesh,
         "--json", tmp_path / "b.json"],
        env={"XLA_FLAGS": EIGHT})

    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stderr.splitlines()
    assert lines[0].startswith(f"mesh {mesh} (8 devices): batch rows over data*fsdp = 4")
    assert "  decoder.layers.*.mhma.q.weight [32:tensor, 32:fsdp]" in lines
    assert "  pred.weight [64:tensor, 32:fsdp]" in lines
    assert "2 steps" in first.stdout and "val loss" in first.stdout  # evaluated on the mesh
    assert second.returncode == 0, second.stderr[-3000:]
    assert not second.stderr.startswith("mesh")
    logged = [json.loads(line) for line in (run / runfolder.METRICS).read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in logged if "val_loss" in r] == [2, 3]

    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "  pred.weight [64:tensor, 32:fsdp]" in compare.stderr.splitlines()
    report = json.loads((tmp_path / "compare" / "report.json").read_text())
    assert report["flax_mesh"] == mesh and report["steps"] == 3 and report["torch_ranks"] == 2
    assert report["torch_sharding"] == ("fsdp" if has_fsdp2() else "ddp")
    assert report["max_abs_loss_diff"] <= TRAIN_LOSS_ATOL  # sharded Flax against PyTorch

    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "tokens/s/device" in bench.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    flax, torch, one = report["results"]  # and the sharded variant again on one device
    config = GPTConfig.from_dict(report["config"])
    assert report["mesh"] == mesh and flax["devices"] == 8 and torch["devices"] == 1
    assert one["variant"] == "flax-jit-fp32@1-device" and one["devices"] == 1
    assert flax["tokens_per_s_per_device"] == pytest.approx(flax["tokens_per_s"] / 8)
    per_round = [a / 8 / b for a, b in zip(flax["round_tokens_per_s"], one["round_tokens_per_s"])]
    assert flax["scaling_efficiency"] == pytest.approx(float(np.median(per_round)))
    assert "scaling_efficiency" not in torch and "scaling_efficiency" not in one
    assert one["loss"] == pytest.approx(flax["loss"], abs=1e-4)
    assert flax["param_bytes_per_device"] == 4 * per_device_elements(config, MeshShape.parse(mesh))
    assert torch["param_bytes_per_device"] == 4 * per_device_elements(config, MeshShape())
    counts = 8 * len(weights.canonical_shapes(config))  # at most a step count per tensor
    for r in (flax, torch):  # AdamW's two moments
        assert 2 * r["param_bytes_per_device"] <= r["optimizer_bytes_per_device"] \
            <= 2 * r["param_bytes_per_device"] + counts
    assert flax["loss"] == pytest.approx(torch["loss"], abs=1e-4)  # the same step, laid out


def not_gloo(text):
    """The lines of `text` that are not gloo's: its C++ "[Gloo] Rank i is connected to n peer
    ranks" lines come from both processes through one pipe and can cut each other mid-line,
    leaving blank lines and bare numbers (": 3" then "3") behind."""
    return [line for line in text.splitlines()
            if "peer ranks" not in line and line.strip() and not line.strip().isdigit()]


def two_processes(*args, meshes=(MESHES[-1], MESHES[-1]), main=("-m", "flax_gpt"), env=None):
    """`flax-gpt ARGS --mesh MESH` as the two processes of one JAX job, 4 fake devices each,
    each given its mesh from `meshes`: [(returncode, stdout, stderr)] of process 0, then 1.
    `main`: what runs the CLI (a script such as tests/poisoned.py); `env`: more variables."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, *main, *map(str, args), "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": FOUR, **(env or {})}
    workers = [subprocess.Popen(command + ["--mesh", mesh, "--process-id", str(i)], cwd=REPO,
                                text=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for i, mesh in enumerate(meshes)]
    outputs = [w.communicate(timeout=600) for w in workers]
    return [(w.returncode, *output) for w, output in zip(workers, outputs)]


def test_two_processes_write_their_shards_and_resume_elsewhere(tmp_path):
    """`flax-gpt train` as two JAX processes of 4 fake devices each, on 2x2x2, stopped at
    step 2: each process writes its own shards of the checkpoint (orbax), process 0 alone
    everything else. Two processes resume it on another mesh to step 3, held to an unbroken
    run on one device, and the step-2 checkpoint restores onto one device exactly. Processes
    started with different settings are all refused, each in one line."""
    from flax_gpt.core.hparams import TrainConfig
    from flax_gpt.train import FlaxBackend

    common = ["train", "--preset", "tiny", "--synthetic", "--batch-size", "8", "--steps", "4",
              "--lr", "3e-3", "--log-every", "1", "--eval-every", "0", "--json"]
    run, single = tmp_path / "run", tmp_path / "single"

    for code, out, err in two_processes(*common, "--out", tmp_path / "odd",
                                        meshes=("data=8", "fsdp=8")):
        lines = not_gloo(err)
        assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].endswith("flax-gpt train: error: process 1 was started with other "
                                "settings than process 0 (--mesh, --out or training options): "
                                "start every process with the same flags, only --process-id "
                                "differing"), lines
    assert not (tmp_path / "odd").exists()

    workers = two_processes(*common, "--stop-at", "2", "--out", run)
    (code0, out0, err0), (code1, out1, err1) = workers
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    first = json.loads(out0)  # stdout holds the JSON alone: gloo's lines go to stderr
    assert [r["step"] for r in first["history"]] == [1, 2]
    assert out1 == "" and not any(line.startswith("mesh ") for line in err1.splitlines())
    assert any(line.startswith(f"mesh {MESHES[-1]} (8 devices)") for line in err0.splitlines())
    logged = [json.loads(line) for line in (run / runfolder.METRICS).read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]  # written once, by process 0

    checkpoint = run / runfolder.CHECKPOINTS / "step_00000002"
    assert sorted(p.name for p in (run / runfolder.CHECKPOINTS).iterdir()) == [checkpoint.name]
    files = json.loads((checkpoint / runfolder.STATE).read_text())["files"]
    writers = {name.split("/")[1] for name in files if name.startswith("state/ocdbt.process_")}
    assert writers == {"ocdbt.process_0", "ocdbt.process_1"}  # each process its own shards
    assert runfolder.WEIGHTS in files

    (code0, out0, err0), (code1, _, err1) = two_processes(
        *common, "--resume", "--stop-at", "3", "--out", run, meshes=["fsdp=4,tensor=2"] * 2)
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    second = json.loads(out0)
    assert [r["step"] for r in second["history"]] == [3]
    unbroken = run_cli_here(*common, "--stop-at", "3", "--out", single)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    losses = [r["loss"] for r in first["history"] + second["history"]]
    assert_close(losses, [r["loss"] for r in json.loads(unbroken.stdout)["history"]],
                 rtol=0, atol=LOSS_TOL)
    (_, ours), (_, theirs) = (weights.load(r / runfolder.WEIGHTS) for r in (run, single))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert_close(ours[name], theirs[name], rtol=0, atol=PARAM_TOL, err_msg=name)

    config, saved = weights.load(checkpoint / runfolder.WEIGHTS)  # gathered by process 0
    one = FlaxBackend(config, TrainConfig(steps=4, batch_size=8, lr=3e-3))
    one.load(checkpoint)  # onto this process's one device
    for name, tensor in one.canonical().items():
        assert_same(tensor, saved[name], err_msg=name)
    assert int(one.opt_state[1][0].count) == 2  # AdamW's step count came back too


def test_two_processes_write_no_shard_of_non_finite_weights(tmp_path):
    """The parameters turn NaN in step 4, whose loss is still finite (tests/poisoned.py), on
    two JAX processes of 4 fake devices each: they agree before either writes a shard of
    checkpoint 4, and each stops as one process does, exit 2 with its one line; checkpoint 2
    is kept and restores onto one device."""
    from flax_gpt.core.hparams import TrainConfig
    from flax_gpt.train import FlaxBackend

    run, saves = tmp_path / "run", tmp_path / "saves"
    config = GPTConfig.preset("tiny")
    n = int(np.prod(weights.canonical_shapes(config)["embed.token.weight"]))
    line = (f"flax-gpt train: error: step 4: the weights hold NaN or Inf (tensor "
            f"'embed.token.weight' holds {n} NaN or Inf value(s)), so training diverged and "
            f"stopped; its last good checkpoint, step 2, is kept in {run}. Lower --lr (or keep "
            f"--grad-clip on) and train again")
    for code, out, err in two_processes(
            "train", "--preset", "tiny", "--synthetic", "--batch-size", "8", "--steps", "4",
            "--warmup-steps", "1", "--checkpoint-every", "2", "--eval-every", "0", "--out", run,
            main=["tests/poisoned.py"], env={"POISON_STEP": "3", "SAVES_LOG": str(saves)}):
        # not gloo's connection lines (on either stream), the mesh's table or the progress
        # lines of process 0
        errors = [text for text in err.splitlines() if "error" in text]
        assert code == 2 and errors == [line] and "Traceback" not in err, err[-3000:]
        assert not not_gloo(out), out
    written = saves.read_text().split()
    assert written == [".step_00000002.tmp"] * 2  # by each process, its shards; none of step 4
    assert sorted(p.name for p in (run / runfolder.CHECKPOINTS).iterdir()) == ["step_00000002"]
    checkpoint = run / runfolder.CHECKPOINTS / "step_00000002"
    _, latest = weights.load(run / runfolder.WEIGHTS)  # refuses NaN: these are step 2's
    one = FlaxBackend(config, TrainConfig(steps=4, batch_size=8, warmup_steps=1))
    one.load(checkpoint)  # its shards, onto one device
    for name, tensor in one.canonical().items():
        assert_same(tensor, latest[name], err_msg=name)
