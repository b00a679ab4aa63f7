"""Is a growing Flax/PyTorch loss gap a bug, or float32 chaos? Train PyTorch twice on the
same batches, the second time with ONE weight moved by one ulp, and print how far the two
loss curves drift apart. If they drift like Flax and PyTorch do, the frameworks are not the
cause: the training dynamics amplify any rounding difference.

Run: python scripts/chaos_check.py --data DIR [--preset small] [--steps 200] [--out FILE.json]
"""

import argparse
import json

import numpy as np

from flax_gpt import loop, parity, precision
from flax_gpt.config import GPTConfig
from flax_gpt.data import TokenDataset
from flax_gpt.hparams import TrainConfig
from torch_reference.train import TorchBackend


def losses(tensors, config, tc, stream):
    backend = TorchBackend(config, tc, tensors)
    out = []
    for step in range(tc.steps):
        x, y = loop.step_batch(stream, step, tc.grad_accum)
        out.append(float(backend.step(step, x, y)["loss"]))
    return np.asarray(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out")
    args = p.parse_args()
    precision.apply("highest", frameworks=("torch",))
    dataset = TokenDataset.load(args.data)
    config = GPTConfig.preset(args.preset, vocab_size=dataset.vocab_size)
    tc = TrainConfig(steps=args.steps)
    stream = loop.DatasetStream(dataset, tc.batch_size, config.seq_len, tc.seed)
    tensors = parity.random_weights(config, tc.seed)
    nudged = dict(tensors)
    w = nudged["decoder.layers.0.ffn.fc1.weight"].copy()
    w[0, 0] = np.nextafter(w[0, 0], np.float32(np.inf))
    nudged["decoder.layers.0.ffn.fc1.weight"] = w
    gap = np.abs(losses(tensors, config, tc, stream) - losses(nudged, config, tc, stream))
    checkpoints = [s for s in (1, 10, 20, 30, 40, 50, 75, 100, 150, 200, 250, 300) if s <= tc.steps]
    for s in checkpoints:
        print(f"step {s:4d}: |loss gap| {gap[s - 1]:.3e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config.to_dict(), "train": tc.to_dict(), "gap": gap.tolist()}, f)


if __name__ == "__main__":
    main()
