"""Render the measured tables and plots of README.md and docs/*.md from the committed result files.

Every measured table sits between `<!-- render: KIND FILE -->` and `<!-- /render -->`, and is
made here from FILE (under benchmarks/results/), never typed by hand; FILE may be several,
comma-separated, for the kinds that sum up several files (`parity-tiers`, `decode-parity`,
and `headline`, whose files are KIND:FILE). Each table ends with the line saying where its figures come
from: the command, the stack, the commit and the date that FILE records. A result file
without those fields (or the machine) predates the schema: re-run its command, or delete it
and the table.
The kinds with a plot also write a PNG beside FILE (from several files, their names'
common start + `all.png`), made from it and stamped with its sha256, and show it on the
page; the PNG is redrawn when the stamp no longer matches (delete it to redraw it anyway).

    python scripts/render_docs.py            # rewrite the tables and plots
    python scripts/render_docs.py --check    # exit 1 if a table or plot differs from its file
"""

import argparse
import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from flax_gpt.core.files import atomic_file, save_figure  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- render: (\S+) (\S+) -->\n)(.*?)(<!-- /render -->)", re.S)
PROVENANCE = ("command", "commit", "date", "versions", "machine")
STAMP = "source-sha256"  # the PNG text chunk naming the bytes of the file it was drawn from


class StaleResult(Exception):
    """A result file that lacks what its renderer reads."""


def load(name):
    path = RESULTS / name
    if not path.is_file():
        raise StaleResult(f"{path} is missing")
    result = json.loads(path.read_text())
    result = {**result.get("environment", {}), **result}  # a script may keep its record apart
    missing = [k for k in PROVENANCE if k not in result]
    if missing:
        raise StaleResult(f"{path} lacks {', '.join(missing)}: it predates the schema; re-run "
                          f"its command, or delete it and its table")
    return result


def short_commit(result, width):
    """The result's commit cut to `width` hex digits, "+dirty" kept: made with uncommitted
    changes."""
    commit = result["commit"] or "outside git"
    return commit[:width] + ("+dirty" if commit.endswith("+dirty") else "")


def source(name, result):
    v = result["versions"]
    stack = f"python {v['python']}, jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, numpy {v['numpy']}"
    commit = short_commit(result, 12)
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
             "-" if r["passed"] is None else ("pass" if r["passed"] else "FAIL"), r["note"] or "-"]
            for r in result["rows"]]
    verdict = "passed" if result["passed"] else "FAILED"
    return (table(["quantity", "max abs diff (Flax's error, for rows vs float64)", "tolerance", "verdict",
                   "note"], rows)
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

    def gib(x):
        return "-" if x is None else f"{x / 2**30:.2f} GiB"

    rows = [[r["variant"], "skipped: " + r["skipped"], "", "", "", "", "", ""] if "skipped" in r else
            [r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['median_s']:.2f} s",
             f"{r['speedup']:.2f}x", pct(r["mfu"]), pct(r["mfu_causal"]), f"{r['compile_s']:.1f}",
             gib(r.get("peak_memory_bytes"))]
            for r in result["results"]]
    c = result["config"]
    note = (f"Batch {result['batch_size']} x {result['seq_len']} tokens, {result['precision']}, "
            f"{result['device']}; N = {result['matmul_params']:,} matmul parameters, "
            f"{result['flops_per_token'] / 1e9:.2f} GFLOP per token (6N + 12 L d T; causal "
            f"{result['flops_per_token_causal'] / 1e9:.2f}); peak of each variant: {'; '.join(sorted({r.get('peak_source', '-') for r in result['results']}))}; "
            f"config d_model {c['d_model']}, {c['n_layers']} layers, vocabulary {c['vocab_size']:,}")
    return (table(["variant", "tokens/s", "step (median)", f"speed / {result['speedup_of']}", "MFU",
                   "MFU (causal)", "compile s", "peak memory (XLA's; PyTorch's on a GPU only)"], rows)
            + f"\n\n{note}.\n\n" + source(name, result))


def profile(name):
    """scripts/profile_step.py --json: where the time of one train step goes, by part and by
    matmul shape, in both frameworks."""
    r = load(name)
    parts = [[name.replace("  ", "&nbsp;&nbsp;"), f"{t['jax']:.1f}", f"{t['torch']:.1f}"]
             for name, t in r["parts_ms"].items()]
    m = r["matmuls"]
    shapes = [[f"{x['k']} -> {x['n']}", x["count"], f"`{x['form']}`" + ("" if x["in_step"] else " (alternative)"),
               f"{x['jax']:.0f}", f"{x['torch']:.0f}"] for x in m["shapes"]]
    return (table(["forward + backward", "JAX ms", "PyTorch ms"], parts)
            + f"\n\n" + table([f"matmul (M = {m['tokens']} tokens)", "per step", "form", "JAX GFLOP/s",
                                "PyTorch GFLOP/s"], shapes)
            + f"\n\nThe step's matmuls run alone: JAX {m['total_ms']['jax']:.0f} ms, PyTorch "
              f"{m['total_ms']['torch']:.0f} ms (`small`, batch {r['batch_size']}, vocabulary "
              f"{r['config']['vocab_size']:,}).\n\n" + source(name, r))


def layer_errors(result):
    """The layer outputs (embed, layer 0, ...) and, per output, the largest Flax - PyTorch
    difference forward (absolute), backward (the loss's gradient there, relative) and Flax's
    forward error against float64; a list is empty where the tier does not measure it."""
    rows = {r["quantity"]: r for r in result["rows"]}
    names = [re.sub(" vs float64$", "", q) for q in rows if re.fullmatch(r"(embed|layer \d+) output( vs float64)?", q)]
    names = list(dict.fromkeys(names))
    backward = next((r["figures"]["per_layer_rel"] for q, r in rows.items() if q.startswith("output gradients")), {})
    forward = [rows[q]["max_abs"] for q in names if q in rows]
    truth = [rows[f"{q} vs float64"]["max_abs"] for q in names if f"{q} vs float64" in rows]
    return names, forward, [backward[q] for q in names if q in backward], truth


def layer_panel(ax, result):
    names, forward, backward, truth = layer_errors(result)
    series = [(forward, "o-", "forward: |flax - torch| of the output"),
              (backward, "s--", "backward: gradient at the output, relative"),
              (truth, "^:", "forward: flax's error against float64")]
    for i, (values, style, label) in enumerate(series):  # one colour per series in every panel
        if not values:
            continue
        shown = [(x, v) for x, v in enumerate(values) if v > 0]  # an exact 0 has no place on a log axis
        ax.semilogy(*(zip(*shown) if shown else ([], [])), style, color=f"C{i}", label=label)
        for x, v in enumerate(values):
            if v == 0:
                ax.annotate("0 (exact)", (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 4 + 12 * i),
                            textcoords="offset points", ha="center", fontsize=7, color=f"C{i}")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_title(f"{result['config']['n_layers']} layers, d_model {result['config']['d_model']}, "
                 f"{result['precision']}", fontsize=9)
    ax.legend(fontsize=6)


def parity_plot(results, path):
    """One panel per parity result: its error per layer output, forward and backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols + 1, 3.6 * rows), squeeze=False, sharey=True)
    for ax, result in zip(axes.flat, results):
        layer_panel(ax, result)
    for row in axes:
        row[0].set_ylabel("max difference")
    fig.suptitle("parity per layer output")
    fig.tight_layout()
    save_figure(fig, path)


def parity_tiers(names):
    """Several `flax-gpt parity --json` results side by side, one column per precision: the
    largest difference of each kind between the frameworks, and Flax's against the float64
    truth (the rows that judge the tiers below float64)."""
    results = [(name, load(name)) for name in names]
    layer = r"(embed|layer \d+) output"
    kinds = [("layer outputs, Flax - PyTorch", layer),
             ("logits, Flax - PyTorch", r"logits(: flax - torch)?"),
             ("loss, Flax - PyTorch", r"loss(: flax - torch)?"),
             ("gradients, Flax - PyTorch", r"gradients \(\d+ tensors\)"),
             ("train loss per step, Flax - PyTorch", r"train loss, (each of )?\d+ AdamW steps(: flax - torch)?"),
             ("layer outputs, Flax's error against float64", layer + " vs float64"),
             ("logits, against float64", r"logits vs float64"),
             ("gradients (relative), against float64", r"gradients \(\d+ tensors, relative\) vs float64"),
             ("train loss (10-step medians), against float64", r"train loss vs float64.*"),
             ("parameters after training (relative), against float64",
              r"parameters after \d+ steps \(relative\) vs float64")]

    def worst(result, pattern):
        rows = [r for r in result["rows"] if re.fullmatch(pattern, r["quantity"])]
        return f"{max(r['max_abs'] for r in rows):.1e}" if rows else "-"

    rows = [[label, *(worst(r, pattern) for _, r in results)] for label, pattern in kinds]
    rows.append(["verdict", *("passed" if r["passed"] else "FAILED" for _, r in results)])
    return (table(["largest difference", *(r["precision"] for _, r in results)], rows)
            + "\n\n" + "\n\n".join(source(name, r) for name, r in results))


def compare(name):
    """One `flax-gpt compare --json` report: each trainer's losses, and compare's judgement."""
    result = load(name)
    runs = result["frameworks"]
    labels = {"flax": "Flax", "torch": "PyTorch", "torch-1ulp": "PyTorch, weights one ulp away"}

    def last_val(run):
        return f"{run['val'][-1]['val_loss']:.4f} (step {run['val'][-1]['step']})" if run["val"] else "-"

    rows = [[labels.get(k, k), f"{r['loss'][-1]:.4f}", last_val(r), f"{r['seconds']:.0f} s",
             f"{r['tokens_per_s']:,.0f}"] for k, r in runs.items()]
    j = result["judgement"]
    if "bounds" in j:
        over = [i for i, (g, b) in enumerate(zip(j["window_gap"], j["bounds"])) if g > b]
        width = result["steps"] // len(j["bounds"])
        said = (f"{len(j['bounds']) - len(over)} of {len(j['bounds'])} windows within the bound"
                + ("" if not over else "; over it: " + ", ".join(
                    f"steps {i * width + 1}-{(i + 1) * width} ({j['window_gap'][i]:.1e} against "
                    f"{j['bounds'][i]:.1e})" for i in over)))
    else:
        said = f"worst {j['worst']:.1e}" if "worst" in j else "not judged"
    c, t = result["config"], result["train"]
    verdict = {True: "passed", False: "FAILED", None: "not judged"}[j["passed"]]
    return (table(["trainer", "final train loss", "val loss", "wall seconds (shared machine)", "tokens/s"], rows)
            + f"\n\n{result['steps']} steps, batch {t['batch_size']} x {c['seq_len']}, lr {t['lr']:g}, "
              f"{result['precision']}; d_model {c['d_model']}, {c['n_layers']} layers, vocabulary "
              f"{c['vocab_size']:,}; unigram baseline {result['unigram_baseline_loss']:.4f}. "
              f"Largest |flax - torch| {result['max_abs_loss_diff']:.1e}"
              + (f", |torch - torch one ulp away| {result['noise_floor']['max_abs_loss_diff']:.1e}"
                 if result.get("noise_floor") else "")
            + f".\n\ncompare's judgement ({j['rule']}): **{verdict}**, {said}.\n\n"
            + source(name, result))


def compare_plot(result, path):
    from flax_gpt.sidebyside import compare as sidebyside

    loss = {k: np.asarray(r["loss"]) for k, r in result["frameworks"].items()}
    floor = result.get("noise_floor")
    sidebyside.plot(path, result["frameworks"], np.abs(loss["flax"] - loss["torch"]),
                    result["unigram_baseline_loss"], None if floor is None else np.asarray(floor["loss_diff"]))


def bench_plot(result, path):
    from flax_gpt.sidebyside import bench as sidebyside

    sidebyside.plot(path, [result])


def bench_decode(name):
    """One `flax-gpt bench-decode --json` result: per batch size and context, each variant."""
    result = load(name)

    def ms(s):
        return f"{1000 * s:,.1f}"

    rows = []
    for shape in result["shapes"]:
        for r in shape["results"]:
            where = [shape["batch_size"], shape["context"], r["variant"]]
            rows.append(where + ["skipped: " + r["skipped"]] + [""] * 8 if "skipped" in r else
                        where + [f"{r['compile_s']:.1f}", ms(r["ttft_s"]), f"{r['prefill_tokens_per_s']:,.0f}",
                                 ms(r["tpot_s"]), f"{r['decode_tokens_per_s']:,.0f}", ms(r["uncached_tpot_s"]),
                                 f"{r['cache_speedup']:.1f}x", f"{r['speedup']:.2f}x",
                                 f"{100 * r['bandwidth_fraction']:.0f}%"])
    c = result["config"]
    note = (f"{result['new_tokens']} new tokens, {result['rounds']} rounds, greedy, random weights; "
            f"d_model {c['d_model']}, {c['n_layers']} layers, vocabulary {c['vocab_size']:,}; PyTorch on "
            f"{result['torch_threads']} thread(s), {result['cpu_count']} CPUs; memory bandwidth measured "
            f"{result['memory_bandwidth_bytes_per_s']['best'] / 1e9:.1f} GB/s; load average "
            f"{min(min(a) for a in result['load_average']):.1f} to {max(max(a) for a in result['load_average']):.1f}"
            + ("" if result["complete"] else "; the run was stopped part-way (`complete: false`)"))
    return (table(["batch", "context", "variant", "compile s", "TTFT ms", "prefill tok/s", "TPOT ms",
                   "decode tok/s", "uncached TPOT ms", "cache gain", f"speed / {result['shapes'][0]['speedup_of']}",
                   "of bandwidth"], rows)
            + f"\n\n{note}.\n\n" + source(name, result))


def bench_decode_plot(result, path):
    from flax_gpt.sidebyside import decode_bench

    decode_bench.plot(path, result)


def equivalence(name):
    """scripts/ddp_equivalence.py: PyTorch on several ranks against one process."""
    r = load(name)
    t = r["train"]
    return (table(["ranks", "sharding", "steps", "worst step, loss", "validation loss",
                   "parameters after training"],
                  [[r["nproc"], r["sharding"].upper(), r["steps"], f"{r['max_loss_diff']:.1e}",
                    f"{r['max_val_loss_diff']:.1e}", f"{r['max_param_diff']:.1e}"]])
            + f"\n\nAgainst one process on the same global batches (`tiny`, batch {t['batch_size']} as "
              f"{t['grad_accum']} micro-batches, lr {t['lr']:g}, synthetic tokens), every figure the "
              f"largest absolute difference.\n\n" + source(name, r))


def decode_parity(names):
    """Several `flax-gpt decode-parity --json` results, one row per precision."""
    results = [(name, load(name)) for name in names]
    rows = []
    for _, r in results:
        steps = len(r["step_logits_diff"])
        tokens = (f"the same at all {steps} steps" if r["agree"] else
                  f"part at step {r['first_mismatch']}" if r["first_mismatch"] is not None else "NaN in the logits")
        rows.append([r["precision"], tokens, f"{r['max_logits_diff']:.1e}", f"{min(r['step_top2_gap']):.2e}",
                     "none" if r["first_near_tie"] is None else f"step {r['first_near_tie']}", r["slides"]])
    r = results[0][1]
    return (table(["precision", "tokens", "max \\|logits Flax - PyTorch\\|", "smallest top-two gap",
                   "first near tie", "window slides"], rows)
            + f"\n\n{len(r['prompts'])} prompts in one ragged batch, {r['max_new_tokens']} new tokens each; "
              f"steps count from 0.\n\n" + "\n\n".join(source(name, r) for name, r in results))


def decode_parity_plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, r in enumerate(results):
        ax.semilogy(r["step_logits_diff"], color=f"C{i}", label=f"{r['precision']}: max |logits flax - torch|")
    ax.semilogy(results[0]["step_top2_gap"], color="k", lw=0.8, label="smallest top-two gap (PyTorch's logits)")
    ax.set_xlabel("decode step")
    ax.set_ylabel("logits")
    ax.set_title("decoding in both frameworks: difference against the margin of the greedy choice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def gpt2_text(name):
    """scripts/gpt2_text.py: a GPT-2-style `tiny` trained with GPT-2's BPE, and its samples."""
    r = load(name)
    e, d = r["eval"], r["dataset"]
    valid = sum(sample["valid_utf8"] for sample in r["samples"])
    return (table(["steps", "batch", "val loss per token", "bits per byte", "perplexity per byte",
                   "samples that decode as valid UTF-8"],
                  [[r["steps"], f"{r['batch_size']} x {r['seq_len']}", f"{e['loss']:.3f}",
                    f"{e['bits_per_byte']:.2f}", f"{e['perplexity_per_byte']:.2f}",
                    f"{valid} of {len(r['samples'])}"]])
            + f"\n\nVocabulary {d['vocab_size']:,}; {d['train_tokens']:,} training tokens "
              f"({d['train_bytes']:,} bytes), {e['tokens']:,} validation tokens evaluated "
              f"({e['bytes']:,} bytes).\n\n" + source(name, r))


# ---- the headline table: one row per result file, each linking to its page -----------------

def headline_parity(r):
    tier = "float64 (the truth)" if r["precision"] == "float64" else r["precision"]
    rows = {x["quantity"]: x["max_abs"] for x in r["rows"]}
    said = f"Flax - PyTorch logits {rows.get('logits', rows.get('logits: flax - torch')):.0e}"
    if "logits vs float64" in rows:
        said += f", Flax's logits {rows['logits vs float64']:.0e} from float64"
    return (f"parity, {r['config']['n_layers']}-layer model, {tier}",
            f"{'passed' if r['passed'] else 'FAILED'}: {said}", "parity.md")


def headline_compare(r):
    j = r["judgement"]
    said = ("" if "bounds" not in j else
            f" ({sum(g <= b for g, b in zip(j['window_gap'], j['bounds']))} of {len(j['bounds'])} windows)")
    return (f"compare, {r['steps']} steps, {r['config']['n_layers']}-layer model",
            f"largest loss gap {r['max_abs_loss_diff']:.1e}; judged against the noise floor: "
            f"{'passed' if j['passed'] else 'failed'}{said}", "training.md")


def headline_bench(r):
    rate = {x["variant"]: x for x in r["results"] if "skipped" not in x}
    flax = rate[r["speedup_of"]]
    others = ", ".join(f"{k} {x['speedup']:.2f}x" for k, x in rate.items() if k.startswith("torch"))
    return (f"train step, {r['config']['n_layers']}-layer model, batch {r['batch_size']}, {r['device']}",
            f"{r['speedup_of']} {flax['tokens_per_s']:,.0f} tokens/s; speed relative to it: {others}",
            "benchmarks.md")


def headline_bench_decode(r):
    shape = r["shapes"][0]
    rate = {x["variant"]: x for x in shape["results"] if "skipped" not in x}
    name = shape["speedup_of"]
    torch = {k: x for k, x in rate.items() if k.startswith("torch")}
    best = max(torch, key=lambda k: torch[k]["bandwidth_fraction"])
    others = ", ".join(f"{k} {x['speedup']:.2f}x" for k, x in torch.items())
    return (f"decoding, {r['config']['n_layers']}-layer model, batch {shape['batch_size']}",
            f"{name} {rate[name]['decode_tokens_per_s']:,.0f} tokens/s, {100 * rate[name]['bandwidth_fraction']:.0f}% "
            f"of the memory bandwidth (PyTorch's best, {best}: {100 * torch[best]['bandwidth_fraction']:.0f}%); "
            f"speed relative to it: {others}", "inference.md")


def headline_decode_parity(r):
    said = (f"same tokens at all {len(r['step_logits_diff'])} steps" if r["agree"] else
            f"tokens part at step {r['first_mismatch']}")
    return (f"greedy decoding in both frameworks, {r['precision']}",
            f"{said}; logits within {r['max_logits_diff']:.0e}", "inference.md")


def headline_equivalence(r):
    return (f"{r['sharding'].upper()} on {r['nproc']} ranks against one process",
            f"loss within {r['max_loss_diff']:.0e}, parameters within {r['max_param_diff']:.0e}", "devices.md")


def headline_false_alarms(r):
    return ("parity on correct code (false alarms)",
            f"{sum(not x['passed'] for x in r['runs'])} false alarms in {len(r['runs'])} runs", "parity.md")


def headline_mutations(r):
    n = len({o["mutation"] for o in r["outcomes"]})
    return ("planted bugs", f"{n - len(r['missed'])} of {n} caught where expected, and located", "parity.md")


HEADLINES = {"false-alarms": headline_false_alarms, "mutations": headline_mutations,
             "parity": headline_parity, "compare": headline_compare, "bench": headline_bench,
             "bench-decode": headline_bench_decode, "decode-parity": headline_decode_parity,
             "equivalence": headline_equivalence}


def headline(names):
    rows = []
    for pair in names:
        kind, name = pair.split(":", 1)
        result = load(name)
        what, figure, page = HEADLINES[kind](result)
        rows.append([f"[{what}](docs/{page})", figure,
                     f"[`{name}`](benchmarks/results/{name}), {short_commit(result, 7)}, {result['date'][:10]}"])
    return table(["what", "measured", "from"], rows)


# the kinds whose FILE is a comma-separated list
MULTI = {"parity-tiers": parity_tiers, "decode-parity": decode_parity, "headline": headline}
RENDERERS = {"false-alarms": false_alarms, "parity": parity, "mutations": mutations,
             "faults": faults, "hf-parity": hf_parity, "bench": bench, "compare": compare,
             "bench-decode": bench_decode, "equivalence": equivalence, "gpt2-text": gpt2_text,
             "profile": profile}
PLOTS = {"parity": lambda result, path: parity_plot([result], path), "parity-tiers": parity_plot,
         "compare": compare_plot, "bench": bench_plot, "bench-decode": bench_decode_plot,
         "decode-parity": decode_parity_plot}


def figure(kind, name):
    """The PNG a plotting kind draws from result file `name`: beside it (`compare`'s under the
    name `flax-gpt compare` gives it); from several files, their names' common start + `all`."""
    names = name.split(",")
    if len(names) > 1:
        return RESULTS / (os.path.commonprefix([Path(n).stem for n in names]) + "all.png")
    path = RESULTS / name
    return path.parent / "loss.png" if kind == "compare" else path.with_suffix(".png")


def digest(name):
    """sha256 of the bytes of the result file(s) `name` (comma-separated), in order."""
    h = hashlib.sha256()
    for n in name.split(","):
        h.update((RESULTS / n).read_bytes())
    return h.hexdigest()


def draw(kind, name):
    """Write the figure of (kind, name) from its file and stamp it with the file's sha256."""
    from PIL import Image, PngImagePlugin

    path = figure(kind, name)
    results = [load(n) for n in name.split(",")]
    PLOTS[kind](results if kind in MULTI else results[0], path)
    info = PngImagePlugin.PngInfo()
    info.add_text(STAMP, digest(name))
    info.add_text("Source", " ".join(source(n, r) for n, r in zip(name.split(","), results)))
    with Image.open(path) as image:
        image.load()
    with atomic_file(path) as f:
        image.save(f, format="png", pnginfo=info)


def stale_figures(text):
    """(kind, name, why) for each figure of `text`'s blocks that is missing or was drawn from
    other bytes than its file holds now."""
    from PIL import Image

    stale = []
    for m in BLOCK.finditer(text):
        kind, name = m.group(2), m.group(3)
        if kind not in PLOTS:
            continue
        path = figure(kind, name)
        if not path.is_file():
            stale.append((kind, name, f"{os.path.relpath(path, ROOT)} is missing"))
            continue
        with Image.open(path) as image:
            if image.text.get(STAMP) != digest(name):
                stale.append((kind, name, f"{os.path.relpath(path, ROOT)} was not drawn from {name} as it is now"))
    return stale


def render(text, base="benchmarks/results/"):
    """`text` with every block rendered from its file; `base` is where the results folder is
    seen from the page (links are made from the repository's root)."""
    def block(m):
        kind, name = m.group(2), m.group(3)
        if kind not in RENDERERS and kind not in MULTI:
            raise StaleResult(f"unknown table kind {kind!r} (known: {', '.join([*RENDERERS, *MULTI])})")
        try:
            body = MULTI[kind](name.split(",")) if kind in MULTI else RENDERERS[kind](name)
        except KeyError as e:  # a file of an older schema than its renderer reads
            raise StaleResult(f"{name} lacks {e}, which the {kind} table reads: it predates the "
                              f"schema; re-run its command, or delete it and its table") from None
        if kind in PLOTS:
            png = os.path.relpath(figure(kind, name), RESULTS)
            body = f"![{kind}: {png}](benchmarks/results/{png})\n\n" + body
        if base != "benchmarks/results/":
            body = body.replace("](benchmarks/results/", f"]({base}").replace("](docs/", "](")
        return m.group(1) + body + "\n" + m.group(5)

    return BLOCK.sub(block, text)


def base_of(doc):
    return os.path.relpath(RESULTS, doc.parent) + "/"


def documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a table or plot differs from its file")
    args = p.parse_args(argv)
    differ = []
    try:
        for doc in documents():
            text = doc.read_text()
            new = render(text, base_of(doc))
            if new != text:
                differ.append(str(doc.relative_to(ROOT)))
                if not args.check:
                    with atomic_file(doc, "w") as f:  # a half-written README never stays
                        f.write(new)
            for kind, name, why in stale_figures(new):
                if args.check:
                    differ.append(why)
                else:
                    draw(kind, name)
    except StaleResult as e:
        print(f"render_docs: {e}", file=sys.stderr)
        return 2
    if args.check and differ:
        print("render_docs: these differ from their result files (run python scripts/render_docs.py): "
              + ", ".join(differ), file=sys.stderr)
        return 1
    print(("checked " if args.check else "rendered ") + ", ".join(str(d.relative_to(ROOT)) for d in documents()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
