"""Render the measured tables of README.md (and docs/*.md) from the committed result files.

Every measured table sits between `<!-- render: KIND FILE -->` and `<!-- /render -->`, and is
made here from FILE (under benchmarks/results/), never typed by hand. Each table ends with
the line saying where its figures come from: the command, the stack, the commit and the
date that FILE records. A result file without those fields predates the schema: re-run its
command, or delete it and the table.

    python scripts/render_docs.py            # rewrite the tables in place
    python scripts/render_docs.py --check    # exit 1 if a table differs from its file
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from flax_gpt.core.files import atomic_file  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- render: (\S+) (\S+) -->\n)(.*?)(<!-- /render -->)", re.S)
PROVENANCE = ("command", "commit", "date", "versions")


class StaleResult(Exception):
    """A result file that lacks what its renderer reads."""


def load(name):
    path = RESULTS / name
    if not path.is_file():
        raise StaleResult(f"{path} is missing")
    result = json.loads(path.read_text())
    missing = [k for k in PROVENANCE if k not in result]
    if missing:
        raise StaleResult(f"{path} lacks {', '.join(missing)}: it predates the schema; re-run "
                          f"its command, or delete it and its table")
    return result


def source(name, result):
    v = result["versions"]
    stack = f"python {v['python']}, jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, numpy {v['numpy']}"
    commit = (result["commit"] or "outside git")[:12] + ("+dirty" if str(result["commit"]).endswith("+dirty") else "")
    return (f"Source: [`{name}`](benchmarks/results/{name}), `{result['command']}`; {stack}; "
            f"commit {commit}, {result['date']}.")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def false_alarms(name):
    """Runs and false alarms per config and precision, rewrites on their own lines."""
    result = load(name)
    counts = defaultdict(lambda: [0, 0, 0, 0])  # runs, false alarms, with inconclusive rows, trained
    for r in result["runs"]:
        key = (r["patch"] or r["preset"], r["precision"])
        c = counts[key]
        c[0] += 1
        c[1] += not r["passed"]
        c[2] += bool(r["inconclusive"])
    rows = [[f"`{who}`", precision, n, alarms, inconclusive]
            for (who, precision), (n, alarms, inconclusive, _) in counts.items()]
    total = sum(c[0] for c in counts.values())
    alarms = sum(c[1] for c in counts.values())
    return (table(["config or rewrite", "precision", "runs", "false alarms",
                   "runs with an inconclusive row"], rows)
            + f"\n\n{total} runs, {alarms} false alarms.\n\n" + source(name, result))


def parity(name):
    """One `flax-gpt parity --json` result: every judged or reported row."""
    result = load(name)
    rows = [[r["quantity"], f"{r['max_abs']:.2e}", "-" if r["tolerance"] is None else f"{r['tolerance']:.1e}",
             "inconclusive" if r.get("inconclusive") else
             "-" if r["passed"] is None else ("pass" if r["passed"] else "FAIL")]
            for r in result["rows"]]
    verdict = "passed" if result["passed"] else "FAILED"
    return (table(["quantity", "max abs diff (Flax's error, for rows vs float64)", "tolerance", "verdict"], rows)
            + f"\n\nVerdict: {verdict}.\n\n" + source(name, result))


def mutations(name):
    """The planted-bug catalogue: per mutation, what each tier said and where it was named."""
    result = load(name)
    by = defaultdict(dict)
    for o in result["outcomes"]:
        by[(o["mutation"], o["framework"])][o["tier"]] = o
    tiers = sorted({o["tier"] for o in result["outcomes"]}, key=["float64", "highest", "reference"].index)

    def cell(o):
        if o is None:
            return "-"
        said = "caught" if o["caught"] else "missed"
        if o["caught"] and o["located"]:
            said += ", located"
        if not o["expected_caught"]:
            said += " (not expected)" if not o["caught"] else " (beyond expectation)"
        return said

    rows = []
    for (mutation, framework), outcome in by.items():
        named = next((o["divergence"] for o in outcome.values() if o["caught"] and o["divergence"]), {})
        rows.append([mutation, framework, *[cell(outcome.get(t)) for t in tiers],
                     ", ".join(f"{k} {v}" for k, v in named.items()) or "-"])
    sizes = [[scalar, *[f"{result['smallest_caught'][scalar].get(t, float('nan')):.0e}"
                        if result["smallest_caught"][scalar].get(t) is not None else "none"
                        for t in ("float64", "highest")]]
             for scalar in result["smallest_caught"]]
    missed = result["missed"]
    return (table(["mutation", "where", *tiers, "named"], rows)
            + f"\n\n{len(by)} mutations; caught where expected and located: "
              f"{'all' if not missed else 'all but ' + ', '.join(map(str, missed))}.\n\n"
            + table(["scalar changed (relative size)", "smallest caught, float64", "smallest caught, highest"], sizes)
            + "\n\n" + source(name, result))


def faults(name):
    """Per engine and fault: how soon every process of the run had exited, and its exit codes."""
    result = load(name)
    engines = {"torch": "PyTorch `--nproc 2`", "jax": "JAX, 2 processes"}
    said = {"SIGINT": "SIGINT to {}", "SIGTERM": "SIGTERM to {}", "SIGKILL": "kill -9 of {}",
            "finish": "none: the run finished"}
    rows = []
    for r in result["faults"]:
        who = ("the launcher" if r["target"] == "launcher" else
               f"{'rank' if r['engine'] == 'torch' else 'process'} {r['target']}")
        since = "its last step" if r["fault"] == "finish" else "the fault"
        rows.append([engines[r["engine"]], said[r["fault"]].format(who),
                     f"{r['median_s']:.1f} s (max {r['max_s']:.1f} s) after {since}",
                     " / ".join(", ".join(str(c) if c >= 0 else "killed" for c in codes)
                                for codes in r["exit_codes"])])
    return (table(["run", "fault", "every process exited", "exit code of each process"], rows)
            + f"\n\n{result['repeats']} runs of each.\n\n" + source(name, result))


def hf_parity(name):
    """Both frameworks against Hugging Face's GPT-2 (python -m parity_tests.against_hf)."""
    result = load(name)
    c = result["config"]
    rows = []
    for framework in ("flax", "torch"):
        full, one = (result["float64"][f"{framework} {case}"] for case in ("full-context", "one-token"))
        g = result["generation"][framework]
        rows.append([framework, f"{max(full['logits'], one['logits']):.1e}",
                     f"{max(full['hidden_states'], one['hidden_states']):.1e}", f"{full['loss']:.1e}",
                     f"{full['gradient_rel']:.1e} (`{full['gradient_worst']}`)",
                     f"{g['equal_until']} of {g['tokens']}",
                     f"{result['float32'][f'{framework} vs eager']:.1e}",
                     f"{result['float32'][f'{framework} vs sdpa']:.1e}"])
    big = result["largest"]["full-context"]
    shape = (f"{c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads, vocabulary "
             f"{c['vocab_size']:,}, every parameter random at scale {result['random_scale']} "
             f"(LayerNorm gains 1 + that); context {result['context']} (and one token); the "
             f"largest |logit| is {big['logits']:.1f} and the largest hidden value "
             f"{big['hidden_states']:.1f}; differences are absolute, gradients relative to "
             f"each one's largest value; transformers {result['transformers']}")
    return (table(["framework", "float64 logits", "hidden states", "loss",
                   "worst gradient (relative)", "greedy tokens equal", "float32 logits vs eager",
                   "vs sdpa"], rows)
            + f"\n\n{shape}.\n\n" + source(name, result))


def bench(name):
    """One `flax-gpt bench --json` result: each variant's speed and MFU."""
    result = load(name)

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    rows = [[r["variant"], "skipped: " + r["skipped"], "", "", "", ""] if "skipped" in r else
            [r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['median_s']:.2f} s",
             f"{r['speedup']:.2f}x", pct(r["mfu"]), pct(r["mfu_causal"])]
            for r in result["results"]]
    c = result["config"]
    note = (f"Batch {result['batch_size']} x {result['seq_len']} tokens, {result['precision']}, "
            f"{result['device']}; N = {result['matmul_params']:,} matmul parameters, "
            f"{result['flops_per_token'] / 1e9:.2f} GFLOP per token (6N + 12 L d T; causal "
            f"{result['flops_per_token_causal'] / 1e9:.2f}); peak of each variant: {'; '.join(sorted({r.get('peak_source', '-') for r in result['results']}))}; "
            f"config d_model {c['d_model']}, {c['n_layers']} layers, vocabulary {c['vocab_size']:,}")
    return (table(["variant", "tokens/s", "step (median)", f"speed / {result['speedup_of']}", "MFU",
                   "MFU (causal)"], rows)
            + f"\n\n{note}.\n\n" + source(name, result))


RENDERERS = {"false-alarms": false_alarms, "parity": parity, "mutations": mutations,
             "faults": faults, "hf-parity": hf_parity, "bench": bench}


def render(text):
    """`text` with every block rendered from its file."""
    def block(m):
        kind, name = m.group(2), m.group(3)
        if kind not in RENDERERS:
            raise StaleResult(f"unknown table kind {kind!r} (known: {', '.join(RENDERERS)})")
        return m.group(1) + RENDERERS[kind](name) + "\n" + m.group(5)

    return BLOCK.sub(block, text)


def documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a table differs from its file")
    args = p.parse_args(argv)
    differ = []
    try:
        for doc in documents():
            text = doc.read_text()
            new = render(text)
            if new != text:
                differ.append(doc)
                if not args.check:
                    with atomic_file(doc, "w") as f:  # a half-written README never stays
                        f.write(new)
    except StaleResult as e:
        print(f"render_docs: {e}", file=sys.stderr)
        return 2
    if args.check and differ:
        print("render_docs: these differ from their result files (run python scripts/render_docs.py): "
              + ", ".join(str(d.relative_to(ROOT)) for d in differ), file=sys.stderr)
        return 1
    print(("checked " if args.check else "rendered ") + ", ".join(str(d.relative_to(ROOT)) for d in documents()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
