"""`python tests/poisoned.py ARGS`: `flax-gpt ARGS` whose parameters all turn NaN right
after optimizer step POISON_STEP (0-based, an environment variable), that step's loss still
finite: the weights a diverging run leaves, at a chosen step (a huge --lr blows the loss up
first, and leaves no good checkpoint before it). POISON_RANK: only that PyTorch rank's
(a replica gone bad alone); default every rank's. SAVES_LOG: a file to which every call of
a backend's `save` (what writes a checkpoint's files, shards included) appends its folder.

The patches are made at import, so the ranks that `--nproc` spawns, which import this file
again as their main module, are patched too.
"""

import math
import os
import sys

from flax_gpt.cli import main

POISON_STEP = int(os.environ["POISON_STEP"])
POISON_RANK = os.environ.get("POISON_RANK")


def poisoned(step, poison):
    def patched(self, index, x, y):
        metrics = step(self, index, x, y)
        if index == POISON_STEP:
            poison(self)
        return metrics
    return patched


def logged(save):
    def patched(self, folder):
        with open(os.environ["SAVES_LOG"], "a", encoding="utf-8") as f:
            f.write(f"{folder.name}\n")
        return save(self, folder)
    return patched


def poison_flax(backend):
    import jax

    # a product keeps each global array's sharding, where a new array would not
    backend.params = jax.tree.map(lambda a: a * math.nan, backend.params)


def poison_torch(backend):
    import torch

    if POISON_RANK is not None and getattr(backend, "rank", 0) != int(POISON_RANK):
        return
    with torch.no_grad():
        for p in backend.model.parameters():  # under FSDP, each rank its own shards
            p.fill_(math.nan)


if "torch" in sys.argv:
    from torch_reference.distributed import FSDPBackend
    from torch_reference.train import TorchBackend

    TorchBackend.step = poisoned(TorchBackend.step, poison_torch)
    for cls in (TorchBackend, FSDPBackend):
        cls.save = logged(cls.save)
else:
    from flax_gpt.train import FlaxBackend

    FlaxBackend.step = poisoned(FlaxBackend.step, poison_flax)
    FlaxBackend.save = logged(FlaxBackend.save)

if __name__ == "__main__":
    sys.exit(main())
