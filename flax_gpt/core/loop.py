"""The training loop both frameworks run, the run folder and its checkpoints. Framework-free:
a *backend* (flax_gpt.train.FlaxBackend, torch_reference.train.TorchBackend) does the math.

A run folder:

    config.json           model config, train config, framework, dataset reference
    metrics.jsonl         one JSON object a line: train steps (loss, lr, grad_norm, tokens/s,
                          elapsed) and evaluations (val_loss, val_ppl)
    checkpoints/step_N/   weights.safetensors (canonical: flax_gpt.load / torch_reference.load),
                          optimizer state, state.json (step, checksums); the last K are kept
    weights.safetensors   the latest weights, for `flax_gpt.load(RUN / "weights.safetensors")`

A checkpoint folder is written under a temporary name and renamed, so a crash leaves the
previous one intact. The batch of step s is a pure function of (seed, s) and dropout is
reseeded from (seed, s), so resuming from step s replays exactly what an unbroken run does.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from flax_gpt.core.data import make_batch
from flax_gpt.core.errors import CheckpointError, DatasetError
from flax_gpt.core.files import atomic_dir, atomic_file

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
WEIGHTS = "weights.safetensors"


# ---- data streams ------------------------------------------------------------------------------

class DatasetStream:
    """Batches of a prepared dataset addressed by global micro-batch index: reshuffled each
    epoch from (seed, epoch), so index k always gives the same batch."""

    def __init__(self, dataset, batch_size, seq_len, seed):
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.per_epoch = dataset.num_batches("train", batch_size, seq_len)
        self.reference = {"path": str(dataset.path), "manifest_sha256": manifest_sha256(dataset)}
        self.vocab_size = dataset.vocab_size

    def batch(self, k):
        epoch, index = divmod(k, self.per_epoch)
        return next(self.dataset.batches("train", self.batch_size, self.seq_len, shuffle=True,
                                         seed=self.seed, epoch=epoch, start=index))

    def eval_batches(self, n):
        """Up to n validation batches in order (all of them when n is 0)."""
        batches = self.dataset.batches("val", self.batch_size, self.seq_len)
        return [b for i, b in zip(range(n or 10**9), batches)]


class SyntheticStream:
    """Uniform random tokens: for benchmarks and machines without a prepared dataset."""

    def __init__(self, vocab_size, batch_size, seq_len, seed):
        self.vocab_size, self.batch_size, self.seq_len, self.seed = vocab_size, batch_size, seq_len, seed
        self.reference = {"synthetic": True, "vocab_size": vocab_size}

    def batch(self, k):
        rng = np.random.default_rng([self.seed, k])
        return make_batch(rng.integers(0, self.vocab_size, (self.batch_size, self.seq_len)))

    def eval_batches(self, n):
        return [self.batch(-1 - i) for i in range(n or 8)]


def manifest_sha256(dataset):
    return hashlib.sha256(json.dumps(dataset.manifest, sort_keys=True).encode()).hexdigest()


def step_batch(stream, step, grad_accum):
    """int32 (grad_accum, B, T) inputs and labels of optimizer step `step`."""
    parts = [stream.batch(step * grad_accum + i) for i in range(grad_accum)]
    return np.stack([x for x, _ in parts]), np.stack([y for _, y in parts])


# ---- the run folder ------------------------------------------------------------------------------

def run_record(backend, stream):
    return {"framework": backend.name, "model": backend.config.to_dict(),
            "train": backend.tc.to_dict(), "data": stream.reference}


def open_run(run, backend, stream, *, resume):
    """Create `run`, or check that resuming it continues the same experiment. Returns the
    checkpoint folder to resume from, or None."""
    run = Path(run)
    record = run_record(backend, stream)
    if not resume:
        if run.exists() and any(run.iterdir()):
            raise CheckpointError(f"run folder {run} already exists: pass --resume to continue it "
                                  f"or choose another --out")
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / CONFIG, record)
        return None
    try:
        saved = json.loads((run / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{run} has no readable {CONFIG}: it is not a run folder") from None
    for key, what in (("framework", "framework"), ("model", "model config"),
                      ("data", "dataset")):
        if saved[key] != record[key]:
            raise CheckpointError(f"cannot resume {run}: its {what} was {json.dumps(saved[key])}, "
                                  f"this run asks for {json.dumps(record[key])}")
    unchanged = {k: v for k, v in saved["train"].items() if k != "steps"}
    if unchanged != {k: v for k, v in record["train"].items() if k != "steps"}:
        raise CheckpointError(f"cannot resume {run}: training settings differ from the saved "
                              f"{json.dumps(saved['train'])} (only --steps may change)")
    return latest_checkpoint(run)


def latest_checkpoint(run):
    folders = sorted((Path(run) / CHECKPOINTS).glob("step_*"))
    if not folders:
        raise CheckpointError(f"{run} has no checkpoint to resume from")
    return folders[-1]


def save_checkpoint(run, backend, step, keep):
    run = Path(run)
    folder = run / CHECKPOINTS / f"step_{step:08d}"
    with atomic_dir(folder, force=True) as tmp:
        backend.save(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        write_json(tmp / STATE, {"step": step, "framework": backend.name, "files": files},
                   announce=False)
    with atomic_file(run / WEIGHTS) as f:
        f.write((folder / WEIGHTS).read_bytes())
    for old in sorted((run / CHECKPOINTS).glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def load_checkpoint(folder, backend):
    """Verify every file of a checkpoint against its checksum, then restore; returns the step."""
    try:
        state = json.loads((folder / STATE).read_text())
        for name, digest in state["files"].items():
            if _sha256(folder / name) != digest:
                raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its "
                                      f"checksum; delete the folder to resume from the one before")
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt ({e}); delete it to "
                              f"resume from the one before") from None
    backend.load(folder)
    return state["step"]


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path, payload, announce=False):
    with atomic_file(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    if announce:
        print(f"wrote {path}")


# ---- the loop ------------------------------------------------------------------------------------

def evaluate(backend, stream, n_batches):
    """Mean validation loss over `n_batches` (0: all) and its perplexity."""
    losses = [backend.eval_loss(x, y) for x, y in stream.eval_batches(n_batches)]
    loss = float(np.mean(losses))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def train(backend, stream, run, *, resume=False, log_every=10, eval_every=0, eval_batches=20,
          checkpoint_every=0, keep=3, progress=None, tensorboard=False, stop_at=None):
    """Train `backend` on `stream` to `backend.tc.steps` (or to `stop_at` of that schedule),
    writing the run folder.

    Returns the per-step records (step, loss, lr, grad_norm, ...) and evaluations. Ctrl-C
    finishes the step under way, saves a checkpoint and raises KeyboardInterrupt.
    """
    tc = backend.tc
    resume_from = open_run(run, backend, stream, resume=resume)
    start = load_checkpoint(resume_from, backend) if resume_from else 0
    end = min(tc.steps, stop_at) if stop_at else tc.steps
    if start >= end:
        raise CheckpointError(f"{run} is already at step {start}: pass a larger --steps to go on")
    tokens_per_step = tc.batch_size * tc.grad_accum * stream.seq_len
    progress = sys.stderr.isatty() if progress is None else progress
    writer = _tensorboard(run) if tensorboard else None
    bar = _bar(start, end, progress)
    history, pending = [], []
    t0 = last_log = time.perf_counter()
    last_step = start
    metrics_file = open(Path(run) / METRICS, "a", encoding="utf-8")

    def flush(step):
        """The one host sync: fetch the metrics of the steps since the last log."""
        nonlocal pending, last_log, last_step
        now = time.perf_counter()
        rate = tokens_per_step * (step - last_step) / max(now - last_log, 1e-9)
        for s, metrics in pending:
            record = {"step": s + 1, **backend.fetch(metrics), "lr": backend.lr(s),
                      "tokens_per_s": rate, "elapsed": now - t0}
            history.append(record)
            _log(metrics_file, writer, record)
        pending, last_log, last_step = [], now, step
        bar.update(step - bar.n)
        if history:
            bar.set_postfix(loss=f"{history[-1].get('loss', float('nan')):.4f}", tok_s=f"{rate:,.0f}")

    step = start
    try:
        with _deferred_interrupt() as interrupted:
            while step < end and not interrupted():
                x, y = step_batch(stream, step, tc.grad_accum)
                pending.append((step, backend.step(step, x, y)))
                step += 1
                due_eval = eval_every and (step % eval_every == 0 or step == end)
                if step % log_every == 0 or step == end or due_eval:
                    flush(step)
                if due_eval:
                    record = {"step": step, **evaluate(backend, stream, eval_batches),
                              "elapsed": time.perf_counter() - t0}
                    history.append(record)
                    _log(metrics_file, writer, record)
                if checkpoint_every and step % checkpoint_every == 0 and step < end:
                    save_checkpoint(run, backend, step, keep)
            flush(step)
            save_checkpoint(run, backend, step, keep)
            if step < end:
                print(f"interrupted: saved a checkpoint at step {step} in {run}; continue with "
                      f"--resume", file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        metrics_file.close()
        bar.close()
        if writer:
            writer.close()
    return history


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C sets a flag that the loop reads between steps, so a step is never cut in half."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(True))
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


def _log(metrics_file, writer, record):
    metrics_file.write(json.dumps(record, sort_keys=True) + "\n")
    metrics_file.flush()
    if writer:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])


def _bar(start, total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", disable=not enabled, dynamic_ncols=True)


def _tensorboard(run):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CheckpointError("--tensorboard needs the tensorboard package: "
                              "pip install 'flax-gpt[tensorboard]'") from None
    return SummaryWriter(os.fspath(Path(run) / "tensorboard"))


def check_stream(stream, config):
    if stream.vocab_size != config.vocab_size:
        raise DatasetError(f"the data has a vocabulary of {stream.vocab_size} but the model "
                           f"{config.vocab_size}")
    if stream.seq_len > config.seq_len:
        raise DatasetError(f"batches of {stream.seq_len} tokens exceed the model's seq_len "
                           f"{config.seq_len}")
