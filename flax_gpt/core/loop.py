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

from flax_gpt.core.config import check_number
from flax_gpt.core.errors import DivergedError, Interrupted, NonFiniteError
from flax_gpt.core.runfolder import (METRICS, check_unfinished, latest_checkpoint,
                                     load_checkpoint, open_run, save_checkpoint)
from flax_gpt.core.streams import check_stream, step_batch

PROGRESS_INTERVAL = 10.0  # seconds between plain progress lines (a log, not a terminal)


def mean_loss(eval_loss, batches):
    """(mean of `eval_loss(x, y)` over `batches`, its perplexity, the number of batches)."""
    losses = [eval_loss(x, y) for x, y in batches]
    loss = float(np.mean(losses))
    return loss, math.exp(min(loss, 700.0)), len(losses)


def evaluate(backend, stream, n_batches):
    """Mean validation loss over `n_batches` (0: all) and its perplexity."""
    loss, ppl, _ = mean_loss(backend.eval_loss, stream.eval_batches(n_batches))
    return {"val_loss": loss, "val_ppl": ppl}


def check_options(steps, *, log_every=10, eval_every=0, eval_batches=20, checkpoint_every=0,
                  keep=3, stop_at=None):
    """Refuse a loop setting out of range (ConfigError), before anything is built."""
    check_number("log_every", log_every, low=1, integer=True)
    check_number("eval_every", eval_every, low=0, integer=True)
    check_number("eval_batches", eval_batches, low=0, integer=True)
    check_number("checkpoint_every", checkpoint_every, low=0, integer=True)
    check_number("keep", keep, low=1, integer=True)
    if stop_at is not None:
        check_number("stop_at", stop_at, low=1, high=steps, integer=True)


class LocalStop:
    """When a run on one process stops for a signal: at the step boundary after SIGINT or
    SIGTERM arrived. A run on several processes votes instead (torch_reference.distributed's
    RankStop, flax_gpt.mesh's JobStop), so that every process stops at the same step."""

    signals = (signal.SIGINT, signal.SIGTERM)  # what the loop hands to `received`

    def __init__(self):
        self.signum = 0

    def received(self, signum):
        self.signum = self.signum or signum

    def agreed(self, step):
        """(signal number, where it came from: "sent to rank 1", or None) once the run stops
        after `step`, else None. Called after every step, on every process."""
        return (self.signum, None) if self.signum else None


def train(backend, stream, run, *, resume=False, log_every=10, eval_every=0, eval_batches=20,
          checkpoint_every=0, keep=3, progress=None, writer=None, stop_at=None, primary=True,
          stop=None):
    """Train `backend` on `stream` to `backend.tc.steps` (or to `stop_at` of that schedule),
    writing the run folder.

    Returns the per-step records (step, loss, lr, grad_norm, ...) and evaluations. SIGINT
    (Ctrl-C) or SIGTERM (a scheduler's preemption notice) finishes the step under way, saves
    a checkpoint of it and raises errors.Interrupted; on several processes, a signal to any
    one stops them all at the same step, as `stop` (default LocalStop()) agrees. A loss,
    gradient norm or checkpoint's weights that are not finite stop the run with
    DivergedError (every process of a run on several alike), keeping the last good
    checkpoint. `progress`: see Progress (None: a bar on a terminal, else plain lines).
    `writer`: an optional metrics sink with `add_scalar(tag, value, step)` and `close()`
    (TensorBoard's SummaryWriter), which the loop closes.

    `primary=False`: another process of a run on several (torch_reference.distributed, or
    a JAX job, see flax_gpt.experiments.train). It steps, logs and evaluates in step with
    the primary, so that every collective is met, and writes no run folder, metrics or
    progress; into checkpoints only its own shards, where its backend holds some.
    """
    tc = backend.tc
    check_options(tc.steps, log_every=log_every, eval_every=eval_every, eval_batches=eval_batches,
                  checkpoint_every=checkpoint_every, keep=keep, stop_at=stop_at)
    check_stream(stream, backend.config)
    stop = stop or LocalStop()
    if not primary:  # the primary owns (locks, cleans, checks) the folder; this rank only reads
        return _train(backend, stream, run, latest_checkpoint(run) if resume else None,
                      log_every, eval_every, eval_batches, checkpoint_every, keep, "off", None,
                      stop_at, stop, primary=False)
    try:
        with open_run(run, backend, stream, resume=resume, stop_at=stop_at) as resume_from:
            return _train(backend, stream, run, resume_from, log_every, eval_every, eval_batches,
                          checkpoint_every, keep, progress, writer, stop_at, stop)
    finally:
        if writer:
            writer.close()


def _train(backend, stream, run, resume_from, log_every, eval_every, eval_batches,
           checkpoint_every, keep, progress, writer, stop_at, stop, primary=True):
    tc = backend.tc
    start = load_checkpoint(resume_from, backend) if resume_from else 0
    check_unfinished(run, start, tc.steps, stop_at)  # the step its state.json says
    end = min(tc.steps, stop_at) if stop_at else tc.steps
    tokens_per_step = tc.batch_size * tc.grad_accum * stream.seq_len
    shown = Progress(end, start=start, mode=progress)
    history, pending = [], []
    t0 = last_log = time.perf_counter()
    last_step = start
    saved = start if resume_from else None  # the last good checkpoint's step

    def diverged(step, what):
        kept = (f"its last good checkpoint, step {saved}, is kept in {run}" if saved is not None
                else "no checkpoint was written before it, so nothing is kept")
        return DivergedError(f"step {step}: {what}, so training diverged and stopped; {kept}. "
                             f"Lower --lr (or keep --grad-clip on) and train again")

    def flush(step):
        """The one host sync: fetch the metrics of the steps since the last log."""
        nonlocal pending, last_log, last_step
        if not pending:
            return
        now = time.perf_counter()
        rate = tokens_per_step * (step - last_step) / max(now - last_log, 1e-9)
        fetched, pending = pending, []
        for s, metrics in fetched:
            values = backend.fetch(metrics)
            bad = [f"the {k} is {values[k]}" for k in ("loss", "grad_norm")
                   if k in values and not math.isfinite(values[k])]
            if bad:
                raise diverged(s + 1, " and ".join(bad))
            record = {"step": s + 1, **values, "lr": backend.lr(s), "tokens_per_s": rate,
                      "elapsed": now - t0}
            history.append(record)
            _log(metrics_file, writer, record)
        last_log, last_step = now, step
        shown.update(step, loss=history[-1]["loss"], tokens_per_s=rate)

    def checkpoint(step):
        nonlocal saved
        try:
            save_checkpoint(run, backend, step, keep, primary=primary)
        except NonFiniteError as e:  # the weights went bad in a step whose loss was still finite
            raise diverged(step, f"the weights hold NaN or Inf ({e})") from None
        saved = step

    step, agreed = start, None
    metrics_file = open(Path(run) / METRICS, "a", encoding="utf-8") if primary else None
    try:
        with signals_to(stop):
            while step < end:
                x, y = step_batch(stream, step, tc.grad_accum)
                pending.append((step, backend.step(step, x, y)))
                step += 1
                agreed = stop.agreed(step) if step < end else None
                due_eval = eval_every and (step % eval_every == 0 or step == end)
                due_checkpoint = bool(agreed) or (checkpoint_every and step % checkpoint_every == 0
                                                  and step < end)
                if step % log_every == 0 or step == end or due_eval or due_checkpoint:
                    flush(step)
                if due_eval:
                    record = {"step": step, **evaluate(backend, stream, eval_batches),
                              "elapsed": time.perf_counter() - t0}
                    history.append(record)
                    _log(metrics_file, writer, record)
                    shown.note(f"step {step}: val loss {record['val_loss']:.4f} "
                               f"(perplexity {record['val_ppl']:.1f})")
                if due_checkpoint:
                    checkpoint(step)
                if agreed:
                    break
            flush(step)
            if saved != step:
                checkpoint(step)
        shown.close()
        if agreed:
            signum, who = agreed
            if primary:
                print(f"interrupted by {signal.Signals(signum).name}" +
                      (f" ({who})" if who else "") + f" after step {step}: saved a "
                      f"checkpoint of it in {run}; continue with --resume", file=sys.stderr)
            raise Interrupted(signum)
    finally:
        if metrics_file:
            metrics_file.close()
        shown.close()
    return history


class Progress:
    """What a user sees of a long job on stderr: a tqdm bar on a terminal, plain lines
    (done/total, the given figures, elapsed, ETA) every PROGRESS_INTERVAL seconds and at the
    end otherwise, so that a piped or logged run shows progress and no bar frames.

    mode: None (choose by whether stderr is a terminal), "bar", "lines" or "off".
    """

    def __init__(self, total, *, start=0, mode=None, unit="step", interval=PROGRESS_INTERVAL):
        if mode is None:
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.total, self.start, self.unit, self.interval, self.mode = total, start, unit, interval, mode
        self.t0, self.printed = time.perf_counter(), None
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit=unit, dynamic_ncols=True)

    def update(self, done, **figures):
        """`done` of `total` finished; `figures` (name -> number) shown beside."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix({k.replace("tokens_per_s", "tok/s"):
                                  f"{v:,.0f}" if k.endswith("_per_s") else f"{v:.4f}"
                                  for k, v in figures.items()})
            return
        now = time.perf_counter()
        if self.mode != "lines" or (self.printed is not None and now - self.printed < self.interval
                                    and done < self.total):
            return
        self.printed = now
        elapsed = now - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        shown = ", ".join(_figure(k, v) for k, v in figures.items())
        print(f"{self.unit} {done}/{self.total}" + (f", {shown}" if shown else "") +
              f", elapsed {_duration(elapsed)}" + (f", ETA {_duration(eta)}" if eta is not None
                                                   and done < self.total else ""),
              file=sys.stderr, flush=True)

    def note(self, text):
        """A line of its own (an evaluation, a stage), without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode == "lines":
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _figure(name, v):
    """'loss 4.1234', or '2,051 tokens/s' for a rate named tokens_per_s."""
    if name.endswith("_per_s"):
        return f"{v:,.0f} {name.removesuffix('_per_s')}/s"
    return f"{name} {v:,.0f}" if abs(v) >= 1000 else f"{name} {v:.4f}"


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@contextlib.contextmanager
def signals_to(stop):
    """`stop.signals` go to `stop.received` for the block (while training: so that a signal
    only marks the step under way as the last, and a step is never cut in half); the old
    handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, _: stop.received(signum)) for s in stop.signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _log(metrics_file, writer, record):
    if metrics_file is None:  # not the primary rank
        return
    metrics_file.write(json.dumps(record, sort_keys=True) + "\n")
    metrics_file.flush()
    if writer:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])
