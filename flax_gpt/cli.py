"""The `flax-gpt` command line: parsing and printing only. Each subcommand calls one library
function (flax_gpt.experiments or flax_gpt.sidebyside) and prints its result; heavy modules
are imported only by the subcommand that runs.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from flax_gpt.core.errors import FlaxGPTError, Interrupted

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other refusal (argparse's own
    prints the usage block first)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _refuse_together(args, flag, others, why):
    """Refuse `flag` with any of `others` (argument names) given: the one would silently
    override the other."""
    # False is "not given" for a store_true flag, but a model field's --no-tie-embeddings
    given = [f"--{o.replace('_', '-')}" for o in others
             if getattr(args, o, None) is not None
             and (getattr(args, o) is not False or o in MODEL_FIELDS)]
    if given:
        raise FlaxGPTError(f"{', '.join(given)} cannot be used with {flag}: {why}")


def _check_output(path, what):
    """Refuse an output file that cannot be written before the work, not after it."""
    if path:
        from flax_gpt.core.files import check_writable

        check_writable(path, what)


def print_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path, payload):
    from flax_gpt.core.files import write_json as write

    write(path, payload)
    print(f"wrote {path}")


# ---- prepare -------------------------------------------------------------------------

def add_prepare(sub):
    from flax_gpt.prepare import IMPLEMENTATIONS, TOKENIZERS

    p = sub.add_parser(
        "prepare", help="tokenize text (basic_english or GPT-2's BPE) and write a dataset folder",
        description="Tokenize text with torchtext's basic_english, build the vocabulary on the "
                    "training split (specials <unk> <bos> <eos> = 0 1 2), and write a dataset "
                    "folder: vocab.txt, train.npy, val.npy and manifest.json. With --tokenizer "
                    "gpt2: GPT-2's byte-level BPE and fixed vocabulary of 50,257 (torchtext's "
                    "GPT2BPETokenizer), every line kept and each text file one document ending "
                    "in <|endoftext|> (50256); the folder holds encoder.json and vocab.bpe in "
                    "place of vocab.txt. The same input and options give byte-identical files "
                    "with either implementation (the manifest records which one wrote them).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", action="append", type=Path, metavar="PATH",
                        help="a UTF-8 text file (repeat for several, read in order)")
    source.add_argument("--corpus", choices=["tinyshakespeare"],
                        help="a public corpus, downloaded once into the cache and sha256-verified")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to write")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="basic_english",
                   help="basic_english (default): words, vocabulary built here; gpt2: GPT-2's "
                        "BPE, for GPT-2 checkpoints (flax-gpt import-hf)")
    p.add_argument("--bpe-files", type=Path, metavar="DIR",
                   help="with --tokenizer gpt2: a folder holding encoder.json and vocab.bpe "
                        "(default: GPT-2's, downloaded once from OpenAI into the cache and "
                        "sha256-checked)")
    p.add_argument("--min-freq", type=int, default=None,
                   help="drop words seen fewer times (default 1; basic_english only)")
    p.add_argument("--max-vocab", type=int, default=None,
                   help="largest vocabulary, specials included (default: no limit; basic_english "
                        "only)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of lines, taken from the end, for validation (default 0.1)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="bytes that are not UTF-8: refuse with their offset (default) or read "
                        "them as U+FFFD")
    p.add_argument("--implementation", choices=IMPLEMENTATIONS, default="torchtext",
                   help="who tokenizes and builds the vocabulary: torchtext's own get_tokenizer "
                        "and build_vocab_from_iterator (default; needs pip install "
                        "'flax-gpt[torchtext]', Python 3.11), or builtin, the project's "
                        "restatement of both (no torchtext; the same vocab.txt, train.npy and "
                        "val.npy, held equal by the test suite)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=run_prepare)


def run_prepare(args):
    from flax_gpt import experiments

    r = experiments.prepare(args.out, text_files=args.text_file, corpus=args.corpus,
                            implementation=args.implementation, tokenizer=args.tokenizer,
                            bpe_files=args.bpe_files, min_freq=args.min_freq,
                            max_vocab=args.max_vocab, val_fraction=args.val_fraction,
                            errors=args.errors, force=args.force,
                            warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    if args.json:
        print(json.dumps(r.to_dict(), indent=2, sort_keys=True))
        return 0
    counts, manifest = r.manifest["counts"], r.manifest
    mb = sum(s["bytes"] for s in manifest["sources"]) / 1e6
    print(f"prepared {r.path} in {r.seconds:.2f} s from {mb:.2f} MB of text: "
          f"vocabulary {counts['vocab_size']:,}, train {counts['train_tokens']:,} tokens "
          f"({counts['train_lines']:,} lines), val {counts['val_tokens']:,} tokens "
          f"({counts['val_lines']:,} lines), ids {manifest['dtype']}, {r.bytes_on_disk / 1e6:.2f} MB on disk"
          f" ({manifest['tokenizer']}, {manifest['implementation']})")
    return 0


# ---- parity ----------------------------------------------------------------------------

def add_model_options(p, *, preset_default="tiny", attention_default="explicit"):
    """--preset plus config overrides, shared by every command that builds a model."""
    from flax_gpt.core.config import ATTENTIONS, OPTIONS, PRESETS

    # default None, so that a preset given beside --weights is seen and refused
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help=f"model size and kind (default {preset_default}): gpt2, gpt2-medium, "
                        f"-large and -xl are GPT-2 itself; the others are the article's model, "
                        f"gpt2-124m at GPT-2 small's shape")
    p.set_defaults(preset_default=preset_default)
    for field in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
        p.add_argument(f"--{field.replace('_', '-')}", type=_positive_int, default=None,
                       metavar="N", help=f"override the preset's {field}")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    option_help = {"norm": "post: the article's LN(x + f(x)); pre: GPT-2's x + f(LN(x)), with a "
                           "final LayerNorm",
                   "activation": "relu, or GPT-2's tanh GELU", "positions": "the fixed "
                   "sinusoidal table, or a learned one", "init": "the article's init, or GPT-2's "
                   "(residual projections scaled by 1/sqrt(2 n_layers))"}
    for field, help_text in option_help.items():
        p.add_argument(f"--{field}", choices=OPTIONS[field], default=None,
                       help=f"override the preset's {field}: {help_text}")
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="override the preset's tie_embeddings: the token embedding is the "
                        "prediction head (no bias), as in GPT-2")
    p.add_argument("--attention", choices=ATTENTIONS, default=attention_default,
                   help="explicit: SPEC.md's masked softmax, written out; fused: the same function "
                        "as jax.nn.dot_product_attention / F.scaled_dot_product_attention (cuDNN "
                        f"and flash kernels on a GPU; needs dropout 0) (default {attention_default})")


def add_precision_option(p, *, default="highest", help):
    from flax_gpt.core.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=default, help=help)


def model_config(args):
    """The preset with the command line's overrides; fused attention with dropout refused
    before any work."""
    from flax_gpt.core.config import GPTConfig, fused_attention

    config = GPTConfig.preset(args.preset or args.preset_default,
                              **{f: getattr(args, f) for f in MODEL_FIELDS})
    fused_attention(args.attention, config)
    return config


MODEL_FIELDS = ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff", "dropout",
                "norm", "activation", "positions", "tie_embeddings", "init")


def refuse_vocab_size_with_data(args):
    """The vocabulary of a dataset sets the model's: --vocab-size means something only for
    synthetic (or, in parity, random) tokens."""
    synthetic = getattr(args, "synthetic", args.data is None)  # parity: random unless --data
    if args.vocab_size is not None and not synthetic:
        raise FlaxGPTError("--vocab-size cannot be used with a dataset (--data, or train's default "
                           "tinyshakespeare): the dataset's vocabulary sets the model's; drop "
                           "--vocab-size, or use --synthetic tokens")


def add_parity(sub):
    p = sub.add_parser(
        "parity", help="compare Flax and PyTorch from one set of weights",
        description="Load one set of weights into both frameworks and compare, on the same "
                    "batch: every layer's output, the logits, the loss and every gradient; then "
                    "train both with AdamW on the same batches (warmup then cosine, two "
                    "micro-batches a step, a clip that some steps exceed) and compare each "
                    "step's loss and the final parameters. float64 is the truth: Flax against "
                    "PyTorch, nothing masked. Below it the verdict is each framework against a "
                    "float64 PyTorch run on the same weights, batches and labels (Flax's error "
                    "at most 2x PyTorch's plus a few ulps); in highest Flax against PyTorch is "
                    "judged too. In float32, labels downstream of a ReLU input that the runs "
                    "put on opposite sides of 0 are masked in all of them; a row resting on "
                    "under 10% of the labels says 'inconclusive' (neither pass nor fail). "
                    "Prints a table and where the two part; exit 1 if a row fails.")
    add_model_options(p)
    p.add_argument("--weights", type=Path, help="a canonical weights file (default: a fresh "
                   "PyTorch initialisation of --preset, seeded)")
    p.add_argument("--data", type=Path, help="a prepared dataset folder for real batches "
                   "(default: random tokens)")
    add_precision_option(p, help="float64: the truth tier, no masking; highest: float32 at full "
                         "matmul precision; default: float32 with the device's fast matmuls in "
                         "both (TF32 on an NVIDIA GPU, judged with its ulp); bf16: bf16 matmuls, "
                         "with KL divergence and top-1 agreement (default highest)")
    p.add_argument("--torch-device", default=None,
                   help="where PyTorch runs (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--train-steps", type=int, default=50, help="AdamW steps to compare (0: none)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the AdamW run "
                   "(default 1e-3, warmup 5 steps then cosine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    p.set_defaults(handler=run_parity)


def run_parity(args):
    if args.dropout:  # parity.run takes dropout only under a shared-mask harness (the suite's)
        raise FlaxGPTError(f"parity compares with dropout 0 (the frameworks draw different "
                           f"dropout masks), and --dropout is {args.dropout}: drop --dropout")
    if args.weights:
        _refuse_together(args, "--weights", ("preset", *MODEL_FIELDS),
                         "the weights file carries the whole model config")
    refuse_vocab_size_with_data(args)
    _check_output(args.json, "--json")
    from flax_gpt.sidebyside import parity

    r = parity.run(None if args.weights else model_config(args), weights_path=args.weights,
                   data=args.data, precision=args.precision, attention=args.attention,
                   batch_size=args.batch_size, train_steps=args.train_steps, lr=args.lr,
                   seed=args.seed, torch_device=args.torch_device)
    print_table(["quantity", "max abs diff", "max rel diff", "tolerance", "pass", "note"],
                [[row.quantity, f"{row.max_abs:.3e}", f"{row.max_rel:.3e}",
                  "-" if row.tolerance is None else f"{row.tolerance:.1e}",
                  row.verdict, row.note]
                 for row in r.rows])
    env = r.environment
    print(f"config {json.dumps(r.config, sort_keys=True)}, attention {r.attention}")
    if r.train_config:
        tc = r.train_config
        print(f"AdamW: {tc['steps']} steps of {tc['grad_accum']} x {tc['batch_size']} rows, lr "
              f"{tc['lr']:g} (warmup {tc['warmup_steps']}, cosine), clip {tc['grad_clip']:.4g} "
              f"(median gradient norm of the first steps)")
    verdict = ("FAILED: " + ", ".join(r.failed) if r.failed else
               "all within tolerance" if r.passed else "nothing was judged")
    print(f"precision {args.precision} ({env['matmul_dtype']} matmuls) on {env['jax_device']} "
          f"(jax) / {env['torch_device']} (torch): {verdict}")
    if r.inconclusive:
        print("inconclusive (too few labels kept to judge; the verdict rests on the rows "
              "judged): " + ", ".join(r.inconclusive))
    if r.divergence:
        print("where they part: " + ", ".join(f"{k} {v}" for k, v in r.divergence.items()))
    if args.json:
        write_json(args.json, r.to_dict())
    return 0 if r.passed else 1


# ---- train / compare / eval / generate -----------------------------------------------------

def add_train_options(p):
    from flax_gpt.core.hparams import TrainConfig
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
    add_precision_option(p, help="float64: parameters and compute in float64; highest: "
                         "float32; default: framework defaults; bf16: bf16 matmuls (default highest)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="evaluate every N steps and at the end (0: never)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (0: all)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="host sync and log every N steps")
    p.add_argument("--device", default=None, help="the PyTorch trainer's device (cpu, cuda; "
                   "default cpu)")
    add_mesh_option(p)


def add_mesh_option(p):
    p.add_argument("--mesh", metavar="data=N,fsdp=N,tensor=N", default=None,
                   help="shard the Flax trainer over a device mesh: batch rows over data*fsdp, "
                        "parameters and AdamW state over fsdp, Megatron-style over tensor; the "
                        "product must be the device count (on CPU, set XLA_FLAGS="
                        "--xla_force_host_platform_device_count=N). The rules are printed at "
                        "start")


def print_err(line):
    print(line, file=sys.stderr)


def train_config(args):
    from flax_gpt.core.hparams import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                       precision=args.precision, attention=args.attention)


def add_train(sub):
    p = sub.add_parser(
        "train", help="train a model with the Flax or the PyTorch trainer",
        description="Train with AdamW (linear warmup, cosine decay, global-norm clipping, "
                    "gradient accumulation). Writes RUN/metrics.jsonl, checkpoints (the last "
                    "--keep) and RUN/weights.safetensors. SIGINT (Ctrl-C) or SIGTERM to any "
                    "process of the run stops every one after the same step with a checkpoint "
                    "of it (exit 130 or 143); --resume continues exactly where it stopped.")
    p.add_argument("--framework", choices=["flax", "torch"], default="flax")
    p.add_argument("--out", type=Path, required=True, help="the run folder")
    add_train_options(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps "
                   "(always at the end and on SIGINT or SIGTERM)")
    p.add_argument("--keep", type=_positive_int, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--stop-at", type=_positive_int, default=None,
                   help="stop after step N of the --steps schedule (checkpointed; --resume goes on)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    add_ranks_options(p)
    g = p.add_argument_group(
        "several JAX processes (Flax)",
        "Join a multi-process JAX job (jax.distributed), one process per host or per GPU: "
        "--mesh then spans the devices of all the processes. Each process feeds its own "
        "devices' rows of every batch and writes its own shards of each checkpoint (orbax); "
        "process 0 writes the rest of the run folder, which must be on a file system every "
        "process sees. A flag not given is read from JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or else detected by JAX (SLURM, Open MPI, "
        "Kubernetes, Cloud TPU)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="where process 0 listens for the others")
    g.add_argument("--num-processes", metavar="N", default=None, help="processes in the job")
    g.add_argument("--process-id", metavar="I", default=None, help="this process, 0 to N-1")
    g.add_argument("--distributed", action="store_true",
                   help="join a job with no flag or variable above, all detected by JAX")
    p.add_argument("--json", action="store_true",
                   help="print the result (every logged step and evaluation) as JSON")
    p.set_defaults(handler=run_train)


def add_ranks_options(p):
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="PyTorch: train data parallel on N processes (DistributedDataParallel, "
                        "gloo on CPU, NCCL with --device cuda); each takes 1/N of every batch's "
                        "rows, rank 0 writes the run folder (train also runs under torchrun)")
    p.add_argument("--fsdp", action="store_true",
                   help="PyTorch, on several ranks: shard parameters, gradients and AdamW "
                        "state over them with FSDP2 (fully_shard, torch 2.6 and newer) "
                        "instead of DDP; every rank writes its own checkpoint shards "
                        "(torch.distributed.checkpoint), which resume on any number of ranks")


def run_train(args):
    refuse_vocab_size_with_data(args)
    from flax_gpt import experiments
    from flax_gpt.core.sharding import Processes

    # the JAX_* variables are the Flax trainer's; flags given to the PyTorch one are refused
    processes = Processes.resolve(
        os.environ if args.framework == "flax" else {}, distributed=args.distributed,
        coordinator=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id)
    if processes is not None and args.json:
        _stdout_for_python_only()
    r = experiments.train(
        args.framework, model_config(args), train_config(args), out=args.out,
        data=args.data, synthetic=args.synthetic, resume=args.resume, device=args.device,
        log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every, keep=args.keep, stop_at=args.stop_at,
        tensorboard=args.tensorboard, mesh=args.mesh, log=print_err, nproc=args.nproc,
        fsdp=args.fsdp, processes=processes,
        abort=lambda text: print_err(f"flax-gpt train: error: {text}"))
    if not r.steps:  # a process other than the first of a torchrun or JAX job: that one reports
        return 0
    if args.json:
        print(json.dumps(r.to_dict(), sort_keys=True))
        return 0
    last, evals = r.steps[-1], r.evals
    print(f"{r.framework}: {len(r.steps)} steps in {r.seconds:.1f} s, final train loss "
          f"{last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s" +
          (f", val loss {evals[-1]['val_loss']:.4f} (perplexity {evals[-1]['val_ppl']:.1f})"
           if evals else "") + f"; run folder {r.run}")
    return 0


def _stdout_for_python_only():
    """Point file descriptor 1 at stderr and keep the real stdout for Python's prints alone:
    on the CPU, gloo (C++) writes its connection lines to fd 1, which would break --json."""
    sys.stdout.flush()
    sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)


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
    add_ranks_options(p)
    p.set_defaults(handler=run_compare)


def run_compare(args):
    refuse_vocab_size_with_data(args)
    from flax_gpt.sidebyside import compare

    r = compare.run(model_config(args), train_config(args), out=args.out, data=args.data,
                    synthetic=args.synthetic, noise_floor=args.noise_floor, device=args.device,
                    log_every=args.log_every, eval_every=args.eval_every,
                    eval_batches=args.eval_batches, mesh=args.mesh, log=print_err,
                    nproc=args.nproc, fsdp=args.fsdp)
    report = r.report
    rows = [[label, f"{f['loss'][-1]:.5f}", f"{f['val'][-1]['val_loss']:.5f}" if f["val"] else "-",
             f"{f['tokens_per_s']:,.0f}", f"{f['seconds']:.1f}"]
            for label, f in report["frameworks"].items()]
    print_table(["run", "final train loss", "final val loss", "tokens/s", "seconds"], rows)
    floor = report.get("noise_floor")
    print(f"max |loss diff| flax-torch over {report['steps']} steps: {report['max_abs_loss_diff']:.3e} "
          f"(final {report['final_abs_loss_diff']:.3e})"
          + (f"; torch-torch from one ulp away: {floor['max_abs_loss_diff']:.3e} "
             f"(final {floor['final_abs_loss_diff']:.3e})" if floor else "")
          + f"; unigram baseline {report['unigram_baseline_loss']:.4f}; wrote {r.report_path} "
          f"and {r.plot_path}")
    verdict = {True: "within", False: "NOT within", None: "not judged"}[r.passed]
    print(f"gap {verdict} what floating point allows: {report['judgement']['rule']}")
    return 1 if r.passed is False else 0


def add_eval(sub):
    p = sub.add_parser("eval", help="loss and perplexity of a run's weights on a split",
                       description="Mean cross-entropy and perplexity of RUN's latest weights "
                                   "(or a weights file's, e.g. import-hf's) over every batch of "
                                   "a split (Flax). On a dataset prepared with --tokenizer gpt2 "
                                   "also per byte of text: nats, bits and perplexity per byte, "
                                   "which compare across tokenizers.")
    p.add_argument("--run", type=Path, required=True, metavar="RUN",
                   help="a run folder, or a canonical weights file (then --data is needed)")
    p.add_argument("--data", type=Path, help="dataset folder (default: the run's; a run on "
                   "synthetic tokens: its own random batches of the split)")
    p.add_argument("--split", choices=["train", "val"], default="val")
    p.add_argument("--batch-size", type=_positive_int, help="default: the run's (its training "
                   "evaluated --eval-batches batches of it, 0 for all; eval reads them all)")
    add_precision_option(p, default=None, help="default: float64 for a float64 run, else highest")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_eval)


def run_eval(args):
    from flax_gpt import experiments

    r = experiments.evaluate(args.run, data=args.data, split=args.split, batch_size=args.batch_size,
                             precision=args.precision)
    per_byte = ("" if r.bytes is None else
                f"; per byte: {r.loss_per_byte:.4f} nats, {r.bits_per_byte:.4f} bits, "
                f"perplexity {r.perplexity_per_byte:.3f} ({r.tokens:,} tokens, {r.bytes:,} bytes)")
    print(json.dumps(r.to_dict()) if args.json else
          f"{r.split}: loss {r.loss:.4f}, perplexity {r.perplexity:.2f} over {r.batches} "
          f"batches{per_byte}")
    return 0


def add_generate(sub):
    p = sub.add_parser("generate", help="sample text from a run's weights",
                       description="Generate after --prompt from RUN's latest weights (or a "
                                   "weights file's, e.g. import-hf's) with a key/value cache, in "
                                   "Flax or PyTorch, each token printed as it is drawn. The same "
                                   "--seed gives the same text. A GPT-2 vocabulary (a dataset "
                                   "prepared with --tokenizer gpt2, or a weights file of 50,257 "
                                   "tokens) reads the raw prompt with GPT-2's BPE and prints the "
                                   "text itself, its bytes joined.")
    p.add_argument("--run", type=Path, required=True, metavar="RUN",
                   help="a run folder, or a canonical weights file (its text: --data, or for "
                        "GPT-2's 50,257 tokens GPT-2's BPE files)")
    p.add_argument("--data", type=Path, help="dataset folder for the vocabulary (default: the "
                   "run's; a run on synthetic tokens has none, and needs one)")
    p.add_argument("--bpe-files", type=Path, metavar="DIR",
                   help="for a weights file without --data: a folder holding GPT-2's "
                        "encoder.json and vocab.bpe (default: the cache, downloaded once)")
    p.add_argument("--prompt", default="", help="text to continue (basic_english words, or "
                   "raw text with GPT-2's BPE)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0)
    add_precision_option(p, default=None, help="default: float64 for a float64 run, else highest")
    p.add_argument("--show-specials", action="store_true",
                   help="print <bos>, <eos> as tokens (default: each <eos> ends a line)")
    p.add_argument("--json", action="store_true", help="print prompt, ids and text as JSON")
    add_generate_options(p)
    p.set_defaults(handler=run_generate)


# -- issue 15: cached generation in both frameworks (options beside the ones above)
def add_generate_options(p):
    p.add_argument("--framework", choices=["flax", "torch"], default="flax",
                   help="sample with the Flax model or its PyTorch twin: the same --seed gives "
                        "the same text wherever their probabilities agree (default flax)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the likeliest tokens holding this share of the mass (default 1: all)")
    p.add_argument("--stop", metavar="TOKEN", help="end the text once this token is drawn "
                   "(e.g. '<eos>', or '<|endoftext|>' with GPT-2's BPE)")
    p.add_argument("--window-keep", type=int, default=None, metavar="N",
                   help="tokens kept when the text outgrows the context and the window slides "
                        "(default seq_len // 2)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole window at every token (the uncached reference)")


def run_generate(args):
    from flax_gpt import experiments

    def stream(piece):
        print(piece, end="", flush=True)

    r = experiments.generate(args.run, prompt=args.prompt, data=args.data,
                             bpe_files=args.bpe_files, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, precision=args.precision,
                             framework=args.framework, top_p=args.top_p, stop=args.stop,
                             window_keep=args.window_keep, cached=not args.no_cache,
                             specials=args.show_specials, on_text=None if args.json else stream)
    if r.unknown_words:
        print(f"warning: not in the vocabulary, read as <unk>: {' '.join(r.unknown_words)}",
              file=sys.stderr)
    print(json.dumps(r.to_dict()) if args.json else "")
    return 0


def add_decode_parity(sub):
    p = sub.add_parser(
        "decode-parity", help="generate with both frameworks from a run's weights, step by step",
        description="Load RUN's latest weights into Flax and PyTorch at one precision and "
                    "generate after each --prompt with both (cached decode, same sampling "
                    "settings and seed). Reports the first step whose tokens differ, the first "
                    "near tie (top two logits within twice the frameworks' difference), and the "
                    "largest logits difference while the texts are the same. Exit 1 if the "
                    "tokens differ.")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, help="dataset folder for the vocabulary (default: the run's)")
    p.add_argument("--prompt", action="append", help="text to continue (repeat for a batch; default: none)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-keep", type=int, default=None, metavar="N")
    p.add_argument("--precision", choices=["float64", "highest", "default"], default="float64")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the comparison as JSON")
    p.set_defaults(handler=run_decode_parity)


def run_decode_parity(args):
    _check_output(args.json, "--json")
    from flax_gpt.sidebyside import decoding

    r = decoding.run(args.run, args.prompt or [""], data=args.data,
                     max_new_tokens=args.max_new_tokens, precision=args.precision,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed, window_keep=args.window_keep)
    c = r.comparison
    for b, prompt in enumerate(r.prompts):
        print(f"[{b}] {prompt!r} -> {r.texts['flax'][b]}")
    steps = len(c.step_logits_diff)
    verdict = ("same tokens" if c.agree else "NaN in the logits" if c.first_mismatch is None
               else f"tokens differ from step {c.first_mismatch}")
    print(f"{r.precision}: {verdict}"
          f" over {steps} steps ({c.slides} window slides); max |logits flax - torch| "
          f"{c.max_logits_diff:.2e} while the texts were the same; smallest top-two gap "
          f"{min(c.step_top2_gap):.2e}; first near tie: "
          f"{'none' if c.first_near_tie is None else f'step {c.first_near_tie}'}")
    if args.json:
        write_json(args.json, r.to_dict())
    return 0 if c.agree else 1


# ---- bench ------------------------------------------------------------------------------------

def add_bench(sub):
    from flax_gpt.sidebyside.bench import VARIANTS

    p = sub.add_parser(
        "bench", help="time the train step of every variant side by side",
        description="Time the real train step (forward, backward, AdamW) of Flax jax.jit fp32 "
                    "and bf16, Flax nnx.jit, PyTorch eager fp32 and bf16 autocast, and "
                    "torch.compile fp32 and bf16, on one config and batch of synthetic tokens. "
                    "Reports compile time, median/p10/p90 step time, tokens/s, MFU, peak memory "
                    "and the last loss. On CPU the MFU peak is a matmul measured on the spot. "
                    "A variant that cannot run here is skipped with the reason; one that "
                    "raises is reported as crashed, and the exit status is then 1.")
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
    add_mesh_option(p)
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG chart")
    p.set_defaults(handler=run_bench)


def run_bench(args):
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    from flax_gpt.sidebyside import bench

    sizes = [args.batch_size]
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        try:
            sizes = [int(v) for v in values.split(",")]
        except ValueError:
            sizes = []
        if key != "batch_size" or not sizes or min(sizes) < 1:
            raise FlaxGPTError(f"--sweep takes batch_size=A,B,... with positive integers, got {args.sweep!r}")
    r = bench.run(model_config(args), batch_sizes=sizes, variants=_names(args.variants),
                  skip=_names(args.skip), warmup=args.warmup, steps=args.steps,
                  rounds=args.rounds, device=args.device, attention=args.attention,
                  pad=not args.no_pad_vocab, json_path=args.json, on_report=print_bench,
                  mesh=args.mesh)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(args.plot, r.reports)
        print(f"wrote {args.plot}")
    for size, variant, reason in r.crashed:  # reported like a skip, but a failure
        print(f"bench: {variant} crashed at batch {size}: {reason}", file=sys.stderr)
    return 1 if r.crashed else 0


def _names(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def print_bench(report):
    from flax_gpt.sidebyside.bench import ON_ONE_DEVICE

    rows, mesh = [], report.get("mesh")
    for r in report["results"]:
        if "skipped" in r:
            state = "CRASHED: " if r.get("crashed") else "skipped: "
            rows.append([r["variant"], state + r["skipped"]] + [""] * (12 if mesh else 8))
            continue
        mem = r["peak_memory_bytes"]
        rows.append([r["variant"], f"{r['compile_s']:.1f}", f"{1e3 * r['median_s']:.1f}",
                     f"{1e3 * r['p10_s']:.1f}", f"{1e3 * r['p90_s']:.1f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x",
                     "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     "-" if mem is None else f"{mem / 2**30:.2f}", f"{r['loss']:.4f}"])
        if mesh:
            scaling = r.get("scaling_efficiency")
            rows[-1][6:6] = [str(r["devices"]), f"{r['tokens_per_s_per_device']:,.0f}",
                             "-" if scaling is None else f"{100 * scaling:.0f}%",
                             f"{r['param_bytes_per_device'] / 2**20:.3g} + "
                             f"{r['optimizer_bytes_per_device'] / 2**20:.3g}"]
    header = ["variant", "compile s", "median ms", "p10 ms", "p90 ms", "tokens/s",
              f"speed / {report['speedup_of']}", "MFU", "peak GiB", "last loss"]
    if mesh:
        header[6:6] = ["devices", "tokens/s/device", "scaling", "params + AdamW MiB/device"]
        print(f"Flax jit variants on mesh {mesh} of {report['jax_devices']} devices, and again "
              f"on one device ({ON_ONE_DEVICE}); scaling: tokens/s per device over one "
              f"device's, same batch; MFU per device")
    print_table(header, rows)
    print(f"FLOPs/token {report['flops_per_token']:,} (causal {report['flops_per_token_causal']:,});"
          f" N = {report['matmul_params']:,} matmul parameters: {report['flops_note']}. "
          f"Device {report['device']}.")


def add_bench_decode(sub):
    from flax_gpt.sidebyside.decode_bench import VARIANTS

    p = sub.add_parser(
        "bench-decode", help="time prefill and decode of every variant, cached and uncached",
        description="Time generation (greedy) of Flax fp32 and bf16, the whole generation on "
                    "the device as one program (flax-loop) and one jitted call per token "
                    "(flax-step), PyTorch eager fp32 and bf16 autocast, and torch.compile fp32 "
                    "and bf16 (on a GPU the decode step a CUDA graph), at each batch size and "
                    "context length (prompt tokens; the model's seq_len is context + "
                    "--new-tokens): prefill tokens/s, time to first token, time per output "
                    "token and decode tokens/s, with the key/value cache and without it "
                    "(the window recomputed per token); and the bytes a decode step must read "
                    "against the machine's memory bandwidth, measured on the spot. A variant "
                    "that cannot run here is skipped; one that raises is reported as crashed, "
                    "and the exit status is then 1.")
    add_model_options(p, preset_default="small")
    p.add_argument("--batch-sizes", default="1,8", metavar="A,B,...", help="default 1,8")
    p.add_argument("--contexts", default=None, metavar="A,B,...",
                   help="prompt lengths (default: half the preset's seq_len)")
    p.add_argument("--new-tokens", type=_positive_int, default=16,
                   help="decode steps timed per round, cached and uncached (default 16)")
    p.add_argument("--rounds", type=_positive_int, default=3,
                   help="rounds, the variants taking turns within each (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--skip", default="", help="comma-separated variants to leave out")
    p.add_argument("--no-pad-vocab", action="store_true",
                   help="keep the vocabulary as is (default: round it up to a multiple of 64)")
    p.add_argument("--device", default="cpu", help="PyTorch device (default cpu)")
    p.add_argument("--torch-threads", type=_positive_int, default=None, metavar="N",
                   help="PyTorch's intra-op threads (default: its own choice, one per core)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG chart")
    p.set_defaults(handler=run_bench_decode)


def _sizes(text, option):
    try:
        sizes = [int(v) for v in _names(text)]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise FlaxGPTError(f"{option} takes positive integers A,B,..., got {text!r}")
    return sizes


def run_bench_decode(args):
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    if args.seq_len is not None:
        raise FlaxGPTError("bench-decode sets each model's seq_len to its context + --new-tokens: "
                           "choose the lengths with --contexts and --new-tokens, not --seq-len")
    from flax_gpt.sidebyside import decode_bench

    config = model_config(args)
    contexts = _sizes(args.contexts, "--contexts") if args.contexts else [max(1, config.seq_len // 2)]
    r = decode_bench.run(config, batch_sizes=_sizes(args.batch_sizes, "--batch-sizes"),
                         contexts=contexts, new_tokens=args.new_tokens,
                         variants=_names(args.variants), skip=_names(args.skip), rounds=args.rounds,
                         device=args.device, pad=not args.no_pad_vocab,
                         torch_threads=args.torch_threads, json_path=args.json,
                         on_shape=print_bench_decode)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        decode_bench.plot(args.plot, r)
        print(f"wrote {args.plot}")
    crashed = [(s["batch_size"], s["context"], x) for s in r["shapes"] for x in s["results"] if x.get("crashed")]
    for size, context, x in crashed:  # reported like a skip, but a failure
        print(f"bench-decode: {x['variant']} crashed at batch {size}, context {context}: {x['skipped']}",
              file=sys.stderr)
    return 1 if crashed else 0


def print_bench_decode(report, shape):
    bw = report["memory_bandwidth_bytes_per_s"]
    print(f"batch {shape['batch_size']}, context {shape['context']} (+{shape['new_tokens']} new, "
          f"seq_len {shape['seq_len']}); PyTorch threads {report['torch_threads']}; memory "
          f"bandwidth {bw['best'] / 1e9:.1f} GB/s "
          f"(numpy copy {bw['numpy'] / 1e9:.1f}, torch copy {bw['torch'] / 1e9:.1f})")
    rows = []
    for r in shape["results"]:
        if "skipped" in r:
            rows.append([r["variant"], "skipped: " + r["skipped"]] + [""] * 10)
            continue
        rows.append([r["variant"], f"{r['compile_s']:.1f}", f"{1e3 * r['ttft_s']:.1f}",
                     f"{r['prefill_tokens_per_s']:,.0f}", f"{1e3 * r['tpot_s']:.2f}",
                     f"{r['decode_tokens_per_s']:,.0f}", f"{1e3 * r['uncached_tpot_s']:.2f}",
                     f"{r['uncached_tokens_per_s']:,.0f}", f"{r['cache_speedup']:.1f}x",
                     f"{r['speedup']:.2f}x", f"{r['achieved_bytes_per_s'] / 1e9:.1f}",
                     f"{100 * r['bandwidth_fraction']:.0f}%"])
    print_table(["variant", "compile s", "TTFT ms", "prefill tok/s", "TPOT ms", "decode tok/s",
                 "uncached TPOT ms", "uncached tok/s", "cache gain", f"speed / {shape['speedup_of']}",
                 "GB/s", "of bandwidth"], rows)
    for name, ratio in shape["flax_over_torch"].items():
        print(f"decode {name}: {ratio:.2f}x")


# ---- Hugging Face checkpoints -----------------------------------------------------------

def add_import_hf(sub):
    p = sub.add_parser(
        "import-hf", help="a Hugging Face GPT-2 checkpoint as a canonical weights file",
        description="Convert a GPT2LMHeadModel checkpoint into a canonical weights file whose "
                    "config is GPT-2's (pre-norm, tanh GELU, learned positions, tied head as the "
                    "checkpoint says). flax_gpt.load(FILE) and torch_reference.load(FILE) then "
                    "give it in either framework, at any precision. A config the model's options "
                    "cannot express, or a tensor that is unknown, missing or misshapen, is "
                    "refused by name.")
    p.add_argument("src", metavar="SRC", help="a save_pretrained folder (model.safetensors or "
                   "pytorch_model.bin beside config.json) or a hub name such as gpt2 (downloaded "
                   "once into the Hugging Face cache; needs huggingface_hub and network)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="the canonical weights file to write (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_import_hf)


def run_import_hf(args):
    _check_output(args.out, "--out")
    from flax_gpt import experiments

    r = experiments.import_hf(args.src, args.out)
    _print_hf(args, r, f"imported {r.source} ({r.parameters:,} parameters) into {r.path}")
    return 0


def add_export_hf(sub):
    p = sub.add_parser(
        "export-hf", help="weights as a folder transformers' GPT2LMHeadModel loads",
        description="Write a canonical weights file, or a run folder's latest weights, as a "
                    "Hugging Face folder (config.json and model.safetensors) that "
                    "transformers.GPT2LMHeadModel.from_pretrained(DIR) loads. Only a model with "
                    "GPT-2's structure can go (pre-norm, learned positions, a head without "
                    "bias): others are refused.")
    p.add_argument("source", metavar="FILE_OR_RUN", type=Path,
                   help="a canonical weights file, or a run folder (its latest weights)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run_export_hf)


def run_export_hf(args):
    from flax_gpt import experiments

    r = experiments.export_hf(args.source, args.out, force=args.force)
    _print_hf(args, r, f"exported {r.source} ({r.parameters:,} parameters) to {r.path}: "
                       f"GPT2LMHeadModel.from_pretrained('{r.path}')")
    return 0


def _print_hf(args, r, line):
    print(json.dumps(r.to_dict(), sort_keys=True) if args.json else line)


# ---- entry point ---------------------------------------------------------------------

def build_parser():
    parser = Parser(
        prog="flax-gpt",
        description="A GPT-style model in JAX/Flax with a PyTorch twin that shares its weights. "
                    "Run 'flax-gpt COMMAND --help' for each command's options.")
    from flax_gpt import __version__

    parser.add_argument("--version", action="version", version=f"flax-gpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [add_prepare, add_parity, add_train, add_compare, add_eval, add_generate, add_bench,
            add_decode_parity, add_bench_decode, add_import_hf, add_export_hf]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FlaxGPTError as e:
        print(f"flax-gpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full disk, a permission: the user's to fix, not a traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"flax-gpt {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:  # training said where it stopped and how to go on
        return e.exit_code
    except KeyboardInterrupt:
        print(f"flax-gpt {args.command}: interrupted", file=sys.stderr)
        return 130
