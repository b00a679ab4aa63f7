"""Compile time of the jitted Flax train step against gradient accumulation.

    PYTHONPATH=. python scripts/compile_times.py --preset tiny 1 4 16

The step sums micro-batch gradients in a `lax.scan`, so its compile time should barely grow
with grad_accum. To compare with the unrolled step it replaced (one forward and backward per
micro-batch in the graph, before commit e104f77), run this file from a checkout of e2c4274
(`git worktree add /tmp/unrolled e2c4274; cd /tmp/unrolled; PYTHONPATH=. python
<this checkout>/scripts/compile_times.py ...`): it passes grad_accum to a step that takes it.
"""

import argparse
import inspect
import time

import jax
import jax.numpy as jnp
from flax import nnx

from flax_gpt.core.config import PRESETS, GPTConfig
from flax_gpt.core.hparams import TrainConfig
from flax_gpt.model import GPT
from flax_gpt.train import make_train_step, optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("grad_accum", type=int, nargs="+", help="micro-batches per step")
    args = parser.parse_args()
    config = GPTConfig.preset(args.preset)
    unrolled = "grad_accum" in inspect.signature(make_train_step).parameters
    for k in args.grad_accum:
        model = GPT(config, rngs=nnx.Rngs(0))
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optimizer(TrainConfig(steps=2, batch_size=4, grad_accum=k))
        step = make_train_step(graphdef, tx, **({"grad_accum": k} if unrolled else {}))
        x = jnp.zeros((k, 4, config.seq_len), jnp.int32)  # (grad_accum, B, T)
        start = time.perf_counter()
        step.lower(params, tx.init(params), rest, x, x, jax.random.key(0)).compile()
        print(f"{'unrolled' if unrolled else 'scan'} step, {args.preset}, grad_accum {k}: "
              f"compiled in {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
