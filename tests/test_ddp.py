"""PyTorch data parallel: `train --framework torch --nproc 2` (DDP over gloo, two spawned
processes) against one process on the same global batches."""

import json

import numpy as np
import pytest

from flax_gpt import experiments
from flax_gpt.core import runfolder, weights
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.hparams import TrainConfig
from tests.conftest import run_cli

LOSS_TOL = 1e-6  # per-step |loss difference|, float32 (~2 ulps of a loss of 4.2)
PARAM_TOL = 1e-5  # largest |parameter difference| after the last step
STEPS = 8
ARGS = ["--framework", "torch", "--preset", "tiny", "--synthetic", "--steps", str(STEPS),
        "--batch-size", "4", "--grad-accum", "2", "--warmup-steps", "2", "--log-every", "1",
        "--eval-every", "4", "--eval-batches", "2"]


def records(run):
    return [json.loads(line) for line in (run / runfolder.METRICS).read_text().splitlines()]


def losses(run):
    return [r["loss"] for r in records(run) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    unbroken = run_cli("train", *ARGS, "--nproc", "2", "--checkpoint-every", "4",
                       "--out", folder / "ddp")
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    first = run_cli("train", *ARGS, "--nproc", "2", "--stop-at", "4", "--out", folder / "resumed")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("train", *ARGS, "--nproc", "2", "--resume", "--out", folder / "resumed")
    assert second.returncode == 0, second.stderr[-3000:]
    one = experiments.train("torch", GPTConfig.preset("tiny"),
                            TrainConfig(steps=STEPS, batch_size=4, grad_accum=2, warmup_steps=2),
                            synthetic=True, out=folder / "one", log_every=1, eval_every=4,
                            eval_batches=2)
    return folder, one


def test_two_ranks_train_as_one_process(runs):
    folder, one = runs
    ddp, single = losses(folder / "ddp"), [r["loss"] for r in one.steps]
    assert len(ddp) == STEPS  # rank 1 logged nothing
    assert max(abs(a - b) for a, b in zip(ddp, single)) <= LOSS_TOL
    evals = [r["val_loss"] for r in records(folder / "ddp") if "val_loss" in r]
    assert len(evals) == 2
    assert max(abs(a - b["val_loss"]) for a, b in zip(evals, one.evals)) <= LOSS_TOL
    _, a = weights.load(folder / "ddp" / runfolder.WEIGHTS)
    _, b = weights.load(folder / "one" / runfolder.WEIGHTS)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= PARAM_TOL


def test_only_rank_zero_writes_and_resume_is_bitwise(runs):
    folder, _ = runs
    assert sorted(p.name for p in (folder / "ddp").iterdir()) == sorted(
        [runfolder.CONFIG, runfolder.METRICS, runfolder.CHECKPOINTS, runfolder.WEIGHTS])
    assert sorted(p.name for p in (folder / "ddp" / runfolder.CHECKPOINTS).iterdir()) == [
        "step_00000004", "step_00000008"]
    assert losses(folder / "resumed") == losses(folder / "ddp")  # == on floats: bitwise


@pytest.mark.parametrize("args,message", [
    (["--framework", "torch", "--nproc", "2", "--batch-size", "3"],
     "--batch-size 3 does not split over --nproc 2 ranks: make it a multiple of 2"),
    (["--nproc", "2"], "--nproc runs the PyTorch trainer data parallel"),
    (["--framework", "torch", "--mesh", "data=2"], "--mesh shards the Flax trainer"),
])
def test_refusals_are_one_line(tmp_path, args, message):
    result = run_cli("train", "--preset", "tiny", "--synthetic", "--steps", "1",
                     "--out", tmp_path / "run", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
