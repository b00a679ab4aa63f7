"""A GPT-2-style model trained here on tinyshakespeare with GPT-2's own tokenizer, and the text
it generates: whether every sample decodes as valid UTF-8 once the tokens' bytes are joined
(a character's bytes may be split across tokens), and the loss per token and per byte.

    python scripts/gpt2_text.py --bpe-files DIR --json benchmarks/results/gpt2_text_cpu.json

DIR holds GPT-2's encoder.json and vocab.bpe (without it, they come from the cache or are
downloaded once); the corpus is ../shared/data/tinyshakespeare.txt where it is, else the
download. The model is the `tiny` preset with every GPT-2 option (pre-norm, tanh GELU,
learned positions, tied embeddings, GPT-2's init) at GPT-2's vocabulary.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from flax_gpt import experiments
from flax_gpt.core.data import TokenDataset
from flax_gpt.core.files import atomic_file
from flax_gpt.sidebyside.pair import environment

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
GPT2_OPTIONS = ["--norm", "pre", "--activation", "gelu_tanh", "--positions", "learned",
                "--tie-embeddings", "--init", "gpt2"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bpe-files", type=Path)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    from flax_gpt import cli

    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        sources = {"text_files": [SHAKESPEARE]} if SHAKESPEARE.is_file() else {"corpus": "tinyshakespeare"}
        prepared = experiments.prepare(data, tokenizer="gpt2", bpe_files=args.bpe_files,
                                       implementation="builtin", **sources)
        code = cli.main(["train", "--preset", "tiny", "--data", str(data), "--steps",
                         str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", "64",
                         "--eval-every", "0", "--out", str(run), *GPT2_OPTIONS])
        if code:
            sys.exit(code)
        evaluation = experiments.evaluate(run)
        dataset = TokenDataset.load(data)
        samples = []
        for seed in range(args.samples):
            r = experiments.generate(run, max_new_tokens=args.new_tokens, seed=seed,
                                     temperature=1.0)
            raw = dataset.bpe.decode_bytes(r.ids[1:])
            try:
                raw.decode("utf-8")
                valid = True
            except UnicodeDecodeError:
                valid = False
            samples.append({"seed": seed, "text": r.text, "valid_utf8": valid})
    result = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": 64, "dataset": prepared.manifest["counts"],
              "gpt2_files": prepared.manifest["gpt2_files"], "eval": evaluation.to_dict(),
              "samples": samples, "valid_utf8": all(s["valid_utf8"] for s in samples),
              "environment": environment({"precision": "highest"})}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.json, "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    print(f"{args.samples} samples of {args.new_tokens} tokens after {args.steps} steps: "
          f"{'all' if result['valid_utf8'] else 'NOT all'} valid UTF-8; val loss "
          f"{evaluation.loss:.3f} per token, {evaluation.bits_per_byte:.3f} bits per byte")


if __name__ == "__main__":
    main()
