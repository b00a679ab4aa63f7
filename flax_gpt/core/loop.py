"""The training loop both frameworks run. Framework-free: a *backend*
(flax_gpt.train.FlaxBackend, torch_reference.train.TorchBackend) does the math, a stream
(flax_gpt.core.streams) gives the batches, and flax_gpt.core.runfolder keeps the files.

The batch of step s is a pure function of (seed, s) and dropout is reseeded from (seed, s),
so resuming from step s replays exactly what an unbroken run does.
"""

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from flax_gpt.core.errors import CheckpointError
from flax_gpt.core.runfolder import (METRICS, latest_checkpoint, load_checkpoint, open_run,
                                     save_checkpoint)
from flax_gpt.core.streams import step_batch



def mean_loss(eval_loss, batches):
    """(mean of `eval_loss(x, y)` over `batches`, its perplexity, the number of batches)."""
    losses = [eval_loss(x, y) for x, y in batches]
    loss = float(np.mean(losses))
    return loss, math.exp(min(loss, 700.0)), len(losses)


def evaluate(backend, stream, n_batches):
    """Mean validation loss over `n_batches` (0: all) and its perplexity."""
    loss, ppl, _ = mean_loss(backend.eval_loss, stream.eval_batches(n_batches))
    return {"val_loss": loss, "val_ppl": ppl}


def train(backend, stream, run, *, resume=False, log_every=10, eval_every=0, eval_batches=20,
          checkpoint_every=0, keep=3, progress=None, writer=None, stop_at=None, primary=True):
    """Train `backend` on `stream` to `backend.tc.steps` (or to `stop_at` of that schedule),
    writing the run folder.

    Returns the per-step records (step, loss, lr, grad_norm, ...) and evaluations. Ctrl-C
    finishes the step under way, saves a checkpoint and raises KeyboardInterrupt. `writer`:
    an optional metrics sink with `add_scalar(tag, value, step)` and `close()` (TensorBoard's
    SummaryWriter), which the loop closes.

    `primary=False`: another rank of a data-parallel run (torch_reference.distributed). It
    steps, logs and evaluates in step with the primary, so that every collective is met, and
    writes nothing: no run folder, metrics or checkpoints.
    """
    tc = backend.tc
    if primary:
        resume_from = open_run(run, backend, stream, resume=resume)
    else:
        resume_from = latest_checkpoint(run) if resume else None
        progress, writer = False, None
    start = load_checkpoint(resume_from, backend) if resume_from else 0
    end = min(tc.steps, stop_at) if stop_at else tc.steps
    if start >= end:
        raise CheckpointError(f"{run} is already at step {start}: pass a larger --steps to go on")
    tokens_per_step = tc.batch_size * tc.grad_accum * stream.seq_len
    progress = sys.stderr.isatty() if progress is None else progress
    bar = _bar(start, end, progress)
    history, pending = [], []
    t0 = last_log = time.perf_counter()
    last_step = start
    metrics_file = open(Path(run) / METRICS, "a", encoding="utf-8") if primary else None

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
                if primary and checkpoint_every and step % checkpoint_every == 0 and step < end:
                    save_checkpoint(run, backend, step, keep)
            flush(step)
            if primary:
                save_checkpoint(run, backend, step, keep)
            if step < end:
                if primary:
                    print(f"interrupted: saved a checkpoint at step {step} in {run}; continue "
                          f"with --resume", file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        if metrics_file:
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
    if metrics_file is None:
        return
    metrics_file.write(json.dumps(record, sort_keys=True) + "\n")
    metrics_file.flush()
    if writer:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])


def _bar(start, total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", disable=not enabled, dynamic_ncols=True)
