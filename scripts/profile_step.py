"""Where the time of one `small` train step goes, in JAX and in PyTorch, part by part.

Times (median of repeats, one framework at a time) forward + backward of: one decoder layer, its attention
(explicit and fused), its feed-forward, the prediction head with the loss, the loss alone, and the whole model;
then every matmul shape of the step run alone, as the forward computes it (x @ W) and as
the backward does (dX = dY @ W^T, dW = X^T @ dY, and dW^T = dY^T @ X, the layout PyTorch
stores), in GFLOP/s. docs/benchmarks.md renders what they showed from the --json file.
Run: python scripts/profile_step.py [--batch-size 16] [--json PATH]   (~2 minutes on 2 cores)
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.files import check_writable, write_json
from flax_gpt.sidebyside import bench
from flax_gpt.sidebyside.pair import apply_precision, environment
from torch_reference import model as torch_model


def median_ms(fns, repeats=10):
    """{name: median ms} of each no-argument callable, run in turns after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def jax_part(module, loss):
    """A jitted forward + backward of `loss(module(h))` with respect to weights and input."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    grad = jax.jit(jax.grad(lambda p, h: loss(nnx.merge(graphdef, p, rest)(h)), argnums=(0, 1)))
    return lambda h: jax.block_until_ready(grad(params, h))


def square(out):
    return (out ** 2).sum()


def torch_part(module, loss):
    def run(h):
        h = h.detach().requires_grad_()
        loss(module(h)).backward()
    return run


def parts(config, batch_size):
    B, T, d = batch_size, config.seq_len, config.d_model
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (B, T))
    h = rng.standard_normal((B, T, d)).astype(np.float32)
    logits = rng.standard_normal((B, T, config.vocab_size)).astype(np.float32)
    fm = flax_model.GPT(config, rngs=nnx.Rngs(0))
    fm.train()
    torch.manual_seed(0)
    tm = torch_model.GPT(config)
    j_ids, t_ids = jnp.asarray(ids), torch.from_numpy(ids)
    j_h, t_h = jnp.asarray(h), torch.from_numpy(h)
    j_ce = jax.jit(jax.grad(flax_model.cross_entropy))
    j_logits, t_logits = jnp.asarray(logits), torch.from_numpy(logits)

    def t_ce():
        x = t_logits.detach().requires_grad_()
        torch_model.cross_entropy(x, t_ids).backward()

    graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
    j_model = jax.jit(jax.grad(
        lambda p: flax_model.cross_entropy(nnx.merge(graphdef, p, rest)(j_ids), j_ids)))
    j_layer, t_layer = fm.decoder.layers[0], tm.decoder.layers[0]
    j_fused = flax_model.GPT(config, rngs=nnx.Rngs(0), attention="fused").decoder.layers[0].mhma
    t_fused = torch_model.GPT(config, attention="fused").decoder.layers[0].mhma
    rows = {  # name: (jax part, torch part), each fed the same hidden states h
        "decoder layer": (jax_part(j_layer, square), torch_part(t_layer, square)),
        "  attention": (jax_part(j_layer.mhma, square), torch_part(t_layer.mhma, square)),
        "  attention, fused": (jax_part(j_fused, square), torch_part(t_fused, square)),
        "  feed-forward": (jax_part(j_layer.ffn, square), torch_part(t_layer.ffn, square)),
        "head + loss": (jax_part(fm.pred, lambda out: flax_model.cross_entropy(out, j_ids)),
                        torch_part(tm.pred, lambda out: torch_model.cross_entropy(out, t_ids))),
    }
    fns = {}
    for name, (jf, tf) in rows.items():
        fns["jax " + name] = lambda jf=jf: jf(j_h)
        fns["torch " + name] = lambda tf=tf: tf(t_h)
    fns["jax   loss alone"] = lambda: jax.block_until_ready(j_ce(j_logits, j_ids))
    fns["torch   loss alone"] = t_ce
    fns["jax whole model"] = lambda: jax.block_until_ready(j_model(params))
    fns["torch whole model"] = lambda: torch_model.cross_entropy(tm(t_ids), t_ids).backward()
    # one framework at a time: PyTorch's OpenMP threads spin on after each op and would slow
    # a JAX op that ran right after one
    times = {**median_ms({k: f for k, f in fns.items() if k.startswith("jax")}),
             **median_ms({k: f for k, f in fns.items() if k.startswith("torch")})}
    print("forward + backward, ms        jax    torch")
    out = {}
    for name in list(rows) + ["  loss alone", "whole model"]:
        print(f"  {name:<24} {times['jax ' + name]:7.1f} {times['torch ' + name]:7.1f}")
        out[name] = {"jax": times["jax " + name], "torch": times["torch " + name]}
    return out


def matmuls(config, batch_size):
    """GFLOP/s of each matmul shape of the step, and the time of all of them together."""
    M, d, f, V, L = batch_size * config.seq_len, config.d_model, config.d_ff, config.vocab_size, config.n_layers
    rng = np.random.default_rng(0)
    forms = {  # name: (jax function, torch function, operand shapes from (M, k, n))
        "x @ W": (lambda a, b: a @ b, lambda a, b: a @ b, lambda M, k, n: ((M, k), (k, n))),
        "dY @ W^T": (lambda a, b: a @ b.T, lambda a, b: a @ b.T, lambda M, k, n: ((M, n), (k, n))),
        "X^T @ dY": (lambda a, b: a.T @ b, lambda a, b: a.T @ b, lambda M, k, n: ((M, k), (M, n))),
        "dY^T @ X": (lambda a, b: b.T @ a, lambda a, b: b.T @ a, lambda M, k, n: ((M, k), (M, n))),
    }
    totals, rows = {"jax": 0.0, "torch": 0.0}, []
    print(f"matmuls of the step (M = {M} tokens), GFLOP/s   jax  torch")
    for k, n, count in ((d, d, 4 * L), (d, f, L), (f, d, L), (d, V, 1)):
        for form, (jf, tf, shapes) in forms.items():
            a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes(M, k, n))
            ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
            jitted = jax.jit(jf)
            ms = {**median_ms({"jax": lambda: jitted(ja, jb).block_until_ready()}),
                  **median_ms({"torch": lambda: tf(ta, tb)})}
            flops = 2 * M * k * n
            if form != "dY^T @ X":  # the three the step computes; dY^T @ X is the alternative
                totals["jax"] += count * ms["jax"]
                totals["torch"] += count * ms["torch"]
            rows.append({"k": k, "n": n, "count": count, "form": form, "in_step": form != "dY^T @ X",
                         **{f: flops / ms[f] / 1e6 for f in ms}})  # GFLOP/s
            print(f"  {k:>5} -> {n:<5} x{count:<3} {form:<9} {rows[-1]['jax']:7.0f} {rows[-1]['torch']:6.0f}")
    print(f"all matmuls of one step, run alone: jax {totals['jax']:.0f} ms, torch {totals['torch']:.0f} ms")
    return {"tokens": M, "shapes": rows, "total_ms": totals}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="write the figures here, with the command, stack and commit")
    args = parser.parse_args()
    if args.batch_size < 1:
        sys.exit(f"profile_step.py: --batch-size must be a positive integer, got {args.batch_size}")
    try:
        if args.json:
            check_writable(args.json, "--json")
    except FlaxGPTError as e:
        sys.exit(f"profile_step.py: {e}")
    record = apply_precision("highest")
    config = GPTConfig.preset("small", vocab_size=bench.pad_vocab(11548))
    result = {"config": config.to_dict(), "batch_size": args.batch_size,
              "parts_ms": parts(config, args.batch_size), "matmuls": matmuls(config, args.batch_size),
              **environment(record)}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
