"""Trainers, run folders, checkpoints, resume, Ctrl-C, generate and eval."""

import json
import os
import signal

import numpy as np
import pytest

from flax_gpt.core import loop, runfolder
from flax_gpt.core.streams import DatasetStream
from flax_gpt.sidebyside.pair import apply_precision
from flax_gpt.experiments import backend as make_backend
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.data import TokenDataset
from flax_gpt.core.errors import CheckpointError
from flax_gpt.core.hparams import TrainConfig, learning_rates
from tests.conftest import run_cli
from tests.datasets import prepare_dataset

apply_precision("highest")
FRAMEWORKS = ["flax", "torch"]
STEPS = 6


@pytest.fixture(scope="module")
def small_data(shakespeare, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ds"
    prepare_dataset([(shakespeare.name, shakespeare.read_bytes()[:200_000])], out, max_vocab=128)
    return out


def setup(data, framework, steps=STEPS, **changes):
    dataset = TokenDataset.load(data)
    config = GPTConfig.preset("tiny", vocab_size=dataset.vocab_size)
    tc = TrainConfig(**{"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, **changes})
    stream = DatasetStream(dataset, tc.batch_size, config.seq_len, tc.seed)
    return make_backend(framework, config, tc), stream


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_learning_rate_table():
    lrs = learning_rates(TrainConfig(steps=10, lr=1.0, warmup_steps=4, min_lr_ratio=0.1))
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == 1.0 and np.isclose(lrs[-1], 0.1) and np.all(np.diff(lrs[4:]) < 0)


def test_backends_of_one_experiment_share_their_compiled_step():
    """One jitted step per (config, tc, mesh), so a second backend does not compile again;
    another schedule or precision gets its own."""
    config, tc = GPTConfig.preset("tiny"), TrainConfig(steps=3, batch_size=2)
    first, second = make_backend("flax", config, tc), make_backend("flax", config, tc)
    assert first._step is second._step
    for other in (tc.replace(steps=4), tc.replace(precision="float64")):
        assert make_backend("flax", config, other)._step is not first._step
    apply_precision("highest")  # float64 above switched JAX's x64 on
    assert make_backend("flax", config.replace(dropout=0.1), tc)._step is not first._step


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_is_bitwise_exact(small_data, tmp_path, framework):
    """N steps, or N/2 then a resumed N/2: the same losses at every step, bit for bit."""
    backend, stream = setup(small_data, framework, grad_accum=2)
    full = losses(loop.train(backend, stream, tmp_path / "full", log_every=1))
    assert len(full) == STEPS and full[-1] < full[0]

    backend, stream = setup(small_data, framework, grad_accum=2)
    first = losses(loop.train(backend, stream, tmp_path / "half", log_every=2, stop_at=STEPS // 2))
    backend, stream = setup(small_data, framework, grad_accum=2)
    second = losses(loop.train(backend, stream, tmp_path / "half", resume=True, log_every=1))
    assert first + second == full  # == on Python floats: bitwise


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_interrupt_then_resume_equals_unbroken(small_data, tmp_path, framework):
    """Ctrl-C at step 3 saves a checkpoint; resuming replays steps 4.. bit for bit."""
    backend, stream = setup(small_data, framework)
    full = losses(loop.train(backend, stream, tmp_path / "full", log_every=1))

    backend, stream = setup(small_data, framework)
    step = backend.step

    def interrupt_after_third(index, x, y):
        metrics = step(index, x, y)
        if index == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    backend.step = interrupt_after_third
    with pytest.raises(KeyboardInterrupt):
        loop.train(backend, stream, tmp_path / "cut", log_every=2)
    assert [p.name for p in (tmp_path / "cut" / runfolder.CHECKPOINTS).iterdir()] == ["step_00000003"]
    logged = [json.loads(line) for line in (tmp_path / "cut" / runfolder.METRICS).read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]

    backend, stream = setup(small_data, framework)
    resumed = losses(loop.train(backend, stream, tmp_path / "cut", resume=True, log_every=1))
    assert [r["loss"] for r in logged] + resumed == full  # bitwise: == on Python floats


def test_run_folder_holds_loadable_weights_and_keeps_last_k(small_data, tmp_path):
    import flax_gpt
    import torch_reference

    backend, stream = setup(small_data, "flax")
    loop.train(backend, stream, tmp_path / "run", checkpoint_every=1, keep=2)
    assert sorted(p.name for p in (tmp_path / "run" / runfolder.CHECKPOINTS).iterdir()) == [
        "step_00000005", "step_00000006"]
    record = json.loads((tmp_path / "run" / runfolder.CONFIG).read_text())
    assert record["framework"] == "flax" and record["data"]["path"] == str(small_data.resolve())
    assert flax_gpt.load(tmp_path / "run" / runfolder.WEIGHTS).config == backend.config
    assert torch_reference.load(tmp_path / "run" / runfolder.WEIGHTS).config == backend.config


def test_refusals(small_data, tmp_path, shakespeare):
    backend, stream = setup(small_data, "flax")
    loop.train(backend, stream, tmp_path / "run")
    with pytest.raises(CheckpointError, match="already exists: pass --resume"):
        loop.train(*setup(small_data, "flax"), tmp_path / "run")
    with pytest.raises(CheckpointError, match="already at step 6"):
        loop.train(*setup(small_data, "flax"), tmp_path / "run", resume=True)
    with pytest.raises(CheckpointError, match="framework"):
        loop.train(*setup(small_data, "torch", steps=9), tmp_path / "run", resume=True)
    with pytest.raises(CheckpointError, match="training settings differ"):
        loop.train(*setup(small_data, "flax", steps=9, lr=1e-2), tmp_path / "run", resume=True)
    other = tmp_path / "other"
    prepare_dataset([(shakespeare.name, shakespeare.read_bytes()[:150_000])], other, max_vocab=128)
    with pytest.raises(CheckpointError, match="dataset"):
        loop.train(*setup(other, "flax", steps=9), tmp_path / "run", resume=True)
    backend, stream = setup(small_data, "flax", steps=9)
    backend.config = backend.config.replace(n_layers=3)
    with pytest.raises(CheckpointError, match="model config"):
        loop.train(backend, stream, tmp_path / "run", resume=True)


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "optimizer.safetensors").write_bytes(b"x"), "does not match its checksum"),
    (lambda f: (f / "weights.safetensors").unlink(), "incomplete or corrupt"),
    (lambda f: (f / "state.json").write_text("{"), "incomplete or corrupt"),
])
def test_corrupt_checkpoint_is_refused(small_data, tmp_path, damage, message):
    backend, stream = setup(small_data, "flax")
    loop.train(backend, stream, tmp_path / "run", stop_at=3)
    damage(runfolder.latest_checkpoint(tmp_path / "run"))
    with pytest.raises(CheckpointError, match=message):
        loop.train(*setup(small_data, "flax"), tmp_path / "run", resume=True)


def test_cli_train_generate_eval(small_data, tmp_path):
    run = tmp_path / "run"
    # the dataset typed relative to where train runs; eval and generate run elsewhere
    args = ["--preset", "tiny", "--data", small_data.name, "--steps", "4", "--batch-size", "4",
            "--eval-every", "2", "--eval-batches", "2"]
    result = run_cli("train", *args, "--out", run, cwd=small_data.parent)
    assert result.returncode == 0, result.stderr
    assert "4 steps" in result.stdout and "val loss" in result.stdout
    # piped, progress is plain lines, not bar frames
    assert "step 4/4, loss " in result.stderr and "tokens/s" in result.stderr
    assert "\r" not in result.stderr
    modes = {p.relative_to(run): oct(p.stat().st_mode & 0o777) for p in run.rglob("*")
             if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # every file of a run folder alike
    records = [json.loads(line) for line in (run / runfolder.METRICS).read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"} <= records[0].keys()
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]

    again = run_cli("train", *args, "--out", run, cwd=small_data.parent)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    gen = ["generate", "--run", run, "--prompt", "the king zyzzyva", "--max-new-tokens", "8",
           "--seed", "3", "--top-k", "5"]
    first, second = run_cli(*gen), run_cli(*gen)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and len(first.stdout.split()) >= 8
    assert "<eos>" not in first.stdout and "<bos>" not in first.stdout  # line ends instead
    assert "zyzzyva" in first.stderr and "<unk>" in first.stderr

    ev = run_cli("eval", "--run", run, "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["split"] == "val" and np.isclose(result["perplexity"], np.exp(result["loss"]))

    missing = run_cli("generate", "--run", tmp_path / "nope")
    assert missing.returncode == 2 and "not a run folder" in missing.stderr
