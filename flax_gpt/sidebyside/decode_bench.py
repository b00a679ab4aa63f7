"""`flax-gpt bench-decode`: inference speed of each variant side by side, with the key/value
cache and without it, beside the memory-bandwidth bound.

For each batch size B and context length C, the model is the config with seq_len = C +
`new_tokens` (random weights, vocabulary padded as the train bench pads it), and every row's
prompt is C random tokens. Each variant runs the real generation code of flax_gpt.sample /
torch_reference.sample, greedy: Flax fp32 / bf16 with the whole generation on the device
(`flax-loop`: flax_gpt.sample.Loop, what flax_gpt.generate runs) and with one jitted call per
token (`flax-step`), PyTorch eager fp32 / bf16 autocast and torch.compile fp32 / bf16 (on a
GPU its decode step a CUDA graph over a static cache), one call per token:

- prefill: the C-token prompts encoded and the first token drawn, on the host. Its time is
  the time to first token (TTFT); B * C over it is the prefill tokens/s;
- cached decode: `new_tokens` one-token steps at positions C, C + 1, ...: the time per
  output token (TPOT) is the median step, each ending with its tokens on the host, or, for
  flax-loop, the one call that runs them all over `new_tokens`; B over it is the decode
  tokens/s;
- uncached decode: the same steps as the full forward of each row's window (fixed shape
  (B, seq_len), what generation did before the cache); `cache_speedup` is its median step
  time over the cached one.

Every variant is built and run once untimed (`compile_s`: jit, torch.compile or eager
warm-up), then `rounds` rounds time all of them in turn, so that a drifting machine slows all
alike; `speedup` compares each variant's decode with the first variant's round by round (the
median of per-round ratios), as the train bench does.

**The bound.** A decode step must read every weight of the Linear layers once (stored
float32 in every variant: bf16 casts them on the fly) and each row's cached keys and values
up to its position: bytes = 4 N + B * L * 2 * d * (position + 1) * (cache item size), at the
middle of the timed steps (N as in bench.matmul_params). `achieved_bytes_per_s` is that over
TPOT, `bandwidth_fraction` it over the machine's memory bandwidth, measured on the spot as
the best large-array copy (numpy, one thread, and PyTorch, all threads; 2 x bytes per copy),
and `bound_tokens_per_s` = B * bandwidth / bytes the decode speed that reading alone allows.
A model whose weights fit in the CPU's last-level cache can beat it.
"""

import contextlib
import os
import statistics
import sys
import time

import numpy as np

from flax_gpt.core import generation
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.files import check_writable, save_figure, write_json
from flax_gpt.core.streams import synthetic_batch
from flax_gpt.sidebyside.bench import Crash, Skip, kind, matmul_params, not_run, pad_vocab, select_variants

VARIANTS = ("flax-loop-fp32", "flax-loop-bf16", "flax-step-fp32", "flax-step-bf16", "torch-eager-fp32",
            "torch-eager-bf16",
            "torch-compile-fp32", "torch-compile-bf16")
BANDWIDTH_BYTES = 256 * 2 ** 20  # per copy: far past any CPU cache


def memory_bandwidth(repeats=5):
    """Bytes/s of the best of `repeats` copies of a 256 MiB array (read + write counted),
    in numpy (one thread) and PyTorch (its threads): {"numpy": ..., "torch": ..., "best": ...}."""
    import torch

    src = np.ones(BANDWIDTH_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    t_src, t_dst = torch.from_numpy(src).clone(), torch.empty_like(torch.from_numpy(src))
    out = {}
    for name, copy in (("numpy", lambda: np.copyto(dst, src)), ("torch", lambda: t_dst.copy_(t_src))):
        copy()
        best = min(_timed(copy) for _ in range(repeats))
        out[name] = 2 * BANDWIDTH_BYTES / best
    out["best"] = max(out.values())
    return out


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_bytes(config, batch_size, position, cache_itemsize):
    """Bytes a decode step must read: float32 Linear weights once, and each row's keys and
    values at positions 0..position."""
    cache = batch_size * config.n_layers * 2 * config.d_model * (position + 1) * cache_itemsize
    return 4 * matmul_params(config) + cache


# ---- variants -----------------------------------------------------------------------------

class DecodeVariant:
    """A built decoder (flax_gpt.sample.FlaxDecoder or torch_reference.sample.TorchDecoder)
    and the context its steps run in (autocast for PyTorch bf16)."""

    def __init__(self, decoder, context, cache_itemsize):
        self.decoder, self.context, self.cache_itemsize = decoder, context, cache_itemsize
        self.ttft, self.tpot, self.uncached = [], [], []  # seconds: per round, per step, per step

    def run(self, ids, steps, seq_len, timed=True):
        """One prefill, `steps` cached decode steps and `steps` uncached ones. A decoder that
        runs its loop on the device (`loop`) runs the prefill and first token in one call and
        the decode steps in another: its TPOT is that call's time over `steps`, one figure
        per round."""
        B, C = ids.shape
        lengths, u, d = np.full(B, C, np.int32), np.zeros(B), self.decoder
        windows = generation.pad(ids, seq_len)
        with self.context():
            if getattr(d, "loop", False):
                start = time.perf_counter()
                first = d.start(ids, lengths, windows, np.zeros((steps + 1, B)), 1, None, 1)  # (1, B)
                ttft = [time.perf_counter() - start]
                start = time.perf_counter()
                drawn = d.resume(steps + 1)  # (steps, B): every decode step in one call
                tpot = [(time.perf_counter() - start) / steps]
                windows[:, C:C + steps] = np.concatenate([first, drawn[:-1]]).T  # what the steps fed
            else:
                start = time.perf_counter()
                tokens, _ = d.prefill(ids, lengths, u)
                ttft = [time.perf_counter() - start]
                tpot = []
                for i in range(steps):
                    windows[:, C + i] = tokens  # the token this step feeds, for the uncached steps
                    start = time.perf_counter()
                    tokens, _ = d.decode(tokens, lengths + i, u)
                    tpot.append(time.perf_counter() - start)
            uncached = []
            for i in range(steps):
                start = time.perf_counter()
                d.forward(windows, lengths + i + 1, u)
                uncached.append(time.perf_counter() - start)
        if timed:
            self.ttft += ttft
            self.tpot.append(tpot)
            self.uncached.append(uncached)


def build(name, config, tensors, device):
    from flax_gpt.core.generation import Sampling

    framework, dtype = kind(name)
    greedy = Sampling(temperature=0)
    if framework == "flax":
        import jax.numpy as jnp
        from flax import nnx

        from flax_gpt import model as flax_model
        from flax_gpt.sample import FlaxDecoder

        compute = jnp.bfloat16 if dtype == "bf16" else jnp.float32
        model = flax_model.GPT(config, rngs=nnx.Rngs(0), dtype=compute)
        flax_model.set_canonical(model, tensors)
        model.eval()
        return DecodeVariant(FlaxDecoder(model, greedy, loop="loop" in name), contextlib.nullcontext,
                             jnp.dtype(compute).itemsize)
    import torch

    from torch_reference import model as torch_model
    from torch_reference import precision as torch_precision
    from torch_reference.sample import TorchDecoder

    compile = "compile" in name
    if compile:
        try:
            import torch._dynamo  # noqa: F401
        except ImportError as e:
            raise Skip(f"torch.compile unavailable: {e}") from None
    model = torch_model.GPT(config)
    torch_model.set_canonical(model, tensors)
    model = model.to(device).eval()
    precision = "bf16" if dtype == "bf16" else "highest"
    context = lambda: torch_precision.autocast(precision, torch.device(device).type)  # noqa: E731
    return DecodeVariant(TorchDecoder(model, greedy, compile=compile), context, 2 if dtype == "bf16" else 4)


# ---- one shape, every variant --------------------------------------------------------------

def bench_shape(config, *, batch_size, context, new_tokens, variants, rounds, device, seed=0):
    """The report of one batch size and context length (see the module's docstring)."""
    import gc

    seq_len = context + new_tokens
    config = config.replace(seq_len=seq_len)
    from flax_gpt.sidebyside.pair import random_weights

    tensors = random_weights(config, seed)
    ids = synthetic_batch(config.vocab_size, batch_size, context, seed)[0]
    built, results = {}, {}
    for name in variants:
        print(f"  building {name} (batch {batch_size}, context {context}) ...", file=sys.stderr, flush=True)
        gc.collect()
        try:
            variant = build(name, config, tensors, device)
            start = time.perf_counter()
            variant.run(ids, new_tokens, seq_len, timed=False)
            built[name] = variant
            results[name] = {"compile_s": time.perf_counter() - start}
        except Skip as e:
            results[name] = not_run(e)
        except Exception as e:  # reported beside the others, and a failure of the benchmark
            results[name] = not_run(Crash(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    for r in range(rounds):
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for variant in built.values():
            variant.run(ids, new_tokens, seq_len)
    first = next(iter(built.values()), None)
    position = context + new_tokens // 2
    for name, v in built.items():
        tpot, uncached = statistics.median(np.ravel(v.tpot)), statistics.median(np.ravel(v.uncached))
        ttft = statistics.median(v.ttft)
        per_round = np.median(first.tpot, axis=1) / np.median(v.tpot, axis=1)
        nbytes = step_bytes(config, batch_size, position, v.cache_itemsize)
        results[name].update(
            ttft_s=ttft, prefill_tokens_per_s=batch_size * context / ttft,
            tpot_s=tpot, tpot_p10_s=float(np.percentile(v.tpot, 10)),
            tpot_p90_s=float(np.percentile(v.tpot, 90)), decode_tokens_per_s=batch_size / tpot,
            uncached_tpot_s=uncached, uncached_tokens_per_s=batch_size / uncached,
            cache_speedup=uncached / tpot, speedup=float(np.median(per_round)),
            bytes_per_step=nbytes, achieved_bytes_per_s=nbytes / tpot,
            round_tpot_s=[float(t) for t in np.median(v.tpot, axis=1)])
    return {"batch_size": batch_size, "context": context, "seq_len": seq_len,
            "new_tokens": new_tokens, "rounds": rounds, "speedup_of": next(iter(built), None),
            "results": [{"variant": name, **results[name]} for name in variants]}


def ratios(shape, numerator="flax-loop-fp32", denominators=("torch-eager-fp32", "torch-compile-fp32")):
    """Decode speed of `numerator` over each of `denominators` in one shape's report: the
    median over rounds of their per-round TPOT ratios, as `speedup` is."""
    rounds = {r["variant"]: np.asarray(r["round_tpot_s"]) for r in shape["results"] if "round_tpot_s" in r}
    return {f"{numerator} / {d}": float(np.median(rounds[d] / rounds[numerator])) for d in denominators
            if numerator in rounds and d in rounds}


# ---- the whole benchmark ------------------------------------------------------------------

def run(config, *, batch_sizes, contexts, new_tokens=16, variants=VARIANTS, skip=(), rounds=3,
        device="cpu", pad=True, torch_threads=None, json_path=None, on_shape=None):
    """`bench_shape` at every (batch size, context length), one after another; returns the
    report dict (rewritten to `json_path` after each shape, `complete` False until the end).
    `torch_threads` sets PyTorch's intra-op threads (default: its own choice). `on_shape(report,
    shape)` gets each shape's report when it is done."""
    import torch

    from flax_gpt import experiments
    from flax_gpt.sidebyside.pair import apply_precision, environment

    variants = select_variants(variants, skip, known=VARIANTS)
    if not batch_sizes or min(batch_sizes) < 1 or not contexts or min(contexts) < 1 or new_tokens < 1:
        raise FlaxGPTError(f"batch sizes, contexts and new tokens must be positive integers, got "
                           f"{batch_sizes}, {contexts}, {new_tokens}")
    if json_path:
        check_writable(json_path, "--json")
    device = experiments.torch_device(device)
    if pad:
        config = config.replace(vocab_size=pad_vocab(config.vocab_size))
    # one shape's variants stay built together; the largest shape bounds them all
    experiments.check_memory(config.replace(seq_len=max(contexts) + new_tokens), max(batch_sizes),
                             "decoding " + ", ".join(variants), training=False, kv_cache=True,
                             places=[(kind(v)[0], device) for v in variants],
                             hint="use smaller --contexts, --new-tokens or --batch-sizes, or a "
                                  "smaller model")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    record = apply_precision("highest")
    print("measuring memory bandwidth ...", file=sys.stderr, flush=True)
    bandwidth = memory_bandwidth()
    report = {"config": config.to_dict(), "new_tokens": new_tokens, "rounds": rounds,
              "variants": variants, "memory_bandwidth_bytes_per_s": bandwidth,
              "matmul_params": matmul_params(config), "shapes": [], "complete": False,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average": [list(os.getloadavg())],  # a shared machine's load, at the start and after each shape
              **environment(record, torch_device=device)}
    shapes = [(b, c) for c in contexts for b in batch_sizes]
    for b, c in shapes:
        shape = bench_shape(config, batch_size=b, context=c, new_tokens=new_tokens,
                            variants=variants, rounds=rounds, device=device)
        for r in shape["results"]:
            if "achieved_bytes_per_s" in r:
                r["bandwidth_fraction"] = r["achieved_bytes_per_s"] / bandwidth["best"]
                r["bound_tokens_per_s"] = b * bandwidth["best"] / r["bytes_per_step"]
        shape["flax_over_torch"] = ratios(shape)
        report["load_average"].append(list(os.getloadavg()))
        report["shapes"].append(shape)
        report["complete"] = len(report["shapes"]) == len(shapes)
        if json_path:
            write_json(json_path, report)
        if on_shape:
            on_shape(report, shape)
    return report


def plot(path, report):
    """Decode tokens/s against batch size, one panel per context: each variant cached (solid)
    and uncached (dashed), and the bandwidth bound of fp32 (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({s["context"] for s in report["shapes"]})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        shapes = sorted((s for s in report["shapes"] if s["context"] == context), key=lambda s: s["batch_size"])
        for i, name in enumerate(report["variants"]):
            rows = [(s["batch_size"], r) for s in shapes for r in s["results"]
                    if r["variant"] == name and "skipped" not in r]
            if not rows:
                continue
            sizes = [b for b, _ in rows]
            ax.plot(sizes, [r["decode_tokens_per_s"] for _, r in rows], marker="o", color=f"C{i}", label=name)
            ax.plot(sizes, [r["uncached_tokens_per_s"] for _, r in rows], marker="x", ls="--", color=f"C{i}")
        bound = [(s["batch_size"], r["bound_tokens_per_s"]) for s in shapes for r in s["results"]
                 if r["variant"].endswith("fp32") and "bound_tokens_per_s" in r]
        if bound:
            ax.plot(*zip(*sorted(dict(bound).items())), ls=":", color="k", label="bandwidth bound (fp32)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s (solid: cached, dashed: uncached)")
        ax.set_title(f"context {context}, {report['new_tokens']} new tokens")
        ax.legend(fontsize=7)
    fig.suptitle(f"decode, d_model {report['config']['d_model']}, {report['config']['n_layers']} layers, "
                 f"{report['jax_device']}")
    fig.tight_layout()
    save_figure(fig, path)
