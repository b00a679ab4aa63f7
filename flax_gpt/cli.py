"""The `flax-gpt` command line. Each subcommand imports its heavy modules only when it runs."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from flax_gpt.core.errors import FlaxGPTError

EXIT_USAGE = 2


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---- prepare -------------------------------------------------------------------------

def add_prepare(sub):
    p = sub.add_parser(
        "prepare", help="tokenize text with torchtext and write a dataset folder",
        description="Tokenize text with torchtext's basic_english, build the vocabulary on the "
                    "training split (specials <unk> <bos> <eos> = 0 1 2), and write a dataset "
                    "folder: vocab.txt, train.npy, val.npy and manifest.json. The same input "
                    "and options give byte-identical output.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", action="append", type=Path, metavar="PATH",
                        help="a UTF-8 text file (repeat for several, read in order)")
    source.add_argument("--corpus", choices=["tinyshakespeare"],
                        help="a public corpus, downloaded once into the cache and sha256-verified")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to write")
    p.add_argument("--min-freq", type=int, default=1, help="drop words seen fewer times (default 1)")
    p.add_argument("--max-vocab", type=int, default=None,
                   help="largest vocabulary, specials included (default: no limit)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of lines, taken from the end, for validation (default 0.1)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="bytes that are not UTF-8: refuse with their offset (default) or read "
                        "them as U+FFFD")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=run_prepare)


def run_prepare(args):
    from flax_gpt import prepare

    start = time.perf_counter()
    if args.corpus:
        sources = [(args.corpus, prepare.fetch_corpus(args.corpus))]
    else:
        sources = [(path.name, prepare.read_text_file(path)) for path in args.text_file]
    manifest = prepare.prepare(
        sources, args.out, min_freq=args.min_freq, max_vocab=args.max_vocab,
        val_fraction=args.val_fraction, errors=args.errors, force=args.force)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    counts = manifest["counts"]
    size = sum(f.stat().st_size for f in args.out.iterdir())
    mb = sum(s["bytes"] for s in manifest["sources"]) / 1e6
    print(f"prepared {args.out} in {seconds:.2f} s from {mb:.2f} MB of text: "
          f"vocabulary {counts['vocab_size']:,}, train {counts['train_tokens']:,} tokens "
          f"({counts['train_lines']:,} lines), val {counts['val_tokens']:,} tokens "
          f"({counts['val_lines']:,} lines), ids {manifest['dtype']}, {size / 1e6:.2f} MB on disk")
    return 0


# ---- parity ----------------------------------------------------------------------------

def add_model_options(p, *, preset_default="tiny", attention_default="explicit"):
    """--preset plus config overrides, shared by every command that builds a model."""
    from flax_gpt.core.config import ATTENTIONS, PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=preset_default,
                   help=f"model size (default {preset_default})")
    for field in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
        p.add_argument(f"--{field.replace('_', '-')}", type=_positive_int, default=None,
                       metavar="N", help=f"override the preset's {field}")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--attention", choices=ATTENTIONS, default=attention_default,
                   help="explicit: SPEC.md's masked softmax, written out; fused: the same function "
                        "as jax.nn.dot_product_attention / F.scaled_dot_product_attention (cuDNN "
                        f"and flash kernels on a GPU; needs dropout 0) (default {attention_default})")


def model_config(args, **fixed):
    from flax_gpt.core.config import GPTConfig, fused_attention

    fields = ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff", "dropout")
    overrides = {f: getattr(args, f) for f in fields}
    overrides.update({k: v for k, v in fixed.items() if v is not None})
    config = GPTConfig.preset(args.preset, **overrides)
    fused_attention(args.attention, config)  # refuse fused with dropout before any work
    return config


def add_parity(sub):
    from flax_gpt.precision import PRECISIONS

    p = sub.add_parser(
        "parity", help="compare Flax and PyTorch from one set of weights",
        description="Load one set of weights into both frameworks and compare, on the same "
                    "batch: every layer's output, the logits, the loss and every gradient; then "
                    "train both with AdamW on the same batches and compare each step's loss and "
                    "the final parameters. Prints a table; exit 1 if a tolerance fails.")
    add_model_options(p)
    p.add_argument("--weights", type=Path, help="a canonical weights file (default: a fresh "
                   "PyTorch initialisation of --preset, seeded)")
    p.add_argument("--data", type=Path, help="a prepared dataset folder for real batches "
                   "(default: random tokens)")
    p.add_argument("--precision", choices=PRECISIONS, default="highest",
                   help="highest: float32 tolerances; default: each framework's default (TF32 "
                        "for JAX on GPU); bf16: loss diff, KL divergence and top-1 agreement")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--train-steps", type=int, default=50, help="AdamW steps to compare (0: none)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the AdamW run "
                   "(default 1e-3, warmup 5 steps then cosine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    p.set_defaults(handler=run_parity)


def run_parity(args):
    from flax_gpt import precision
    from flax_gpt.core import weights

    record = precision.apply(args.precision)  # before the frameworks build anything
    from flax_gpt.sidebyside import parity

    dataset = load_dataset(args.data) if args.data else None
    if args.weights:
        config, tensors = weights.load(args.weights)
        if dataset and dataset.vocab_size != config.vocab_size:
            raise FlaxGPTError(f"--data has {dataset.vocab_size} tokens but the weights' "
                               f"vocabulary is {config.vocab_size}: use the dataset they were "
                               f"trained on")
    else:
        config = model_config(args, vocab_size=dataset.vocab_size if dataset else None)
        tensors = parity.random_weights(config, args.seed)
    batches = parity_batches(config, dataset, args.batch_size, config.seq_len,
                             max(args.train_steps, 1), args.seed)
    fm, tm = parity.build_pair(config, tensors, args.precision, args.attention)
    x, y = batches[0]
    rows = parity.compare_forward(fm, tm, x[0], y[0], args.precision)
    if args.train_steps:
        tc = parity.default_train_config(args.precision, args.attention).replace(
            steps=args.train_steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr)
        rows += parity.compare_training(config, tensors, batches[:args.train_steps], tc)
    print_table(["quantity", "max abs diff", "max rel diff", "tolerance", "pass"],
                [[r.quantity, f"{r.max_abs:.3e}", f"{r.max_rel:.3e}",
                  "-" if r.tolerance is None else f"{r.tolerance:.0e}",
                  "-" if r.passed is None else ("yes" if r.passed else "NO")] for r in rows])
    failed = [r.quantity for r in rows if r.passed is False]
    env = parity.environment(record)
    print(f"config {config.to_json()}, attention {args.attention}")
    print(f"precision {args.precision} on {env['jax_device']} (jax) / {env['torch_device']} (torch)"
          f": {'all within tolerance' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if args.json:
        import dataclasses

        write_json(args.json, {"config": config.to_dict(), "attention": args.attention,
                               "batch_size": args.batch_size,
                               "train_steps": args.train_steps, "data": str(args.data or "random"),
                               "rows": [dataclasses.asdict(r) for r in rows],
                               "passed": not failed, **env})
    return 1 if failed else 0


def parity_batches(config, dataset, batch_size, seq_len, n, seed):
    """n batches of shape (1, B, T): from the dataset (shuffled rows) or random tokens."""
    from flax_gpt.sidebyside import parity

    if dataset is None:
        return [tuple(a[None] for a in parity.synthetic_batch(config, batch_size, seq_len, seed + i))
                for i in range(n)]
    out, epoch = [], 0
    while len(out) < n:
        out += [(x[None], y[None]) for x, y in
                dataset.batches("train", batch_size, seq_len, shuffle=True, seed=seed, epoch=epoch)]
        epoch += 1
    return out[:n]


def load_dataset(path):
    from flax_gpt.core.data import TokenDataset

    return TokenDataset.load(path)


def print_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path, payload, *, announce=True):
    from flax_gpt.core.files import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    if announce:
        print(f"wrote {path}")


# ---- train / compare / eval / generate -----------------------------------------------------

def add_train_options(p):
    from flax_gpt.core.hparams import TrainConfig
    from flax_gpt.precision import PRECISIONS

    d = TrainConfig()
    add_model_options(p, preset_default="small")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", type=Path, help="a prepared dataset folder (default: "
                      "tinyshakespeare, downloaded and prepared once into the cache)")
    data.add_argument("--synthetic", action="store_true",
                      help="uniform random tokens (vocabulary from the preset) instead of text")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum,
                   help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"default {d.warmup_steps}")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help=f"cosine floor as a share of --lr (default {d.min_lr_ratio})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"global-norm clip, 0 for none (default {d.grad_clip})")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, init and dropout")
    p.add_argument("--precision", choices=PRECISIONS, default="highest",
                   help="highest: float32; default: framework defaults; bf16: bf16 matmuls")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (0: at the end)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (0: all)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="host sync and log every N steps")
    p.add_argument("--device", default="cpu", help="PyTorch device (cpu, cuda)")


def train_config(args):
    from flax_gpt.core.hparams import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                       precision=args.precision, attention=args.attention)


def default_dataset():
    """tinyshakespeare, prepared once into the cache (downloaded on first use)."""
    from flax_gpt import prepare

    folder = prepare.cache_dir() / "datasets" / "tinyshakespeare"
    if not (folder / "manifest.json").is_file():
        print(f"preparing tinyshakespeare into {folder}", file=sys.stderr)
        prepare.prepare([("tinyshakespeare", prepare.fetch_corpus("tinyshakespeare"))], folder,
                        force=True)
    return folder


def make_stream(args):
    """(model config, batch stream) for the train and compare commands."""
    from flax_gpt.core import loop

    tc = train_config(args)
    if args.synthetic:
        config = model_config(args)
        return config, tc, loop.SyntheticStream(config.vocab_size, tc.batch_size, config.seq_len, tc.seed)
    dataset = load_dataset(args.data or default_dataset())
    config = model_config(args, vocab_size=dataset.vocab_size)
    return config, tc, loop.DatasetStream(dataset, tc.batch_size, config.seq_len, tc.seed)


def make_backend(framework, config, tc, tensors=None, device="cpu"):
    if framework == "flax":
        from flax_gpt.train import FlaxBackend

        return FlaxBackend(config, tc, tensors)
    from torch_reference.train import TorchBackend

    return TorchBackend(config, tc, tensors, device=device)


def add_train(sub):
    p = sub.add_parser(
        "train", help="train a model with the Flax or the PyTorch trainer",
        description="Train with AdamW (linear warmup, cosine decay, global-norm clipping, "
                    "gradient accumulation). Writes RUN/metrics.jsonl, checkpoints (the last "
                    "--keep) and RUN/weights.safetensors. Ctrl-C saves a checkpoint; --resume "
                    "continues exactly where it stopped.")
    p.add_argument("--framework", choices=["flax", "torch"], default="flax")
    p.add_argument("--out", type=Path, required=True, help="the run folder")
    add_train_options(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps "
                   "(always at the end and on Ctrl-C)")
    p.add_argument("--keep", type=_positive_int, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--stop-at", type=_positive_int, default=None,
                   help="stop after step N of the --steps schedule (checkpointed; --resume goes on)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    p.set_defaults(handler=run_train)


def run_train(args):
    from flax_gpt import precision
    from flax_gpt.core import loop

    precision.apply(args.precision)
    config, tc, stream = make_stream(args)
    loop.check_stream(stream, config)
    backend = make_backend(args.framework, config, tc, device=args.device)
    start = time.perf_counter()
    try:
        history = loop.train(backend, stream, args.out, resume=args.resume,
                             log_every=args.log_every, eval_every=args.eval_every,
                             eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
                             keep=args.keep, tensorboard=args.tensorboard, stop_at=args.stop_at)
    except KeyboardInterrupt:
        return 130
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "val_loss" in h]
    print(f"{args.framework}: {len(steps)} steps in {time.perf_counter() - start:.1f} s, "
          f"final train loss {steps[-1]['loss']:.4f}, "
          f"{steps[-1]['tokens_per_s']:,.0f} tokens/s" +
          (f", val loss {evals[-1]['val_loss']:.4f} (perplexity {evals[-1]['val_ppl']:.1f})"
           if evals else "") + f"; run folder {args.out}")
    return 0


def add_compare(sub):
    p = sub.add_parser(
        "compare", help="train both frameworks from one init on identical batches",
        description="Initialise once, train the Flax and the PyTorch trainer on identical "
                    "batches, and write REPORT_DIR/report.json (per-step losses of both, "
                    "differences, val losses, tokens/s, versions, device, precision) and "
                    "REPORT_DIR/loss.png; prints a summary.")
    p.add_argument("--out", type=Path, required=True, help="the report folder")
    add_train_options(p)
    p.add_argument("--noise-floor", action="store_true",
                   help="also train PyTorch a second time from the same weights moved one ulp, "
                        "and report how far float32 rounding alone takes one framework from "
                        "itself: the floor under the Flax-PyTorch gap")
    p.set_defaults(handler=run_compare)


def run_compare(args):
    import numpy as np

    from flax_gpt import precision
    from flax_gpt.sidebyside import parity
    from flax_gpt.core import loop

    record = precision.apply(args.precision)
    config, tc, stream = make_stream(args)
    loop.check_stream(stream, config)
    if args.out.exists() and any(args.out.iterdir()):
        raise FlaxGPTError(f"report folder {args.out} already exists: choose another --out")
    tensors = parity.random_weights(config, tc.seed)
    runs = [("flax", "flax", tensors), ("torch", "torch", tensors)]
    if args.noise_floor:
        runs.append((NUDGED, "torch", parity.nudged(tensors)))
    results = {}
    for label, framework, init in runs:
        print(f"training {label} ...", file=sys.stderr)
        backend = make_backend(framework, config, tc, init, device=args.device)
        start = time.perf_counter()
        history = loop.train(backend, stream, args.out / label, log_every=args.log_every,
                             eval_every=args.eval_every, eval_batches=args.eval_batches)
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
              "frameworks": results, **parity.environment(record)}
    floor = None
    if args.noise_floor:
        floor = np.abs(losses["torch"] - losses[NUDGED])
        report["noise_floor"] = {
            "what": "|loss diff| of PyTorch against PyTorch from every weight moved one ulp",
            "loss_diff": floor.tolist(), "max_abs_loss_diff": float(floor.max()),
            "final_abs_loss_diff": float(floor[-1]),
            "first_step_above": first_above(floor, GAP_BAR)}
    loop.write_json(args.out / "report.json", report)
    plot_compare(args.out / "loss.png", results, diff, unigram, floor)
    rows = [[label, f"{r['loss'][-1]:.5f}",
             f"{r['val'][-1]['val_loss']:.5f}" if r["val"] else "-",
             f"{r['tokens_per_s']:,.0f}", f"{r['seconds']:.1f}"] for label, r in results.items()]
    print_table(["run", "final train loss", "final val loss", "tokens/s", "seconds"], rows)
    print(f"max |loss diff| flax-torch over {len(diff)} steps: {diff.max():.3e} (final {diff[-1]:.3e})"
          + (f"; torch-torch from one ulp away: {floor.max():.3e} (final {floor[-1]:.3e})"
             if floor is not None else "")
          + f"; unigram baseline {unigram:.4f}; wrote {args.out / 'report.json'} and "
          f"{args.out / 'loss.png'}")
    return 0


NUDGED = "torch-1ulp"
GAP_BAR = 1e-4  # the |loss diff| the report dates the first crossing of (issue 4's bar)


def first_above(diff, threshold):
    """1-based step of the first |loss diff| above threshold, or None."""
    above = (diff > threshold).nonzero()[0]
    return int(above[0]) + 1 if len(above) else None


def unigram_loss(stream):
    """Cross-entropy of the training split's unigram distribution on the validation split:
    the loss a model that ignores context would reach."""
    import numpy as np

    if not hasattr(stream, "dataset"):
        return float(np.log(stream.vocab_size))
    counts = np.bincount(stream.dataset.train, minlength=stream.vocab_size).astype(np.float64)
    p = (counts + 1) / (counts.sum() + stream.vocab_size)  # add-one: unseen ids stay finite
    return float(-np.mean(np.log(p[stream.dataset.val])))


def plot_compare(path, results, diff, unigram, floor=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
    from flax_gpt.core.files import save_figure

    save_figure(fig, path)


def run_folder_model(run, framework="flax"):
    """(model, run record) of a run folder's latest weights."""
    from flax_gpt.core import loop

    run = Path(run)
    try:
        record = json.loads((run / loop.CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        raise FlaxGPTError(f"{run} is not a run folder (no readable {loop.CONFIG})") from None
    if framework == "flax":
        import flax_gpt

        return flax_gpt.load(run / loop.WEIGHTS), record
    import torch_reference

    return torch_reference.load(run / loop.WEIGHTS), record


def run_dataset(args, record):
    if args.data:
        return load_dataset(args.data)
    if record["data"].get("synthetic"):
        raise FlaxGPTError("this run trained on synthetic tokens: pass --data for text")
    return load_dataset(record["data"]["path"])


def add_eval(sub):
    p = sub.add_parser("eval", help="loss and perplexity of a run's weights on a split",
                       description="Mean cross-entropy and perplexity of RUN's latest weights "
                                   "over every batch of a split (Flax).")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, help="dataset folder (default: the run's)")
    p.add_argument("--split", choices=["train", "val"], default="val")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_eval)


def run_eval(args):
    import math

    import numpy as np

    from flax_gpt import precision

    precision.apply("highest", frameworks=("jax",))
    from flax import nnx

    from flax_gpt.train import eval_loss

    model, record = run_folder_model(args.run)
    dataset = run_dataset(args, record)
    if dataset.vocab_size != model.config.vocab_size:
        raise FlaxGPTError(f"--data has {dataset.vocab_size} tokens, the model {model.config.vocab_size}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    losses = [float(eval_loss(graphdef, params, rest, x, y)) for x, y in
              dataset.batches(args.split, args.batch_size, model.config.seq_len)]
    loss = float(np.mean(losses))
    result = {"run": str(args.run), "split": args.split, "batches": len(losses),
              "loss": loss, "perplexity": math.exp(loss)}
    print(json.dumps(result) if args.json else
          f"{args.split}: loss {loss:.4f}, perplexity {math.exp(loss):.2f} over {len(losses)} batches")
    return 0


def add_generate(sub):
    p = sub.add_parser("generate", help="sample text from a run's weights",
                       description="Sample from RUN's latest weights with a jitted step of fixed "
                                   "shape. The same --seed gives the same text.")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, help="dataset folder for the vocabulary (default: the run's)")
    p.add_argument("--prompt", default="", help="text to continue (basic_english tokens)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_generate)


def run_generate(args):
    from flax_gpt.core.data import BOS
    from flax_gpt.sample import generate

    if args.temperature < 0:
        raise FlaxGPTError(f"--temperature must be >= 0, got {args.temperature}")
    model, record = run_folder_model(args.run)
    dataset = run_dataset(args, record)
    unknown = dataset.unknown_words(args.prompt)
    if unknown:
        print(f"warning: not in the vocabulary, read as <unk>: {' '.join(unknown)}", file=sys.stderr)
    prompt = [BOS, *dataset.encode(args.prompt)]
    ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed)
    text = dataset.decode(ids[1:]).replace(" <eos> <bos> ", "\n").replace("<eos> <bos>", "\n")
    print(text)
    return 0


# ---- bench ------------------------------------------------------------------------------------

def add_bench(sub):
    from flax_gpt.sidebyside.bench import VARIANTS

    p = sub.add_parser(
        "bench", help="time the train step of every variant side by side",
        description="Time the real train step (forward, backward, AdamW) of Flax jax.jit fp32 "
                    "and bf16, Flax nnx.jit, PyTorch eager fp32 and bf16 autocast, and "
                    "torch.compile fp32 and bf16, on one config and batch of synthetic tokens. "
                    "Reports compile time, median/p10/p90 step time, tokens/s, MFU, peak memory "
                    "and the last loss. On CPU the MFU peak is a matmul measured on the spot.")
    # fused by default: each framework at its fastest (cuDNN / flash kernels on a GPU); the
    # parity suite holds fused to the explicit softmax
    add_model_options(p, preset_default="small", attention_default="fused")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--skip", default="", help="comma-separated variants to leave out")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps after compile (default 10)")
    p.add_argument("--steps", type=_positive_int, default=20,
                   help="timed steps of each variant per round (default 20)")
    p.add_argument("--rounds", type=_positive_int, default=1,
                   help="rounds of --steps steps, the variants taking turns within each, so that "
                        "a machine whose speed drifts slows them all alike (default 1)")
    p.add_argument("--no-pad-vocab", action="store_true",
                   help="keep the vocabulary as is (default: round it up to a multiple of 64)")
    p.add_argument("--sweep", metavar="batch_size=A,B,...", help="repeat for several batch sizes")
    p.add_argument("--device", default=None, help="PyTorch device (default: cuda if available)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG chart")
    p.set_defaults(handler=run_bench)


def run_bench(args):
    # JAX would otherwise take 75% of a GPU up front, leaving PyTorch's variants a quarter
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from flax_gpt.sidebyside import bench

    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    unknown = sorted((set(chosen) | skip) - set(bench.VARIANTS))
    if unknown:
        raise FlaxGPTError(f"unknown variant(s) {', '.join(unknown)}: choose from "
                           f"{', '.join(bench.VARIANTS)}")
    variants = [v for v in dict.fromkeys(chosen) if v not in skip]  # each once, in order
    sizes = [args.batch_size]
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        try:
            sizes = [int(v) for v in values.split(",")]
        except ValueError:
            sizes = []
        if key != "batch_size" or not sizes or min(sizes) < 1:
            raise FlaxGPTError(f"--sweep takes batch_size=A,B,... with positive integers, got {args.sweep!r}")
    config = model_config(args)
    if not args.no_pad_vocab:
        config = config.replace(vocab_size=bench.pad_vocab(config.vocab_size))
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    reports = []

    def save(partial=None):  # after every round: a run stopped part-way keeps what it measured
        if args.json:
            done = reports + [partial] if partial else reports
            final = partial is None and len(done) == len(sizes)
            write_json(args.json, done[0] if len(sizes) == 1 else
                       {"sweep": done, "batch_sizes": sizes, "complete": final}, announce=final)

    for size in sizes:
        print(f"batch {size} x {config.seq_len}, config {config.to_json()}", file=sys.stderr)
        report = bench.bench(config, batch_size=size, variants=variants, warmup=args.warmup,
                             steps=args.steps, rounds=args.rounds, device=device,
                             attention=args.attention, on_round=save)
        reports.append(report)
        rows = []
        for r in report["results"]:
            if "skipped" in r:
                rows.append([r["variant"], "skipped: " + r["skipped"], "", "", "", "", "", "", "", ""])
                continue
            mem = r["peak_memory_bytes"]
            rows.append([r["variant"], f"{r['compile_s']:.1f}", f"{1e3 * r['median_s']:.1f}",
                         f"{1e3 * r['p10_s']:.1f}", f"{1e3 * r['p90_s']:.1f}",
                         f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x",
                         "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                         "-" if mem is None else f"{mem / 2**30:.2f}", f"{r['loss']:.4f}"])
        print_table(["variant", "compile s", "median ms", "p10 ms", "p90 ms", "tokens/s",
                     f"speed / {report['speedup_of']}", "MFU", "peak GiB", "last loss"], rows)
        print(f"FLOPs/token {report['flops_per_token']:,} (causal {report['flops_per_token_causal']:,});"
              f" N = {report['matmul_params']:,} matmul parameters: {report['flops_note']}. "
              f"Device {report['device']}.")
        save()
    if args.plot:
        bench.plot(args.plot, reports)
        print(f"wrote {args.plot}")
    return 0


# ---- entry point ---------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="flax-gpt",
        description="A GPT-style model in JAX/Flax with a PyTorch twin that shares its weights. "
                    "Run 'flax-gpt COMMAND --help' for each command's options.")
    from flax_gpt import __version__

    parser.add_argument("--version", action="version", version=f"flax-gpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [add_prepare, add_parity, add_train, add_compare, add_eval, add_generate, add_bench]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FlaxGPTError as e:
        print(f"flax-gpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"flax-gpt {args.command}: interrupted", file=sys.stderr)
        return 130
