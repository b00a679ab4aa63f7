"""Reproduce the buffer-donation fault that made flax_gpt.train donate nothing on CPU.

Two AdamW steps with gradient clipping on the `small` preset, the jitted step compiled with
and without donated parameters and optimizer state; PyTorch gives the reference losses.
Run from the repository root: PYTHONPATH=. python scripts/donation_bug.py   (prints the
step-1 loss of each; ~1 minute on 2 cores). Without PYTHONPATH, Python puts scripts/ first on
sys.path and imports whichever flax_gpt is installed, not this checkout's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_gpt.core.streams import synthetic_batch
from flax_gpt.sidebyside import pair, parity
from flax_gpt.core.config import GPTConfig
from flax_gpt.train import make_train_step, optimizer
from torch_reference.train import TrainStep


def main():
    pair.apply_precision("highest")
    config = GPTConfig.preset("small", vocab_size=2048)
    tensors = pair.random_weights(config)
    batches = [synthetic_batch(config.vocab_size, 4, config.seq_len, i, ignored_row=True) for i in range(2)]
    batches = [(x[None], y[None]) for x, y in batches]
    tc = parity.default_train_config().replace(steps=2, grad_clip=1.0)
    for donate in ((), (0, 1)):
        fm, tm = pair.build_pair(config, tensors)
        graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
        tx = optimizer(tc)
        opt_state = tx.init(params)
        step = make_train_step(graphdef, tx, donate=donate)
        losses = []
        for i, (x, y) in enumerate(batches):
            params, opt_state, metrics = step(params, opt_state, rest, jnp.asarray(x),
                                              jnp.asarray(y), jax.random.key(0))
            losses.append(float(metrics["loss"]))
        torch_step = TrainStep(tm, tc)
        reference = [float(torch_step(i, torch.from_numpy(x).long(), torch.from_numpy(y).long())["loss"])
                     for i, (x, y) in enumerate(batches)]
        print(f"donate_argnums={donate}: flax losses {np.round(losses, 6)}, "
              f"torch {np.round(reference, 6)}, step-1 diff {abs(losses[1] - reference[1]):.2e}")


if __name__ == "__main__":
    main()
