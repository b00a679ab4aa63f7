"""Trainers, run folders, checkpoints, resume, Ctrl-C, generate and eval."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from flax_gpt import experiments
from flax_gpt.core import loop, runfolder
from flax_gpt.core.config import ConfigError, GPTConfig
from flax_gpt.core.errors import CheckpointError, Interrupted
from flax_gpt.core.hparams import TrainConfig, learning_rates
from flax_gpt.core.streams import SyntheticStream, step_batch
from flax_gpt.experiments import backend as make_backend
from flax_gpt.sidebyside.pair import apply_precision
from flax_gpt.sidebyside.tolerances import LOSS_ATOL
from tests.conftest import assert_close, run_cli, run_cli_many
from tests.datasets import prepare_dataset

apply_precision("highest")
FRAMEWORKS = ["flax", "torch"]
STEPS = 6


@pytest.fixture(scope="module")
def small_data(shakespeare, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ds"
    prepare_dataset([(shakespeare.name, shakespeare.read_bytes()[:200_000])], out, max_vocab=128)
    return out


def setup(data, framework, steps=STEPS, dropout=0.0, **changes):
    """A `tiny` backend and its stream: the dataset folder `data`, or random tokens if None."""
    tc = TrainConfig(**{"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, **changes})
    config, stream = experiments.make_stream(GPTConfig.preset("tiny", dropout=dropout), tc,
                                             data=data, synthetic=data is None)
    return make_backend(framework, config, tc), stream


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_learning_rate_table():
    lrs = learning_rates(TrainConfig(steps=10, lr=1.0, warmup_steps=4, min_lr_ratio=0.1))
    assert_close(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=0, atol=0)
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


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_is_bitwise_exact(small_data, tmp_path, framework, dropout):
    """N steps, or N/2 then a resumed N/2: the same losses at every step, bit for bit (with
    dropout too: its masks are drawn from (seed, step), not from state carried along)."""
    backend, stream = setup(small_data, framework, dropout=dropout, grad_accum=2)
    full = losses(loop.train(backend, stream, tmp_path / "full", log_every=1))
    assert len(full) == STEPS and full[-1] < full[0]

    backend, stream = setup(small_data, framework, dropout=dropout, grad_accum=2)
    first = losses(loop.train(backend, stream, tmp_path / "half", log_every=2, stop_at=STEPS // 2))
    backend, stream = setup(small_data, framework, dropout=dropout, grad_accum=2)
    second = losses(loop.train(backend, stream, tmp_path / "half", resume=True, log_every=1))
    assert first + second == full  # == on Python floats: bitwise


def step_losses(backend, stream, steps=3):
    return [backend.fetch(backend.step(s, *step_batch(stream, s, backend.tc.grad_accum)))["loss"]
            for s in range(steps)]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dropout_changes_the_loss_and_the_seed_repeats_it(framework):
    """From one seeded init, dropout 0.1 gives other losses than dropout 0 at every step, and
    the same seed gives the same losses again, bit for bit."""
    plain = step_losses(*setup(None, framework, grad_accum=2))
    dropped = step_losses(*setup(None, framework, dropout=0.1, grad_accum=2))
    assert all(a != b for a, b in zip(plain, dropped))
    assert step_losses(*setup(None, framework, dropout=0.1, grad_accum=2)) == dropped


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_eval_loss_turns_dropout_off(framework):
    """A backend with dropout 0.5 evaluates exactly as the same weights with dropout 0."""
    backend, stream = setup(None, framework, dropout=0.5)
    plain = make_backend(framework, backend.config.replace(dropout=0.0), backend.tc,
                         backend.canonical())
    x, y = stream.eval_batches(1)[0]
    assert backend.eval_loss(x, y) == plain.eval_loss(x, y) == backend.eval_loss(x, y)


def test_train_config_refuses_a_negative_seed():
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        TrainConfig(seed=-1)


def test_synthetic_splits_are_apart_and_fixed():
    stream = SyntheticStream(64, 2, 8, seed=3)
    val = stream.eval_batches(0)
    assert len(val) == SyntheticStream.EVAL_BATCHES
    assert not any(np.array_equal(stream.batch(k)[0], v[0]) for k in range(len(val)) for v in val)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(val, stream.eval_batches(0)))
    assert all(np.array_equal(stream.batch(k)[0], t[0])
               for k, t in enumerate(stream.eval_batches(2, "train")))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fault is in XLA's CPU runtime")
def test_cpu_donation():
    """flax_gpt.train.donated() against what this jaxlib computes on CPU: where it donates
    nothing, the reason holds (with the parameters donated, the second step, whose donated
    parameters are the first step's outputs, computes another loss than undonated); where it
    donates, the donated steps give the undonated losses exactly. Not on `tiny`: the fault
    needs d_model 256. If the first branch fails, the installed jaxlib has the fix: lower
    train.CPU_DONATION_FIXED_IN to it."""
    from flax import nnx

    from flax_gpt.model import GPT
    from flax_gpt.train import donated, make_train_step, optimizer

    config = GPTConfig.preset("small", vocab_size=64, n_layers=1)
    tc = TrainConfig(steps=2, batch_size=4, warmup_steps=1, grad_clip=1.0)
    stream = SyntheticStream(config.vocab_size, tc.batch_size, config.seq_len, tc.seed)

    def two_steps(donate):
        model = GPT(config, rngs=nnx.Rngs(0))
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optimizer(tc)
        step, opt_state, out = make_train_step(graphdef, tx, donate=donate), tx.init(params), []
        for s in range(2):
            params, opt_state, metrics = step(params, opt_state, rest,
                                              *step_batch(stream, s, 1), jax.random.key(s))
            out.append(float(metrics["loss"]))
        return out

    undonated, donated_losses = two_steps(()), two_steps((0, 1))
    assert undonated[0] == donated_losses[0]
    if donated() == ():
        if undonated[1] == donated_losses[1]:  # seen on this workplace's machines, 2026-12-02
            pytest.skip("jaxlib's CPU donation fault does not reproduce on this processor (it "
                        "did where it was found); donating nothing there stays the safe choice")
    else:
        assert undonated == donated_losses


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_interrupt_then_resume_equals_unbroken(small_data, tmp_path, framework, signum):
    """SIGINT (Ctrl-C) or SIGTERM (a preemption notice) during step 3 ends the run after it
    with a checkpoint of it and Interrupted (exit code 128 + the signal); resuming replays
    steps 4.. bit for bit."""
    backend, stream = setup(small_data, framework)
    full = losses(loop.train(backend, stream, tmp_path / "full", log_every=1))

    backend, stream = setup(small_data, framework)
    step = backend.step

    def interrupt_after_third(index, x, y):
        metrics = step(index, x, y)
        if index == 2:
            os.kill(os.getpid(), signum)
        return metrics

    backend.step = interrupt_after_third
    with pytest.raises(Interrupted) as stopped:
        loop.train(backend, stream, tmp_path / "cut", log_every=2)
    assert stopped.value.exit_code == 128 + signum
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


def test_every_subcommand_runs_on_synthetic_tokens(tmp_path):
    """No dataset anywhere: train (both frameworks, with dropout), eval and generate on those
    runs, compare, parity and bench, each through the CLI (prepare makes data, so it is the
    one subcommand left out), one after another in one process (run_cli_many)."""
    tiny = ["--preset", "tiny", "--synthetic", "--steps", "2", "--batch-size", "4",
            "--eval-batches", "0", "--dropout", "0.1"]
    commands = []
    for framework in FRAMEWORKS:
        commands += [["train", *tiny, "--framework", framework, "--out", tmp_path / framework],
                     ["eval", "--run", tmp_path / framework, "--json"]]  # the run's batch size
    commands += [
        ["generate", "--run", tmp_path / "flax", "--max-new-tokens", "4"],
        ["compare", *tiny, "--out", tmp_path / "compare"],
        ["parity", "--preset", "tiny", "--train-steps", "2"],
        ["bench", "--preset", "tiny", "--batch-size", "2", "--warmup", "0", "--steps", "1",
         "--dropout", "0.1", "--attention", "explicit", "--variants",
         "flax-jit-fp32,flax-nnx-jit-fp32,torch-eager-fp32", "--json", tmp_path / "bench.json",
         "--plot", tmp_path / "bench.png"],
    ]
    *runs, gen, compare, parity, bench = run_cli_many(*commands)
    for framework, (result, ev) in zip(FRAMEWORKS, zip(runs[::2], runs[1::2])):
        assert result.returncode == 0, result.stderr
        assert "2 steps" in result.stdout and "val loss" in result.stdout
        # eval reads the run's own validation batches, in eval mode: the final evaluation's
        val = [json.loads(line) for line in (tmp_path / framework / runfolder.METRICS).read_text()
               .splitlines() if "val_loss" in line][-1]["val_loss"]
        assert ev.returncode == 0, ev.stderr
        loss = json.loads(ev.stdout)["loss"]
        if framework == "flax":  # the same jitted eval_loss on the same weights and batches
            assert loss == val
        else:
            assert abs(loss - val) <= LOSS_ATOL

    assert gen.returncode == 2 and len(gen.stderr.strip().splitlines()) == 1
    assert "synthetic tokens, which have no text: pass --data" in gen.stderr

    assert compare.returncode == 0, compare.stderr
    report = json.loads((tmp_path / "compare" / "report.json").read_text())
    assert [len(f["loss"]) for f in report["frameworks"].values()] == [2, 2]

    assert parity.returncode == 0, parity.stdout + parity.stderr

    assert bench.returncode == 0, bench.stderr
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r.get("skipped") for r in results] == [None] * 3  # a failing variant is "skipped"
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"  # one batch size's chart
