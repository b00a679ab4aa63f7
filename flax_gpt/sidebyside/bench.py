"""`flax-gpt bench`: the real train step of each variant, timed side by side in one process.

Every variant runs forward, backward and the AdamW update of the same model config and batch,
on synthetic tokens already on the device. Each variant is built, compiled (timed apart) and
warmed up with `warmup` untimed steps; then `rounds` rounds each time `steps` steps of every
variant in turn, so that a machine whose speed drifts (a shared VM, a GPU warming up) slows
all variants alike instead of whichever ran last. `speedup` compares each variant with the
first one round by round (the median over rounds of the first's median step time divided by
this one's), which cancels drift slower than a round. Each step is closed by a device sync
(`block_until_ready` / `torch.cuda.synchronize`); the loss is read once, after the last step.

Peak memory: for Flax, the compiled step's own footprint (arguments + outputs + temporaries,
less what donation aliases, from XLA's memory analysis); for PyTorch on a GPU, the allocator's
peak while the variant compiled and warmed up, less what was allocated before it was built.

Model FLOPs per token: 6N + 12·L·d·T (PaLM's formula, attention counted over the full T×T),
and the causal variant 6N + 6·L·d·T. N counts the parameters that take part in matmuls: the
Linear layers (q, k, v, out, fc1, fc2) and the head (`pred`, or the tied token embedding), not
an untied token embedding (a lookup) nor the positional table: for GPT-2 this is nanoGPT's and
llm.c's count (all parameters but the position embedding) less the LayerNorms' 0.02%. The peak: on a known GPU, the table below; on CPU, a
2048x2048 matmul in the variant's framework and dtype, measured after every round, and MFU is
the median over rounds of that round's achieved FLOP/s over its peak, so that a shared CPU's
drift moves numerator and denominator together.
"""

import functools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from flax_gpt import experiments
from flax_gpt.core.config import check_attention, check_number
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.files import check_writable, save_figure, write_json
from flax_gpt.core.hparams import TrainConfig
from flax_gpt.core.streams import synthetic_batch

VARIANTS = ("flax-jit-fp32", "flax-jit-bf16", "flax-nnx-jit-fp32",
            "torch-eager-fp32", "torch-eager-bf16", "torch-compile-fp32", "torch-compile-bf16")


# With --mesh, each sharded variant runs again on one device under this suffixed name: the
# baseline of its scaling efficiency.
ON_ONE_DEVICE = "@1-device"


def kind(name):
    """(framework, dtype) of a variant name: what it runs on, and the peak it is held to."""
    name = name.removesuffix(ON_ONE_DEVICE)
    return ("flax" if name.startswith("flax") else "torch", "bf16" if name.endswith("bf16") else "fp32")

# Dense peak FLOP/s by device-name fragment: (bf16, fp32 without TF32).
PEAK_FLOPS = {
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L4": (121e12, 30.3e12),
}


def matmul_params(config):
    """N of the MFU formula: parameters of the Linear layers and the head (a tied head is
    the token embedding, without bias)."""
    d, f, v, L = config.d_model, config.d_ff, config.vocab_size, config.n_layers
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d)
    return L * per_layer + d * v + (0 if config.tie_embeddings else v)


def flops_per_token(config, seq_len, causal=False):
    attention = (6 if causal else 12) * config.n_layers * config.d_model * seq_len
    return 6 * matmul_params(config) + attention


def pad_vocab(vocab_size, multiple=64):
    return -(-vocab_size // multiple) * multiple


# ---- peaks ----------------------------------------------------------------------------------------

def table_peak(device_name, dtype):
    for fragment, (bf16, fp32) in PEAK_FLOPS.items():
        if fragment in device_name:
            return bf16 if dtype == "bf16" else fp32
    return None


def measured_cpu_peak(framework, dtype, n=2048, repeats=3):
    """FLOP/s of the best of `repeats` n×n matmuls: the ceiling a CPU step can reach."""
    run = _matmul(framework, dtype, n)
    return 2 * n ** 3 / min(_timed(run) for _ in range(repeats))


@functools.cache
def _matmul(framework, dtype, n):
    """A compiled, warmed-up n×n matmul as a no-argument function that waits for its result."""
    if framework == "flax":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), jnp.bfloat16 if dtype == "bf16" else jnp.float32)
        mm = jax.jit(lambda a: a @ a)

        def run():
            mm(a).block_until_ready()
    else:
        import torch

        a = torch.ones((n, n), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)

        def run():
            a @ a
    run()
    return run


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- variants -------------------------------------------------------------------------------------

class Skip(Exception):
    """A variant that cannot run here, with the reason."""


class Crash(Skip):
    """A variant that raised while it was built, compiled or timed: reported beside the
    skipped ones (no figures), but marked `crashed`, a failure of the benchmark."""


def not_run(e):
    """The result of a variant that did not run: its reason, and whether it crashed."""
    return {"skipped": str(e), **({"crashed": True} if isinstance(e, Crash) else {})}


class Variant:
    """One variant, built: `step(i)` runs train step i and returns something `sync` waits on;
    `read_loss()` reads the last loss; `memory()` its peak bytes (None where untracked);
    `state_bytes()` the (parameter, optimizer state) bytes the fullest of its `devices` holds."""

    def __init__(self, step, sync, read_loss, memory, state_bytes=None, devices=1):
        self.step, self.sync, self.read_loss, self.memory = step, sync, read_loss, memory
        self.state_bytes, self.devices = state_bytes or (lambda: (None, None)), devices
        self.times, self.next = [], 0

    def run(self, n, timed):
        """n steps; timed ones are synced one by one, untimed ones once at the end."""
        out = None
        for _ in range(n):
            start = time.perf_counter()
            out = self.step(self.next)
            self.next += 1
            if timed:
                self.sync(out)
                self.times.append(time.perf_counter() - start)
        if n and not timed:
            self.sync(out)


def flax_variant(name, config, tensors, tc, x, y, mesh=None):
    """`mesh` (a jax.sharding.Mesh): the flax-jit variants run on it, laid out as
    `flax-gpt train --mesh` lays out a run (flax_gpt.mesh.Layout)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_gpt import model as flax_model
    from flax_gpt.mesh import Layout, bytes_per_device
    from flax_gpt.train import make_train_step, optimizer

    dtype = jnp.bfloat16 if kind(name)[1] == "bf16" else jnp.float32
    model = flax_model.GPT(config, rngs=nnx.Rngs(0), dtype=dtype, attention=tc.attention)
    flax_model.set_canonical(model, tensors)
    model.train()
    x, y = jax.device_put(jnp.asarray(x)), jax.device_put(jnp.asarray(y))
    tx = optimizer(tc)
    box = {}
    if "nnx-jit" in name and mesh is not None:
        raise Skip("nnx.jit runs on one device: --mesh lays out the flax-jit variants")
    if "nnx-jit" in name:
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def nnx_step(model, opt, x, y):
            def loss_fn(model):
                return flax_model.cross_entropy(model(x[0]), y[0])

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return loss

        def step(i):
            box["loss"] = nnx_step(model, opt, x, y)
            return box["loss"]

        jitted, args = nnx_step, (model, opt, x, y)
    else:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        state = {"params": params, "opt": tx.init(params)}
        key = jax.random.key(0)
        layout = None if mesh is None else Layout(mesh, config, params, tx, x.shape[1])
        if layout:
            state["params"], state["opt"], rest = layout.place(state["params"], state["opt"], rest)
            x, y = jax.device_put(x, layout.batch), jax.device_put(y, layout.batch)
        train_step = make_train_step(graphdef, tx, layout=layout)

        def step(i):  # dropout masks from (0, i), as the trainer draws them from (seed, step)
            state["params"], state["opt"], metrics = train_step(
                state["params"], state["opt"], rest, x, y, jax.random.fold_in(key, i))
            box["loss"] = metrics["loss"]
            return box["loss"]

        jitted, args = train_step, (state["params"], state["opt"], rest, x, y, key)
        # shapes only: on a GPU the first step donates (deletes) these very buffers
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), args)

    def memory():
        m = jitted.lower(*args).compile().memory_analysis()
        if m is None:
            return None
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)

    def state_bytes():
        if "nnx-jit" in name:
            return (max(bytes_per_device(nnx.state(model, nnx.Param)).values()),
                    max(bytes_per_device(nnx.state(opt, nnx.OptState)).values()))
        return (max(bytes_per_device(state["params"]).values()),
                max(bytes_per_device(state["opt"]).values()))

    return Variant(step, lambda out: out.block_until_ready(), lambda: float(box["loss"]), memory,
                   state_bytes, devices=1 if mesh is None else mesh.size)


def torch_variant(name, config, tensors, tc, x, y, device):
    import torch

    from torch_reference.train import TorchBackend

    if "compile" in name:
        try:
            import torch._dynamo  # noqa: F401
        except ImportError as e:
            raise Skip(f"torch.compile unavailable: {e}") from None
    bf16 = kind(name)[1] == "bf16"
    if bf16 and device == "cpu" and not torch.backends.mkldnn.is_available():
        raise Skip("no bf16 kernels on this CPU")
    cuda = device.startswith("cuda")
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    precision_name = "bf16" if bf16 else tc.precision
    backend = TorchBackend(config, tc.replace(precision=precision_name), tensors, device=device)
    if "compile" in name:
        backend.model.forward = torch.compile(backend.model.forward)
    tx, ty = (torch.from_numpy(np.asarray(a)).to(device, torch.long) for a in (x, y))
    box = {}

    def step(i):
        box["out"] = backend.train_step(i, tx, ty)
        return box["out"]

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    def memory():  # called right after warm-up, before any other variant runs again
        return torch.cuda.max_memory_allocated() - before if cuda else None

    def state_bytes():
        optimizer = backend.train_step.optimizer
        return (sum(p.numel() * p.element_size() for p in backend.model.parameters()),
                sum(t.numel() * t.element_size() for s in optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t)))

    return Variant(step, sync, lambda: float(box["out"]["loss"]), memory, state_bytes)


def build_variant(name, config, tensors, tc, x, y, *, warmup, device, mesh=None):
    """(Variant, {"compile_s", "peak_memory_bytes", ...}) compiled and warmed up, or raises
    Skip. `mesh`: the Flax variants' jax.sharding.Mesh."""
    import gc

    gc.collect()
    try:
        if kind(name)[0] == "flax":
            variant = flax_variant(name, config, tensors, tc, x, y, mesh)
        else:
            variant = torch_variant(name, config, tensors, tc, x, y, device)
        start = time.perf_counter()
        variant.run(1, timed=False)  # compile (jit, torch.compile) or eager warm-up
        compile_s = time.perf_counter() - start
        variant.run(warmup, timed=False)
        param_bytes, optimizer_bytes = variant.state_bytes()
        return variant, {"compile_s": compile_s, "peak_memory_bytes": variant.memory(),
                         "devices": variant.devices, "param_bytes_per_device": param_bytes,
                         "optimizer_bytes_per_device": optimizer_bytes}
    except Skip:
        raise
    except Exception as e:  # reported, and the other variants still run; a failure all the same
        raise Crash(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}") from None


def summary(variant, tokens):
    times = variant.times
    median = statistics.median(times)
    return {"median_s": median, "p10_s": float(np.percentile(times, 10)),
            "p90_s": float(np.percentile(times, 90)), "tokens_per_s": tokens / median,
            "tokens_per_s_per_device": tokens / median / variant.devices,
            "loss": variant.read_loss(), "timed_steps": len(times)}


# ---- the whole benchmark ------------------------------------------------------------------------

def bench(config, *, batch_size, variants, warmup=10, steps=20, rounds=1, device="cpu", seed=0,
          attention="explicit", on_round=None, mesh=None):
    """Run `variants` on one config and batch; returns the report dict. `on_round(report)`, if
    given, gets the report so far after each round but the last (`complete` False). `mesh`
    ("data=2,fsdp=2,tensor=2"): the flax-jit variants run sharded over it."""
    import jax

    jax_mesh = None
    if mesh is not None:
        from flax_gpt.mesh import make_mesh

        jax_mesh = make_mesh(mesh)

    from flax_gpt.sidebyside.pair import apply_precision, environment, random_weights

    record = apply_precision("highest")
    x, y = synthetic_batch(config.vocab_size, batch_size, config.seq_len, seed)
    x, y = x[None], y[None]  # (1, B, T): one micro-batch
    tensors = random_weights(config, seed)
    tc = TrainConfig(steps=10_000, batch_size=batch_size, warmup_steps=10, attention=attention)
    on_gpu = jax.default_backend() == "gpu"
    device_name = jax.devices()[0].device_kind if on_gpu else platform.processor() or "cpu"

    results, built, names = {}, {}, list(variants)
    for name in variants:
        print(f"  building {name} ...", file=sys.stderr, flush=True)
        try:
            built[name], results[name] = build_variant(name, config, tensors, tc, x, y,
                                                       warmup=warmup, device=device, mesh=jax_mesh)
        except Skip as e:
            results[name] = not_run(e)
    for name in [n for n, v in built.items() if v.devices > 1]:  # the same batch on one device
        names.append(name + ON_ONE_DEVICE)
        print(f"  building {names[-1]} ...", file=sys.stderr, flush=True)
        try:  # a model that only fits sharded has no one-device baseline
            experiments.check_memory(config, batch_size, f"{names[-1]} (scaling's baseline)",
                                     training=True, attention=attention)
            built[names[-1]], results[names[-1]] = build_variant(
                name, config, tensors, tc, x, y, warmup=warmup, device=device)
        except (Skip, FlaxGPTError) as e:
            results[names[-1]] = not_run(e)

    round_peaks = {} if on_gpu else {kind(name): [] for name in built}

    def report(done):
        """The report after `done` rounds."""
        tokens = batch_size * config.seq_len
        rates = {name: tokens / np.median(np.reshape(v.times, (done, steps)), axis=1)
                 for name, v in built.items()}  # tokens/s of each round
        first = next(iter(rates.values()), None)
        for name, variant in built.items():
            result = results[name]
            result.update(summary(variant, tokens), steps=steps, rounds=done, warmup=warmup,
                          speedup=float(np.median(rates[name] / first)),
                          round_tokens_per_s=[float(r) for r in rates[name]])
            if on_gpu:
                peaks, source = table_peak(device_name, kind(name)[1]), "table"
            else:
                peaks = np.asarray(round_peaks[kind(name)])
                source = "measured {} {} 2048x2048 matmul, every round".format(*kind(name))
            for causal, label in ((False, "mfu"), (True, "mfu_causal")):  # per device
                achieved = (flops_per_token(config, config.seq_len, causal) * rates[name]
                            / built[name].devices)
                result[label] = None if peaks is None else float(np.median(achieved / peaks))
            result["peak_flops"] = None if peaks is None else float(np.median(peaks))
            result["peak_source"] = source
            if name + ON_ONE_DEVICE in rates:  # tokens/s per device over one device's, per round
                result["scaling_efficiency"] = float(np.median(
                    rates[name] / variant.devices / rates[name + ON_ONE_DEVICE]))
        return {"config": config.to_dict(), "attention": attention, "batch_size": batch_size,
                "seq_len": config.seq_len, "rounds": rounds, "complete": done == rounds,
                "matmul_params": matmul_params(config),
                "flops_per_token": flops_per_token(config, config.seq_len),
                "flops_per_token_causal": flops_per_token(config, config.seq_len, causal=True),
                "flops_note": "N counts Linear weights and biases and the head (a tied one is the "
                              "token embedding); an untied token embedding (a lookup) and the "
                              "positional table are left out",
                "device": device_name, "torch_device": device,
                "mesh": None if mesh is None else str(mesh), "jax_devices": jax.device_count(),
                "speedup_of": next(iter(built), None),
                "results": [{"variant": name, **results[name]} for name in names],
                "xla_flags": _xla_flags(), **environment(record, torch_device=device)}

    for r in range(rounds):
        print(f"  round {r + 1}/{rounds}: {steps} steps of each", file=sys.stderr, flush=True)
        for name, variant in list(built.items()):
            try:
                variant.run(steps, timed=True)
            except Exception as e:  # e.g. out of memory once every variant is resident
                results[name] = not_run(Crash(f"{type(e).__name__} while timing: {str(e)[:200]}"))
                del built[name]
        for k, peaks in round_peaks.items():  # beside the steps: a drifting CPU moves both alike
            peaks.append(measured_cpu_peak(*k))
        if on_round and r + 1 < rounds:
            on_round(report(r + 1))
    return report(rounds)


def select_variants(variants, skip=(), known=VARIANTS):
    """The variants to run, each once and in order: `variants` less `skip`; a name not in
    `known` is refused."""
    unknown = sorted((set(variants) | set(skip)) - set(known))
    if unknown:
        raise FlaxGPTError(f"unknown variant(s) {', '.join(unknown)}: choose from "
                           f"{', '.join(known)}")
    chosen = [v for v in dict.fromkeys(variants) if v not in set(skip)]
    if not chosen:
        raise FlaxGPTError(f"no variant to run (--variants {','.join(variants) or 'is empty'}, "
                           f"--skip {','.join(skip) or 'none'}): choose from {', '.join(known)}")
    return chosen


@dataclass
class BenchResult:
    """One report per batch size (see `bench`); `complete` is False while rounds remain."""

    batch_sizes: list
    reports: list = field(default_factory=list)

    @property
    def complete(self):
        return len(self.reports) == len(self.batch_sizes) and all(r["complete"] for r in self.reports)

    @property
    def crashed(self):
        """(batch size, variant, reason) of each variant that crashed."""
        return [(rep["batch_size"], r["variant"], r["skipped"]) for rep in self.reports
                for r in rep["results"] if r.get("crashed")]

    def to_dict(self):
        if len(self.batch_sizes) == 1:
            return self.reports[0]
        return {"sweep": self.reports, "batch_sizes": self.batch_sizes, "complete": self.complete}


def run(config, *, batch_sizes, variants=VARIANTS, skip=(), warmup=10, steps=20, rounds=1,
        device=None, attention="fused", pad=True, json_path=None, on_report=None, mesh=None):
    """`bench` at each of `batch_sizes`, one after another. `pad` rounds the vocabulary up to
    a multiple of 64; `device` is PyTorch's (default: cuda if available). With `json_path`,
    the result is rewritten after every round, so a run stopped part-way keeps what it
    measured. `on_report(report)` gets each batch size's report when it is done. `mesh`: see
    `bench`."""
    # JAX would otherwise take 75% of a GPU up front, leaving PyTorch's variants a quarter
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    variants = select_variants(variants, skip)
    if not batch_sizes or min(batch_sizes) < 1:
        raise FlaxGPTError(f"batch sizes must be positive integers, got {batch_sizes}")
    check_number("warmup", warmup, low=0, integer=True)
    check_number("steps", steps, low=1, integer=True)
    check_number("rounds", rounds, low=1, integer=True)
    check_attention(attention)
    if json_path:
        check_writable(json_path, "--json")
    if mesh is not None:  # refused before any work (bench makes the Mesh itself)
        import jax

        from flax_gpt.core.sharding import MeshShape

        MeshShape.parse(mesh).check_devices(jax.device_count())
    if pad:
        config = config.replace(vocab_size=pad_vocab(config.vocab_size))
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = experiments.torch_device(device)
    # every variant stays built (weights, optimizer state, compiled step) until the last round
    experiments.check_memory(config, max(batch_sizes), "benchmarking " + ", ".join(variants),
                             training=True, attention=attention,
                             places=[(kind(v)[0], device) for v in variants])
    result = BenchResult(list(batch_sizes))

    def save(partial=None):
        if json_path:
            write_json(json_path, BenchResult(result.batch_sizes,
                                              result.reports + ([partial] if partial else [])).to_dict())

    for size in batch_sizes:
        print(f"batch {size} x {config.seq_len}, config {config.to_json()}", file=sys.stderr)
        report = bench(config, batch_size=size, variants=variants, warmup=warmup, steps=steps,
                       rounds=rounds, device=device, attention=attention, on_round=save,
                       mesh=mesh)
        result.reports.append(report)
        save()
        if on_report:
            on_report(report)
    return result


def _xla_flags():
    return os.environ.get("XLA_FLAGS", "")


def plot(path, reports):
    """Bars of tokens/s and MFU per variant; with several batch sizes, tokens/s against them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(reports) == 1:
        ok = [r for r in reports[0]["results"] if "skipped" not in r]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        names = [r["variant"] for r in ok]
        rates = np.array([r["tokens_per_s"] for r in ok])
        tokens = reports[0]["batch_size"] * reports[0]["seq_len"]
        spread = [rates - [tokens / r["p90_s"] for r in ok], [tokens / r["p10_s"] for r in ok] - rates]
        left.barh(names, rates, xerr=spread, color="C0", ecolor="0.3", capsize=3)
        left.set_xlabel("tokens/s (bars: p10-p90 step time)")
        right.barh(names, [100 * (r["mfu"] or 0) for r in ok], color="C1")
        right.set_xlabel("MFU (%)")
        right.set_yticklabels([])
        fig.suptitle(f"train step, batch {reports[0]['batch_size']} x {reports[0]['seq_len']}, "
                     f"{reports[0]['attention']} attention, {reports[0]['device']}")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in VARIANTS:
            points = [(rep["batch_size"], r["tokens_per_s"]) for rep in reports
                      for r in rep["results"] if r["variant"] == name and "skipped" not in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.legend()
        ax.set_title(f"tokens/s against batch size, {reports[0]['device']}")
    fig.tight_layout()
    save_figure(fig, path)
