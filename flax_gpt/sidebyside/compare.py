"""`flax-gpt compare`: the Flax and the PyTorch trainer from one initialisation on identical
batches, and (optionally) PyTorch against itself from weights one ulp away, the noise floor
under the gap.
"""

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flax_gpt import experiments
from flax_gpt.core import loop
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.files import save_figure, write_json
from flax_gpt.sidebyside.pair import apply_precision, environment, nudged, random_weights
from flax_gpt.sidebyside.tolerances import (DIRECT, TRUTH_FLOOR_ULPS, TRUTH_RATIO, TRUTH_WINDOW,
                                            truth_floor, window_medians)

NUDGED = "torch-1ulp"
GAP_BAR = 1e-4  # the |loss diff| the report dates the first crossing of (issue 4's bar)
REPORT = "report.json"
PLOT = "loss.png"


@dataclass
class CompareResult:
    out: Path
    report: dict  # what REPORT_DIR/report.json holds

    @property
    def report_path(self):
        return self.out / REPORT

    @property
    def plot_path(self):
        return self.out / PLOT

    @property
    def passed(self):
        """True or False where the gap was judged (see `judge`), None where it was not."""
        return self.report["judgement"]["passed"]

    def to_dict(self):
        return self.report


def run(config, tc, *, out, data=None, synthetic=False, noise_floor=False, device="cpu",
        log_every=10, eval_every=100, eval_batches=20, mesh=None, log=None, nproc=1,
        fsdp=False):
    """Train Flax and PyTorch from one seeded init on identical batches; write
    `out`/report.json (per-step losses, differences, val losses, tokens/s, versions, device,
    precision) and `out`/loss.png. Returns a CompareResult. `mesh`: the Flax trainer's device
    mesh ("data=2,fsdp=2,tensor=2"), its rules sent to `log`. `nproc`: the PyTorch trainer
    on that many spawned ranks, DDP or with `fsdp` FSDP2 (torch_reference.distributed)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FlaxGPTError(f"report folder {out} already exists: choose another --out")
    loop.check_options(tc.steps, log_every=log_every, eval_every=eval_every,
                       eval_batches=eval_batches)
    device = experiments.torch_device(device)
    if nproc > 1 or fsdp:
        from torch_reference import distributed

        distributed.check(tc.batch_size, nproc, fsdp, torchrun=False)
    record = apply_precision(tc.precision)
    config, stream = experiments.make_stream(config, tc, data=data, synthetic=synthetic)
    for framework, place in (("flax", None), ("torch", device)):  # one after the other
        experiments.check_memory(config, tc.batch_size, f"training {framework}", training=True,
                                 attention=tc.attention, places=[(framework, place)])
    existed = out.exists()  # and is empty
    try:
        return _compare(config, tc, out, stream, record, noise_floor, device, log_every,
                        eval_every, eval_batches, mesh, log, nproc, fsdp)
    except BaseException:
        # no report, nothing to resume: what was written would only block the same command
        if existed:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _compare(config, tc, out, stream, record, noise_floor, device, log_every, eval_every,
             eval_batches, mesh, log, nproc, fsdp):
    tensors = random_weights(config, tc.seed)
    runs = [("flax", "flax", tensors), ("torch", "torch", tensors)]
    if noise_floor:
        runs.append((NUDGED, "torch", nudged(tensors)))
    results = {}
    for label, framework, init in runs:
        print(f"training {label} ...", file=sys.stderr)
        options = {"log_every": log_every, "eval_every": eval_every, "eval_batches": eval_batches}
        start = time.perf_counter()  # with the ranks' start-up, where there are ranks
        if framework == "torch" and nproc > 1:
            from torch_reference import distributed

            history = distributed.train(nproc, config, tc, stream, out / label, init,
                                        device=device, fsdp=fsdp, **options)
        else:
            on_mesh = mesh if framework == "flax" else None
            trainer = experiments.backend(framework, config, tc, init, device=device, mesh=on_mesh)
            if on_mesh is not None and log:
                for line in trainer.layout.lines:
                    log(line)
            start = time.perf_counter()  # from the built trainer
            history = loop.train(trainer, stream, out / label, **options)
        steps = [h for h in history if "loss" in h]
        results[label] = {
            "seconds": time.perf_counter() - start,
            "loss": [h["loss"] for h in steps],
            "tokens_per_s": float(np.median([h["tokens_per_s"] for h in steps[1:] or steps])),
            "val": [{"step": h["step"], "val_loss": h["val_loss"]} for h in history if "val_loss" in h],
        }
    losses = {label: np.asarray(r["loss"]) for label, r in results.items()}
    diff = np.abs(losses["flax"] - losses["torch"])
    unigram = unigram_loss(stream)
    report = {"config": config.to_dict(), "train": tc.to_dict(), "data": stream.reference,
              "unigram_baseline_loss": unigram, "steps": len(diff),
              "max_abs_loss_diff": float(diff.max()), "final_abs_loss_diff": float(diff[-1]),
              "gap_bar": GAP_BAR, "first_step_above": first_above(diff, GAP_BAR),
              "frameworks": results, "flax_mesh": None if mesh is None else str(mesh),
              "torch_ranks": nproc,
              "torch_sharding": ("fsdp" if fsdp else "ddp") if nproc > 1 else None,
              **environment(record, torch_device=device)}
    floor = None
    if noise_floor:
        floor = np.abs(losses["torch"] - losses[NUDGED])
        report["noise_floor"] = {
            "what": "|loss diff| of PyTorch against PyTorch from every weight moved one ulp",
            "loss_diff": floor.tolist(), "max_abs_loss_diff": float(floor.max()),
            "final_abs_loss_diff": float(floor[-1]),
            "first_step_above": first_above(floor, GAP_BAR)}
    report["judgement"] = judge(diff, floor, tc.precision, float(np.max(losses["torch"])),
                                record["matmul_dtype"])
    result = CompareResult(out, report)
    write_json(result.report_path, report)
    plot(result.plot_path, results, diff, unigram, floor)
    return result


def judge(diff, floor, precision, loss_scale, matmul_dtype):
    """Is the Flax-PyTorch gap what floating point allows? In float64: every step within the
    float64 parity tolerance. Otherwise, against the noise floor (PyTorch against itself from
    weights one ulp away): in every window of TRUTH_WINDOW steps, the median gap at most
    TRUTH_RATIO x the floor's median plus TRUTH_FLOOR_ULPS ulps of the loss. Without a noise
    floor a float32 run is not judged."""
    if precision == "float64":
        bound = DIRECT["float64"].train_loss
        return {"rule": f"every step's |flax - torch| <= {bound:g} (float64 parity)",
                "worst": float(diff.max()), "passed": bool(np.all(diff <= bound))}
    if floor is None:
        return {"rule": "none: pass --noise-floor to judge a float32 run", "passed": None}
    gap, noise = window_medians(diff), window_medians(floor)
    bounds = TRUTH_RATIO * noise + truth_floor(matmul_dtype, loss_scale)
    return {"rule": f"median |flax - torch| of each {TRUTH_WINDOW}-step window <= {TRUTH_RATIO:g} x "
                    f"that of |torch - torch one ulp away| + {TRUTH_FLOOR_ULPS} ulps of the loss",
            "window_gap": gap.tolist(), "window_noise_floor": noise.tolist(),
            "bounds": bounds.tolist(), "passed": bool(np.all(gap <= bounds))}


def first_above(diff, threshold):
    """1-based step of the first |loss diff| above threshold, or None."""
    above = (diff > threshold).nonzero()[0]
    return int(above[0]) + 1 if len(above) else None


def unigram_loss(stream):
    """Cross-entropy of the training split's unigram distribution on the validation split:
    the loss a model that ignores context would reach."""
    if not hasattr(stream, "dataset"):
        return float(np.log(stream.vocab_size))
    counts = np.bincount(stream.dataset.train, minlength=stream.vocab_size).astype(np.float64)
    p = (counts + 1) / (counts.sum() + stream.vocab_size)  # add-one: unseen ids stay finite
    return float(-np.mean(np.log(p[stream.dataset.val])))


def plot(path, results, diff, unigram, floor=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    steps = range(1, len(diff) + 1)
    for name, style in (("flax", "-"), ("torch", "--")):
        top.plot(steps, results[name]["loss"], style, label=f"{name} train")
        val = results[name]["val"]
        if val:
            top.plot([v["step"] for v in val], [v["val_loss"] for v in val], style, marker="o",
                     label=f"{name} val")
    top.axhline(unigram, color="gray", lw=0.8, ls=":", label="unigram baseline")
    top.set_ylabel("loss")
    top.legend()
    top.set_title("Flax vs PyTorch from one initialisation, identical batches")
    bottom.semilogy(steps, np.maximum(diff, 1e-9), color="C3", label="flax - torch")
    if floor is not None:
        bottom.semilogy(steps, np.maximum(floor, 1e-9), color="gray", lw=0.8,
                        label="torch - torch from one ulp away")
        bottom.legend()
    bottom.set_ylabel("|loss diff|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)
