"""The `flax-gpt` command line. Each subcommand imports its heavy modules only when it runs."""

import argparse
import json
import sys
import time
from pathlib import Path

from flax_gpt.errors import FlaxGPTError

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
    p.set_defaults(run=run_prepare)


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

def add_model_options(p, *, preset_default="tiny"):
    """--preset plus config overrides, shared by every command that builds a model."""
    from flax_gpt.config import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=preset_default,
                   help=f"model size (default {preset_default})")
    for field in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
        p.add_argument(f"--{field.replace('_', '-')}", type=_positive_int, default=None,
                       metavar="N", help=f"override the preset's {field}")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")


def model_config(args, **fixed):
    from flax_gpt.config import GPTConfig

    fields = ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff", "dropout")
    overrides = {f: getattr(args, f) for f in fields}
    overrides.update({k: v for k, v in fixed.items() if v is not None})
    return GPTConfig.preset(args.preset, **overrides)


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
    p.set_defaults(run=run_parity)


def run_parity(args):
    from flax_gpt import precision, weights

    record = precision.apply(args.precision)
    from flax_gpt import parity

    if args.weights:
        config, tensors = weights.load(args.weights)
    else:
        config = None
    dataset = load_dataset(args.data) if args.data else None
    if config is None:
        config = model_config(args, vocab_size=dataset.vocab_size if dataset else None)
        tensors = parity.random_weights(config, args.seed)
    elif dataset and dataset.vocab_size != config.vocab_size:
        raise FlaxGPTError(f"--data has {dataset.vocab_size} tokens but the weights' vocabulary "
                           f"is {config.vocab_size}: use the dataset they were trained on")
    seq_len = config.seq_len
    batches = parity_batches(config, dataset, args.batch_size, seq_len,
                             max(args.train_steps, 1), args.seed)
    fm, tm = parity.build_pair(config, tensors, args.precision)
    x, y = batches[0]
    rows = parity.compare_forward(fm, tm, x[0], y[0], args.precision)
    if args.train_steps:
        tc = parity.default_train_config(args.precision).replace(
            steps=args.train_steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr)
        rows += parity.compare_training(config, tensors, batches[:args.train_steps], tc)
    print_table(["quantity", "max abs diff", "max rel diff", "tolerance", "pass"],
                [[r.quantity, f"{r.max_abs:.3e}", f"{r.max_rel:.3e}",
                  "-" if r.tolerance is None else f"{r.tolerance:.0e}",
                  "-" if r.passed is None else ("yes" if r.passed else "NO")] for r in rows])
    failed = [r.quantity for r in rows if r.passed is False]
    env = parity.environment(record)
    print(f"config {config.to_json()}")
    print(f"precision {args.precision} on {env['jax_device']} (jax) / {env['torch_device']} (torch)"
          f": {'all within tolerance' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if args.json:
        import dataclasses

        write_json(args.json, {"config": config.to_dict(), "batch_size": args.batch_size,
                               "train_steps": args.train_steps, "data": str(args.data or "random"),
                               "rows": [dataclasses.asdict(r) for r in rows],
                               "passed": not failed, **env})
    return 1 if failed else 0


def parity_batches(config, dataset, batch_size, seq_len, n, seed):
    """n batches of shape (1, B, T): from the dataset (shuffled rows) or random tokens."""
    from flax_gpt import parity

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
    from flax_gpt.data import TokenDataset

    return TokenDataset.load(path)


def print_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path, payload):
    from flax_gpt.fileutil import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    print(f"wrote {path}")


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


COMMANDS = [add_prepare, add_parity]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FlaxGPTError as e:
        print(f"flax-gpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"flax-gpt {args.command}: interrupted", file=sys.stderr)
        return 130
