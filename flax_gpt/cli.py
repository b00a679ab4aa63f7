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


COMMANDS = [add_prepare]


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
