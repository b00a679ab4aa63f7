"""Hold PyTorch data parallel (DDP, `--nproc 2` on gloo; FSDP2 with --fsdp) to one process.
Prints one JSON object: the worst per-step loss, validation loss and final parameter
differences, with the command, stack and commit (docs/devices.md's DDP and FSDP figures;
tests/test_ddp.py holds a short run to the same tolerances).

    python scripts/ddp_equivalence.py --out DIR [--fsdp]

Both runs train the tiny preset on the same synthetic global batches (batch 8, two
micro-batches) through flax_gpt.experiments.train, the library behind `flax-gpt train`.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, not an installed copy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="a new folder for the two run folders")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--fsdp", action="store_true", help="shard the ranks with FSDP2, not DDP")
    args = p.parse_args()

    import numpy as np

    from flax_gpt import experiments
    from flax_gpt.core import runfolder, weights
    from flax_gpt.core.config import GPTConfig
    from flax_gpt.core.hparams import TrainConfig
    from flax_gpt.sidebyside.pair import environment

    config = GPTConfig.preset("tiny")
    tc = TrainConfig(steps=args.steps, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=5)
    runs = {}
    label = "fsdp" if args.fsdp else "ddp"
    for name, nproc in (("one", 1), (label, args.nproc)):
        runs[name] = experiments.train("torch", config, tc, out=args.out / name, synthetic=True,
                                       nproc=nproc, fsdp=args.fsdp and nproc > 1, log_every=1,
                                       eval_every=10, eval_batches=4)
    one, ddp = runs["one"], runs[label]
    _, a = weights.load(args.out / "one" / runfolder.WEIGHTS)
    _, b = weights.load(args.out / label / runfolder.WEIGHTS)
    print(json.dumps({
        "nproc": args.nproc, "sharding": label,
        "config": config.to_dict(), "train": tc.to_dict(),
        "max_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(one.steps, ddp.steps)),
        "max_val_loss_diff": max(abs(x["val_loss"] - y["val_loss"])
                                 for x, y in zip(one.evals, ddp.evals)),
        "max_param_diff": max(float(np.abs(a[k] - b[k]).max()) for k in a),
        "steps": len(ddp.steps), "evaluations": len(ddp.evals), **environment({})}))


if __name__ == "__main__":
    main()
