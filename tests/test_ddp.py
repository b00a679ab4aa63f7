"""PyTorch data parallel: `train --framework torch --nproc 2` (DDP over gloo, two spawned
processes) and `--nproc 2 --fsdp` (FSDP2) against one process on the same global batches.

Every command runs in one subprocess (tests.conftest.run_cli_many), and in one test, so that
pytest-xdist starts it once: the interpreter and the imports are paid once, and what is left
is each run's two spawned ranks.
"""

import json
import os
import subprocess
import sys

import numpy as np

from flax_gpt.core import runfolder, weights
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.hparams import TrainConfig
from tests.conftest import REPO, assert_same, has_fsdp2, run_cli_many
from torch_reference.train import TorchBackend

LOSS_TOL = 1e-6  # per-step |loss difference|, float32 (~2 ulps of a loss of 4.2)
PARAM_TOL = 1e-5  # largest |parameter difference| after the last step
STEPS = 6
ARGS = ["--framework", "torch", "--preset", "tiny", "--synthetic", "--steps", str(STEPS),
        "--batch-size", "4", "--grad-accum", "2", "--warmup-steps", "2", "--log-every", "1",
        "--eval-every", "3", "--eval-batches", "2"]
REFUSALS = [
    (["--framework", "torch", "--nproc", "2", "--batch-size", "3"],
     "--batch-size 3 does not split over --nproc 2 ranks: make it a multiple of 2"),
    (["--nproc", "2"], "--nproc runs the PyTorch trainer data parallel"),
    (["--framework", "torch", "--mesh", "data=2"], "--mesh shards the Flax trainer"),
    (["--framework", "torch", "--fsdp"], "--fsdp shards over several ranks: give --nproc N"),
    (["--fsdp"], "--fsdp shards the PyTorch trainer over its ranks"),
] + [(["--framework", "torch", "--nproc", "2", "--fsdp"], "--fsdp needs FSDP2")] * (not has_fsdp2())
# FSDP2, into the folder "fsdp": stopped and resumed on 2 ranks, then on 1 process from their
# shards, then on 2 again from that process's whole files; and unbroken on 2 ranks to step 4
FSDP = ["--nproc", "2", "--fsdp"]
FSDP_LEGS = [("fsdp", [*FSDP, "--stop-at", "3"]), ("fsdp", [*FSDP, "--resume", "--stop-at", "4"]),
             ("fsdp", ["--resume", "--stop-at", "5"]), ("fsdp", [*FSDP, "--resume"]),
             ("fsdp-unbroken", [*FSDP, "--stop-at", "4"])] if has_fsdp2() else []


def records(run):
    return [json.loads(line) for line in (run / runfolder.METRICS).read_text().splitlines()]


def losses(run):
    return [r["loss"] for r in records(run) if "loss" in r]


def test_two_ranks_train_as_one_process(tmp_path):
    """Two ranks against one process: every step's loss and every evaluation within
    LOSS_TOL, the weights within PARAM_TOL. Rank 0 alone writes; a run stopped and resumed
    on two ranks (the resume started by torchrun, whose ranks each check the run folder)
    repeats the unbroken one bit for bit. Under FSDP2 (where the installed
    torch has it) the same, and every rank writes its own checkpoint shards, which restore
    exactly onto one process; the run goes 2 ranks, 1, 2 and is still held to the one
    process. Bad settings are refused in one line, before any rank starts."""
    done = run_cli_many(
        ["train", *ARGS, "--nproc", "2", "--checkpoint-every", "3", "--out", tmp_path / "ddp"],
        ["train", *ARGS, "--nproc", "2", "--stop-at", "3", "--out", tmp_path / "resumed"],
        ["train", *ARGS, "--out", tmp_path / "one"],
        *[["train", *ARGS, *leg, "--out", tmp_path / folder] for folder, leg in FSDP_LEGS],
        *[["train", "--preset", "tiny", "--synthetic", "--steps", "1",
           "--out", tmp_path / f"refused{i}", *args] for i, (args, _) in enumerate(REFUSALS)])
    ran, refused = done[:3 + len(FSDP_LEGS)], done[3 + len(FSDP_LEGS):]
    ran.append(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "flax_gpt", "train", *ARGS, "--resume", "--out", str(tmp_path / "resumed")],
        cwd=REPO, capture_output=True, text=True, timeout=600))
    for result in ran:
        assert result.returncode == 0, result.stderr[-3000:]

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert len(losses(ddp)) == STEPS  # rank 1 logged nothing
    # np.max, not max(): a NaN fails wherever it is (max() keeps a number seen before it)
    assert np.max([abs(a - b) for a, b in zip(losses(ddp), losses(one))]) <= LOSS_TOL
    evals = [[r["val_loss"] for r in records(run) if "val_loss" in r] for run in (ddp, one)]
    assert len(evals[0]) == 2 and len(evals[1]) == 2
    assert np.max([abs(a - b) for a, b in zip(*evals)]) <= LOSS_TOL
    _, a = weights.load(ddp / runfolder.WEIGHTS)
    _, b = weights.load(one / runfolder.WEIGHTS)
    assert np.max([np.abs(a[k] - b[k]).max() for k in a]) <= PARAM_TOL

    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (ddp / runfolder.CHECKPOINTS).iterdir()) == [
        "step_00000003", "step_00000006"]
    assert losses(tmp_path / "resumed") == losses(ddp)  # == on floats: bitwise

    if FSDP_LEGS:
        check_fsdp(tmp_path / "fsdp", tmp_path / "fsdp-unbroken", one)
    for i, (result, (_, message)) in enumerate(zip(refused, REFUSALS)):
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / f"refused{i}").exists()


def check_fsdp(run, unbroken, one):
    assert np.max([abs(a - b) for a, b in zip(losses(run), losses(one))]) <= LOSS_TOL
    assert len(losses(run)) == STEPS
    assert losses(run)[:4] == losses(unbroken)  # resumed on 2 ranks: bit for bit
    evals = [{r["step"]: r["val_loss"] for r in records(r) if "val_loss" in r} for r in (run, one)]
    assert evals[0].keys() == {3, 4, 5, 6} and evals[1].keys() == {3, 6}  # 4, 5: legs' ends
    assert np.max([abs(evals[0][s] - evals[1][s]) for s in (3, 6)]) <= LOSS_TOL
    _, a = weights.load(run / runfolder.WEIGHTS)
    _, b = weights.load(one / runfolder.WEIGHTS)
    assert np.max([np.abs(a[k] - b[k]).max() for k in a]) <= PARAM_TOL

    sharded, whole = (run / runfolder.CHECKPOINTS / f"step_0000000{s}" for s in (4, 5))
    files = json.loads((sharded / runfolder.STATE).read_text())["files"]
    assert {"state/__0_0.distcp", "state/__1_0.distcp"} <= files.keys()  # a file per rank
    assert not (whole / runfolder.SHARDED).exists()  # one process writes the gathered files
    record = runfolder.read_record(run)
    restored = TorchBackend(GPTConfig.from_dict(record["model"]), TrainConfig(**record["train"]))
    restored.load(sharded)  # the two ranks' shards onto one process
    _, saved = weights.load(sharded / runfolder.WEIGHTS)  # gathered by rank 0
    for name, tensor in restored.canonical().items():
        assert_same(tensor, saved[name], err_msg=name)
    adam = restored.train_step.optimizer.state_dict()["state"]
    assert len(adam) == len(saved) and all(float(s["step"]) == 4 for s in adam.values())


def poisoned_run(args, env, timeout=600):
    """`flax-gpt ARGS` through tests/poisoned.py (the parameters NaN after a chosen step)."""
    return subprocess.run([sys.executable, "tests/poisoned.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def diverged_at_4(run, config):
    """The one line a run of one process stops with when its step-4 weights hold NaN."""
    n = int(np.prod(weights.canonical_shapes(config)["embed.token.weight"]))
    return (f"flax-gpt train: error: step 4: the weights hold NaN or Inf (tensor "
            f"'embed.token.weight' holds {n} NaN or Inf value(s)), so training diverged and "
            f"stopped; its last good checkpoint, step 2, is kept in {run}. Lower --lr (or keep "
            f"--grad-clip on) and train again")


def check_refused_at_4(result, run, saves, config):
    """Exit 2 with the one line of one process, nothing of checkpoint 4 written by any rank,
    and checkpoint 2 kept whole and restorable."""
    errors = [line for line in result.stderr.splitlines()
              if line.strip() and not line.startswith("step ")]  # not the progress lines
    assert result.returncode == 2 and errors == [diverged_at_4(run, config)], result.stderr
    written = saves.read_text().split()
    assert written and all("step_00000002" in name for name in written), written
    assert sorted(p.name for p in (run / runfolder.CHECKPOINTS).iterdir()) == ["step_00000002"]
    _, latest = weights.load(run / runfolder.WEIGHTS)  # refuses NaN: these are step 2's
    record = runfolder.read_record(run)
    restored = TorchBackend(GPTConfig.from_dict(record["model"]), TrainConfig(**record["train"]))
    restored.load(run / runfolder.CHECKPOINTS / "step_00000002")
    for name, tensor in restored.canonical().items():
        assert_same(tensor, latest[name], err_msg=name)


def test_no_rank_writes_a_checkpoint_of_non_finite_weights(tmp_path):
    """The parameters turn NaN in step 4, whose loss is still finite (tests/poisoned.py):
    under DDP on rank 1 alone (a replica gone bad, which rank 0, the one that writes, does
    not see in its own weights), under FSDP2 on every rank's shards. The ranks agree before
    any of them writes a file of checkpoint 4, and the run stops as one process does: exit
    2, one line, checkpoint 2 kept and restorable."""
    config = GPTConfig.preset("tiny")
    common = ["train", "--framework", "torch", "--preset", "tiny", "--synthetic", "--steps", "4",
              "--batch-size", "4", "--warmup-steps", "1", "--checkpoint-every", "2",
              "--eval-every", "0", "--nproc", "2"]
    legs = [("ddp", [], {"POISON_RANK": "1"})] + [("fsdp", ["--fsdp"], {})] * has_fsdp2()
    for name, args, env in legs:
        run, saves = tmp_path / name, tmp_path / f"{name}.saves"
        result = poisoned_run([*common, *args, "--out", run],
                              {"POISON_STEP": "3", "SAVES_LOG": str(saves), **env})
        check_refused_at_4(result, run, saves, config)
