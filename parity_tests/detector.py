"""The parity verdict measured as an instrument: how often it cries wolf on correct code, and
which planted bugs it catches, and where.

- `false_alarms`: `flax_gpt.sidebyside.parity.run` over a grid of presets, precisions,
  seeds, random and real tokens, explicit and fused attention, and equivalent rewrites
  (REWRITES: one framework computing the same function another way). Every run must pass.
- the planted-bug catalogue, which uses `Patch` and `patched` from here, is
  parity_tests/mutations.py.

A patch lasts for one run: `patched` sets attributes and puts them back, and clears JAX's
compilation caches on the way in and out (a jitted function keyed on a model's graphdef
would otherwise keep the unpatched code). Command line: python -m parity_tests.detector
--help.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import torch

from flax_gpt import model as flax_model
from flax_gpt.core.config import GPTConfig
from flax_gpt.sidebyside import parity
from torch_reference import model as torch_model


@dataclass(frozen=True)
class Patch:
    """One change to one framework's code, applied by `apply(setattr)`."""

    name: str
    framework: str  # "flax", "torch" or "core" (shared by both)
    description: str
    apply: object  # callable(setattr) -> None
    attention: str = "explicit"  # the attention path the patched code is on ("any": both)


@contextlib.contextmanager
def patched(patch, *, retrace=True):
    """`patch` in force for the block, then everything it set put back. With `retrace`, JAX's
    caches are cleared on the way in and out (a jitted function keyed on a graphdef would
    keep the unpatched code); a patch of PyTorch or numpy code alone needs none, and keeping
    every compiled function is what keeps a catalogue of such patches fast."""
    if patch is None:
        yield
        return
    saved = []

    def setattr_(owner, name, value):
        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    if retrace:
        jax.clear_caches()
    try:
        patch.apply(setattr_)
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        if retrace:
            jax.clear_caches()


_MISSING = object()


# ---- equivalent rewrites: the same function computed another way; each must pass ----------

def _flax_scale_by_reciprocal(set_):
    def masked_softmax(self, q, k, v, mask):  # scores * (1 / sqrt(dk)): another rounding
        dk = q.shape[3]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, dk)
        scores = q @ k.swapaxes(-2, -1) * (1 / math.sqrt(dk))  # (B, H, Tq, Tk)
        scores = jnp.where(mask, scores, flax_model.MASK_FILL)
        probs = jax.nn.softmax(scores.astype(flax_model.at_least_float32(scores.dtype)), axis=-1)
        return (self.attn_dropout(probs.astype(v.dtype)) @ v).transpose(0, 2, 1, 3)

    set_(flax_model.MaskedMultiHeadAttention, "masked_softmax", masked_softmax)


def _torch_scale_queries_first(set_):
    def masked_softmax(self, q, k, v, mask):  # (q / sqrt(dk)) @ k^T: the scale before the matmul
        dk = q.shape[3]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, dk)
        scores = (q / math.sqrt(dk)) @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
        scores = scores.masked_fill(~mask, torch_model.MASK_FILL)
        return (self.attn_dropout(torch.softmax(scores, dim=-1)) @ v).transpose(1, 2)

    set_(torch_model.MaskedMultiHeadAttention, "masked_softmax", masked_softmax)


def _torch_split_sum_fc2(set_):
    def forward(self, x):  # fc2 as two half-width matmuls added: another summation order
        h = torch.relu(self.fc1(x))
        half = h.shape[-1] // 2
        w = self.fc2.weight
        y = h[..., :half] @ w[:, :half].T + h[..., half:] @ w[:, half:].T + self.fc2.bias
        return self.dropout(y)

    set_(torch_model.FeedForward, "forward", forward)


def _flax_loss_by_log_softmax(set_):
    def cross_entropy(logits, labels):  # mean of -log_softmax picked: another formula
        logits = logits.reshape(-1, logits.shape[-1]).astype(flax_model.at_least_float32(logits.dtype))
        labels = labels.reshape(-1)
        keep = labels != flax_model.IGNORE_INDEX
        logp = jax.nn.log_softmax(logits, axis=-1)  # (B*T, V)
        picked = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
        return -jnp.sum(jnp.where(keep, picked, 0.0)) / jnp.sum(keep)

    _set_flax_loss(set_, cross_entropy)


def _set_flax_loss(set_, cross_entropy):
    """cross_entropy where every Flax caller looks it up (imported by name)."""
    from flax_gpt import train as flax_train

    for module in (flax_model, flax_train):
        set_(module, "cross_entropy", cross_entropy)


REWRITES = [
    Patch("flax: scores * (1 / sqrt(dk))", "flax", "the attention scale as a product with the reciprocal",
          _flax_scale_by_reciprocal),
    Patch("torch: (q / sqrt(dk)) @ k^T", "torch", "the scale applied to the queries before the matmul",
          _torch_scale_queries_first),
    Patch("torch: fc2 as two half sums", "torch", "fc2's contraction split in two and added",
          _torch_split_sum_fc2, attention="any"),
    Patch("flax: loss from log_softmax", "flax", "cross-entropy as -log_softmax picked, not logsumexp - picked",
          _flax_loss_by_log_softmax, attention="any"),
]


# ---- the false-alarm sweep -------------------------------------------------------------------

@dataclass
class Run:
    """One parity run of a sweep or a catalogue, and what it said."""

    preset: str
    precision: str
    seed: int
    data: str  # "random" or "real"
    attention: str
    patch: str | None
    passed: bool
    failed: list
    inconclusive: list
    divergence: dict
    seconds: float


@dataclass
class SweepResult:
    """Every run of a false-alarm sweep; `false_alarms`: the runs on correct code that failed."""

    runs: list = field(default_factory=list)
    command: str = ""

    @property
    def false_alarms(self):
        return [r for r in self.runs if not r.passed]

    def to_dict(self):
        return {"command": self.command, "runs": [dataclasses.asdict(r) for r in self.runs],
                "total": len(self.runs), "false_alarms": len(self.false_alarms),
                "with_inconclusive_rows": sum(bool(r.inconclusive) for r in self.runs)}


def parity_run(config_name, config, precision, seed, data, attention, patch=None, *,
               train_steps, batch_size=4, progress=None):
    """parity.run with `patch` in force; a Run."""
    start = time.perf_counter()
    with patched(patch):
        r = parity.run(config, data=data, precision=precision, attention=attention, seed=seed,
                       train_steps=train_steps, batch_size=batch_size,
                       progress=progress or (lambda *_: None))
    return Run(config_name, precision, seed, "real" if data else "random", attention,
               patch and patch.name, r.passed, r.failed, r.inconclusive, r.divergence,
               time.perf_counter() - start)


def false_alarms(configs, *, precisions, seeds, datasets, attentions, rewrites=REWRITES,
                 rewrite_configs=None, train_steps=20, batch_size=4, log=print):
    """Run parity on correct code over the grid configs x precisions x seeds x datasets
    (None: random tokens; a dataset folder: real ones) x attentions, then each rewrite over
    `rewrite_configs` (a dict like `configs`; default: the first config; pick one whose
    sqrt(head_dim) is not a power of two, or the scale rewrites change no bit) x precisions
    x seeds x datasets, on the attention path it touches. `train_steps`: AdamW steps of
    every run, or a dict of them by config name. Returns a SweepResult."""
    rewrite_configs = rewrite_configs or dict(list(configs.items())[:1])
    grid = [(name, configs[name], p, s, d, a, None) for name, p, s, d, a in
            itertools.product(configs, precisions, seeds, datasets, attentions)]
    for patch in rewrites:
        on = attentions if patch.attention == "any" else [patch.attention]
        grid += [(name, rewrite_configs[name], p, s, d, a, patch) for name, p, s, d, a in
                 itertools.product(rewrite_configs, precisions, seeds, datasets, on)]
    result = SweepResult()
    for i, (name, config, precision, seed, data, attention, patch) in enumerate(grid):
        steps = train_steps[name] if isinstance(train_steps, dict) else train_steps
        run = parity_run(name, config, precision, seed, data, attention, patch,
                         train_steps=steps, batch_size=batch_size)
        result.runs.append(run)
        log(f"[{i + 1}/{len(grid)}] {name} {precision} seed {seed} {run.data} {attention}"
            f"{' + ' + patch.name if patch else ''}, {steps} steps: "
            f"{'pass' if run.passed else 'FALSE ALARM: ' + ', '.join(run.failed)}"
            f"{' (inconclusive: ' + ', '.join(run.inconclusive) + ')' if run.inconclusive else ''}"
            f" in {run.seconds:.1f} s")
    return result


# ---- the command -----------------------------------------------------------------------------

# The full sweep's grid: every preset, at a context and a number of AdamW steps that the
# 2-core CPU runs in minutes (gpt2-124m: forward and backward only), and for the rewrites
# a config whose sqrt(head_dim) = sqrt(12) is not a power of two (every preset's is).
FULL_CONFIGS = {
    "tiny": (GPTConfig.preset("tiny"), 20),
    "small": (GPTConfig.preset("small"), 10),
    "gpt2-124m@32": (GPTConfig.preset("gpt2-124m", seq_len=32), 0),
}
REWRITE_CONFIG = ("d36-3heads", GPTConfig(vocab_size=97, seq_len=12, d_model=36, n_heads=3,
                                          n_layers=2, d_ff=50), 20)


def main(argv=None):
    from flax_gpt.core.precision import PRECISIONS

    p = argparse.ArgumentParser(prog="python -m parity_tests.detector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("false-alarms", help="parity on correct code over a grid: every run must pass")
    s.add_argument("--configs", nargs="+", choices=list(FULL_CONFIGS), default=list(FULL_CONFIGS))
    s.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--data", type=Path, help="a prepared dataset folder: real tokens beside random ones")
    s.add_argument("--attentions", nargs="+", choices=["explicit", "fused"], default=["explicit", "fused"])
    s.add_argument("--rewrite-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the rewrites' runs (default 0)")
    s.add_argument("--no-rewrites", action="store_true", help="the grid alone")
    s.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch's intra-op threads (1 on a machine shared with other work: "
                        "its spinning threads slow every step there)")
    s.add_argument("--json", type=Path, required=True, help="where the result goes")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    command = "python -m parity_tests.detector " + " ".join(argv if argv is not None else sys.argv[1:])
    datasets = [None] + ([str(args.data)] if args.data else [])
    name, config, rewrite_steps = REWRITE_CONFIG
    steps = {n: FULL_CONFIGS[n][1] for n in args.configs} | {name: rewrite_steps}
    grid = dict(precisions=args.precisions, datasets=datasets, attentions=args.attentions,
                train_steps=steps)
    result = false_alarms({n: FULL_CONFIGS[n][0] for n in args.configs}, seeds=args.seeds,
                          rewrites=[], **grid)
    if not args.no_rewrites:
        result.runs += false_alarms({}, seeds=args.rewrite_seeds, rewrite_configs={name: config},
                                    **grid).runs
    result.command = command
    from flax_gpt.core.files import write_json
    from flax_gpt.sidebyside.pair import environment

    write_json(args.json, {**environment({}), **result.to_dict()})  # the command as typed
    print(f"{len(result.runs)} runs, {len(result.false_alarms)} false alarms")
    return 1 if result.false_alarms else 0


if __name__ == "__main__":
    sys.exit(main())
