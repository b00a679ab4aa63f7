"""Hold the Flax trainer on a device mesh to the single-device run, and check checkpoints of a
sharded run. Prints one JSON object (docs/devices.md describes it; tests/test_mesh.py runs it
short).

    python scripts/mesh_equivalence.py --kink-masked --float64 --checkpoints DIR   # the full run

On `--devices` fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, set here
before jax is imported), every mesh of `--meshes` trains each config of `--configs` from the
same weights on the same global batches as one device does, and reports per-step |loss
difference| and the largest |parameter difference| at the end. Also:

  kink_masked   (--kink-masked) float32 again with each step's labels masked from ReLU flips
                on, in lockstep with one device (see kink_free)
  float64       the same meshes at precision float64 (--float64)
  accumulation  on the last mesh, the first config, grad_accum=2 micro-batches of B against
                one device taking the same 2B rows as one batch
  checkpoints   (--checkpoints DIR) the first config on the last mesh again, through the real
                loop, checkpointed half-way: resumed on the same mesh (losses bit for bit),
                and its checkpoint restored on the first mesh and on one device (every tensor
                bit for bit), then trained on to the end there
  processes     (--processes N) the float32 runs of every config and mesh again on N
                processes of devices/N devices each (jax.distributed with a local
                coordinator, gloo collectives), held against this process's runs on all the
                devices; only process 0 writes its results

Backends of one (config, schedule, mesh) share their compiled step (flax_gpt.train.shared_step),
so each is compiled once per process.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, not an installed copy

MESHES = "data=8 fsdp=8 tensor=8 data=2,fsdp=2,tensor=2"
# heads8: n_heads, d_ff and the vocabulary divide 8, so every axis splits all it may.
# heads4: `small`'s 4 heads at a small width (head size 12): tensor=8 leaves q, k, v and out
# whole (the heads do not divide), tensor=2 splits them.
CONFIGS = {"heads8": dict(vocab_size=64, seq_len=16, d_model=32, n_heads=8, n_layers=2, d_ff=128),
           "heads4": dict(vocab_size=64, seq_len=16, d_model=48, n_heads=4, n_layers=2, d_ff=192)}
FAST_COMPILE = "--xla_backend_optimization_level=0"


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--meshes", default=MESHES, help=f"space-separated (default {MESHES!r})")
    p.add_argument("--configs", default=" ".join(CONFIGS),
                   help=f"space-separated, of {', '.join(CONFIGS)} (default all)")
    p.add_argument("--layers", type=int, help="n_layers of every config (default theirs, 2)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kink-masked", action="store_true",
                   help="also float32 with labels masked from ReLU flips on (slower: two "
                        "forwards a step)")
    p.add_argument("--float64", nargs="?", const="all", metavar="MESHES",
                   help="also at precision float64, on every mesh or the space-separated MESHES")
    p.add_argument("--checkpoints", type=Path, help="a folder for the checkpoint runs")
    p.add_argument("--fast-compile", action="store_true",
                   help=f"XLA_FLAGS {FAST_COMPILE}: LLVM does not optimize the machine code, "
                        f"which compiles several times faster on CPU. The HLO, its sharding and "
                        f"its collectives are unchanged, and both sides of every comparison "
                        f"compile alike (the test suite's setting)")
    p.add_argument("--processes", type=int, default=1,
                   help="also train on this many JAX processes (see processes above)")
    p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)  # a worker of --processes
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--compilation-cache", type=Path,
                   help="JAX's persistent compilation cache, for repeated runs of this script")
    return p.parse_args()


def main():
    args = parse()
    local = args.devices // args.processes if args.process_id is not None else args.devices
    flags = [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={local}"]
    os.environ["XLA_FLAGS"] = " ".join(filter(None, flags + [FAST_COMPILE] * args.fast_compile))
    import jax

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from flax_gpt.core.hparams import TrainConfig

    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=3e-3, warmup_steps=5)
    meshes, names = args.meshes.split(), args.configs.split()
    if args.process_id is not None:
        return worker(args, tc, meshes, names)
    assert jax.device_count() == args.devices, jax.devices()
    t0 = time.perf_counter()
    out = {"devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
           "jax": jax.__version__, "xla_flags": os.environ["XLA_FLAGS"], "train": tc.to_dict(),
           "meshes": meshes, "configs": {}}
    for name in names:
        config = config_of(name, args.layers)
        result = out["configs"][name] = {"config": config.to_dict()}
        result["float32"] = timed(equivalence, config, tc, meshes, kink_masked=args.kink_masked)
        if args.float64:
            on = meshes if args.float64 == "all" else args.float64.split()
            result["float64"] = timed(equivalence, config, tc.replace(precision="float64"), on)
    first = config_of(names[0], args.layers)
    out["accumulation"] = {"config": names[0], **timed(accumulation, first, tc, meshes[-1])}
    if args.checkpoints:
        out["checkpoints"] = {"config": names[0], **timed(checkpoints, first, tc, meshes[-1],
                                                          meshes[0], args.checkpoints)}
    if args.processes > 1:
        out["processes"] = timed(processes, args, tc, meshes, names)
    out["seconds"] = time.perf_counter() - t0
    json.dump(out, sys.stdout)
    print()


def float32_runs(config, tc, meshes):
    """{mesh: (per-step losses, canonical weights)} of float32 runs from one seeded init."""
    tensors = backend(config, tc).canonical()
    batches = global_batches(tc, config.seq_len, config.vocab_size)
    return {mesh: train(backend(config, tc, tensors, mesh), batches) for mesh in meshes}


def worker(args, tc, meshes, names):
    """One of --processes processes: join the others, train every config on every mesh
    (each process feeding the rows of its own devices), and on process 0 alone write the
    losses and the gathered weights into the folder --result."""
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.processes, process_id=args.process_id)
    assert jax.device_count() == args.devices, jax.devices()
    arrays = {}
    for name in names:
        for mesh, (losses, params) in float32_runs(config_of(name, args.layers), tc,
                                                   meshes).items():
            arrays[f"{name}|{mesh}|loss"] = np.asarray(losses)
            arrays.update({f"{name}|{mesh}|{k}": v for k, v in params.items()})
    if jax.process_index() == 0:  # a file named by its writer: another's would show
        np.savez(args.result / f"process-{jax.process_index()}.npz", **arrays)
    jax.distributed.shutdown()


def processes(args, tc, meshes, names):
    """The float32 runs on --processes processes against the same runs in this process."""
    import socket
    import subprocess
    import tempfile

    import numpy as np

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder)
        command = [sys.executable, __file__, "--devices", str(args.devices), "--processes",
                   str(args.processes), "--coordinator", f"127.0.0.1:{port}", "--result",
                   str(result), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--meshes", " ".join(meshes), "--configs", " ".join(names)]
        command += ["--layers", str(args.layers)] * bool(args.layers)
        command += ["--fast-compile"] * args.fast_compile
        env = {**os.environ, "XLA_FLAGS": ""}  # each worker sets its own device count
        # stdout is this script's JSON: what the workers print (gloo's connection lines) goes
        # to stderr
        workers = [subprocess.Popen(command + ["--process-id", str(i)], env=env,
                                    stdout=sys.stderr)
                   for i in range(args.processes)]
        codes = [w.wait(timeout=1800) for w in workers]
        assert codes == [0] * args.processes, codes
        saved = dict(np.load(result / "process-0.npz"))
        written = sorted(p.name for p in Path(folder).iterdir())
    out = {"processes": args.processes, "files_written": written}
    for name in names:
        for mesh, (losses, params) in float32_runs(config_of(name, args.layers), tc,
                                                   meshes).items():
            diffs = np.abs(saved[f"{name}|{mesh}|loss"] - np.asarray(losses))
            out[f"{name} {mesh}"] = {
                "max_loss_diff": float(diffs.max()),
                "max_param_diff": max_diff(params, {k: saved[f"{name}|{mesh}|{k}"]
                                                    for k in params})}
    return out


def config_of(name, layers=None):
    from flax_gpt.core.config import GPTConfig

    return GPTConfig(**{**CONFIGS[name], **({"n_layers": layers} if layers else {})})


def timed(part, *args, **kwargs):
    """`part(*args, **kwargs)`, a dict, with its wall time added as "seconds"."""
    start = time.perf_counter()
    return {**part(*args, **kwargs), "seconds": time.perf_counter() - start}


def backend(config, tc, tensors=None, mesh=None):
    from flax_gpt import experiments

    return experiments.backend("flax", config, tc, tensors, mesh=mesh)


def train(trainer, batches):
    """Losses of `trainer` over `batches` ((grad_accum, B, T) pairs), then its canonical weights."""
    losses = [trainer.fetch(trainer.step(i, x, y))["loss"] for i, (x, y) in enumerate(batches)]
    return losses, trainer.canonical()


def placement(trainer):
    """Where the trained parameters are: {canonical name: [axis or None per canonical
    dimension]} read from the arrays themselves, and the largest bytes of parameters and of
    optimizer state that one device holds."""
    from flax import nnx

    from flax_gpt.core import weights
    from flax_gpt.mesh import bytes_per_device

    tree, specs = nnx.to_pure_dict(trainer.params), {}
    for name in trainer.canonical():
        key, transposed = weights.flax_key(name)
        node = tree
        for part in key:
            node = node[part]
        spec = list(node.sharding.spec) + [None] * (node.ndim - len(node.sharding.spec))
        specs[name] = spec[::-1] if transposed else spec
    return {"specs": specs,
            "param_bytes_per_device": max(bytes_per_device(trainer.params).values()),
            "optimizer_bytes_per_device": max(bytes_per_device(trainer.opt_state).values())}


def max_diff(a, b):
    return max(float(abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a)


def compare(reference, run):
    (ref_losses, ref_params), (losses, params) = reference, run
    diffs = [abs(a - b) for a, b in zip(ref_losses, losses)]
    return {"loss_diff": diffs, "max_loss_diff": max(diffs), "max_param_diff": max_diff(ref_params, params),
            "final_loss": losses[-1]}


def global_batches(tc, seq_len, vocab_size, grad_accum=1):
    """The batches of every step: the synthetic stream's, by global index."""
    from flax_gpt.core.streams import SyntheticStream, step_batch

    stream = SyntheticStream(vocab_size, tc.batch_size, seq_len, tc.seed)
    return [step_batch(stream, s, grad_accum) for s in range(tc.steps)]


def equivalence(config, tc, meshes, *, kink_masked=False):
    """Each mesh against one device, from one set of weights on the same batches; with
    `kink_masked`, also again with each step's labels masked from ReLU flips on (see
    `kink_free`)."""
    tensors = backend(config, tc).canonical()
    batches = global_batches(tc, config.seq_len, config.vocab_size)
    reference = train(backend(config, tc, tensors), batches)
    result = {"single_device_final_loss": reference[0][-1]}
    for mesh in meshes:
        start = time.perf_counter()
        trainer = backend(config, tc, tensors, mesh)
        result[mesh] = {**compare(reference, train(trainer, batches)), **placement(trainer)}
        if kink_masked:
            result[mesh]["kink_masked"] = kink_free(config, tc, tensors, batches, mesh)
        result[mesh]["seconds"] = time.perf_counter() - start
    return result


def kink_free(config, tc, tensors, batches, mesh):
    """One device and `mesh` in lockstep, each step's labels ignored in a row from the first
    ReLU input that the two forwards put on opposite sides of 0 (the parity suite's rule,
    flax_gpt.sidebyside.parity.kink_free_labels): a unit within rounding of its kink takes
    different branches in two correct float32 runs, its gradient row then differs by its
    whole contribution, and AdamW carries that on. Masking leaves both runs the same labels."""
    import numpy as np
    from flax import nnx

    from flax_gpt.sidebyside.parity import flax_relu_inputs, kept_share, labels_before_flips

    runs = backend(config, tc, tensors), backend(config, tc, tensors, mesh)
    losses, flips, kept = ([], []), 0, []
    for i, (x, y) in enumerate(batches):
        masked = np.empty_like(y)
        for m in range(len(x)):
            inputs = [flax_relu_inputs(nnx.merge(r.graphdef, r.params, r.rest), x[m])[0]
                      for r in runs]
            masked[m], n = labels_before_flips(y[m], *inputs)
            flips += n
        kept.append(kept_share(masked, y))
        for r, out in zip(runs, losses):
            out.append(r.fetch(r.step(i, x, masked))["loss"])
    diffs = [abs(a - b) for a, b in zip(*losses)]
    return {"loss_diff": diffs, "max_loss_diff": max(diffs), "flips": flips,
            "kept_share": float(np.mean(kept)), "min_kept_share_of_a_step": min(kept),
            "max_param_diff": max_diff(runs[0].canonical(), runs[1].canonical())}


def accumulation(config, tc, mesh):
    """grad_accum=2 micro-batches of B rows on `mesh` against one device taking the same 2B
    rows as one batch, without accumulation."""
    whole = tc.replace(batch_size=2 * tc.batch_size)
    tensors = backend(config, tc).canonical()
    batches = global_batches(whole, config.seq_len, config.vocab_size)  # (1, 2B, T)
    reference = train(backend(config, whole, tensors), batches)
    split = [(x.reshape(2, tc.batch_size, -1), y.reshape(2, tc.batch_size, -1)) for x, y in batches]
    run = train(backend(config, tc.replace(grad_accum=2), tensors, mesh), split)
    return {"mesh": mesh, **compare(reference, run)}


def checkpoints(config, tc, mesh, other_mesh, folder):
    """A run on `mesh` through the real loop (run folders in `folder`): unbroken, and stopped
    half-way then resumed on the same mesh; the half-way checkpoint restored on `other_mesh`
    and on one device, compared tensor by tensor with the files, and trained on to the end."""
    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from flax_gpt.core import loop, runfolder
    from flax_gpt.core.streams import SyntheticStream
    from flax_gpt.train import OPTIMIZER

    def stream():
        return SyntheticStream(config.vocab_size, tc.batch_size, config.seq_len, tc.seed)

    def losses(history):
        return [h["loss"] for h in history if "loss" in h]

    half = tc.steps // 2
    tensors = backend(config, tc).canonical()
    unbroken = losses(loop.train(backend(config, tc, tensors, mesh), stream(), folder / "unbroken",
                                 log_every=1, checkpoint_every=half, progress=False))
    first = losses(loop.train(backend(config, tc, tensors, mesh), stream(), folder / "resumed",
                              log_every=1, stop_at=half, progress=False))
    second = losses(loop.train(backend(config, tc, tensors, mesh), stream(), folder / "resumed",
                               resume=True, log_every=1, progress=False))
    result = {"mesh": mesh, "steps": tc.steps, "unbroken": unbroken, "resumed": first + second,
              "resume_bitwise": first + second == unbroken}
    checkpoint = runfolder.CHECKPOINTS + f"/step_{half:08d}"
    saved = folder / "unbroken" / checkpoint
    saved_weights = load_file(str(saved / runfolder.WEIGHTS))
    saved_optimizer = load_file(str(saved / OPTIMIZER))
    for label, target in ((other_mesh, other_mesh), ("single device", None)):
        trainer = backend(config, tc, tensors, target)
        step = runfolder.load_checkpoint(saved, trainer)
        restored = trainer.canonical()
        optimizer = {jax.tree_util.keystr(p): np.asarray(v)
                     for p, v in jax.tree_util.tree_leaves_with_path(trainer.opt_state)}
        bitwise = (all(np.array_equal(restored[k], saved_weights[k]) for k in saved_weights) and
                   all(np.array_equal(optimizer[k], saved_optimizer[k]) for k in saved_optimizer)
                   and optimizer.keys() == saved_optimizer.keys())
        shardings = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(trainer.params)}
                           ) if target else []
        batches = global_batches(tc, config.seq_len, config.vocab_size)
        later = [trainer.fetch(trainer.step(i, *batches[i]))["loss"] for i in range(step, tc.steps)]
        result[f"restored on {label}"] = {
            "step": step, "bitwise": bitwise, "param_specs": shardings,
            "max_loss_diff_after": max(abs(a - b) for a, b in zip(later, unbroken[step:]))}
    return result


if __name__ == "__main__":
    main()
