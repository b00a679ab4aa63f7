"""The Flax trainer on a device mesh: jax.sharding.Mesh and NamedSharding built from the one
set of rules in flax_gpt.core.sharding (read from the canonical parameter names).

    mesh = make_mesh("data=2,fsdp=2,tensor=2")          # needs jax.device_count() == 8
    backend = FlaxBackend(config, tc, mesh=mesh)         # state placed, step jitted with shardings

The train step stays one `jax.jit`; `Layout.jit_shardings` gives it in/out shardings, so
batches handed over as numpy arrays are split over (data, fsdp) on the way in, and parameters
and optimizer state come out with the sharding they went in with. Everything else (the
gathers of fsdp, the reductions of tensor, the gradient all-reduce of data) is XLA's GSPMD.
"""

import collections
import hashlib

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_gpt.core import sharding, weights
from flax_gpt.core.sharding import AXES, BATCH_AXES, MeshError, MeshShape


def join(processes):
    """Join the multi-process job `processes` (a flax_gpt.core.sharding.Processes) and return
    this process's index: call it before anything else touches JAX's devices. On the CPU the
    processes' collectives go over gloo. What JAX cannot start from (settings neither given
    nor detected) is refused with MeshError."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=processes.coordinator,
                                   num_processes=processes.num_processes,
                                   process_id=processes.process_id)
    except (ValueError, RuntimeError) as e:
        raise MeshError(f"cannot join the JAX job ({str(e).splitlines()[0]}): give "
                        f"--coordinator, --num-processes and --process-id (or their JAX_* "
                        f"variables), or run where JAX detects the job (SLURM, Open MPI, "
                        f"Kubernetes, Cloud TPU)") from None
    return jax.process_index()


def agree(settings, problem=None):
    """Meet every process of the job and stop them all, each with one line, unless all hold
    the same `settings` (text: what must not differ between them) and none has a `problem`
    (the FlaxGPTError it would stop with, or None): a process that went on alone would wait
    in its first collective for ever."""
    from jax.experimental import multihost_utils

    digest = int.from_bytes(hashlib.sha256(settings.encode()).digest()[:4], "little") >> 1
    mine = np.array([digest, problem is not None], np.int32)  # int32: JAX's default width
    try:
        every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    except Exception as e:  # JaxRuntimeError, whose class moved between JAX versions
        if problem is not None:
            raise problem from None
        raise MeshError(f"another process left the job before the processes agreed to start "
                        f"(its stderr says why): {str(e).splitlines()[0][:200]}") from None
    if problem is not None:
        raise problem
    refused = np.flatnonzero(every[:, 1]).tolist()
    if refused:
        raise MeshError(f"process {refused[0]} of the job refused to start (its stderr says "
                        f"why), so this one stops too")
    differ = np.flatnonzero(every[:, 0] != every[0, 0]).tolist()
    if differ:
        raise MeshError(f"process {differ[0]} was started with other settings than process 0 "
                        f"(--mesh, --out or training options): start every process with the "
                        f"same flags, only --process-id differing")


def barrier(name):
    """Wait until every process of the job reaches the barrier `name`."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def make_mesh(shape):
    """A Mesh with axes (data, fsdp, tensor) of `shape` (a MeshShape or its text) over all
    devices; refused with MeshError unless the product of the axes is jax.device_count()."""
    shape = MeshShape.parse(shape) if isinstance(shape, str) else shape
    devices = jax.devices()
    shape.check_devices(len(devices))
    return Mesh(np.asarray(devices).reshape(shape.shape), AXES)


def mesh_shape(mesh):
    return MeshShape(**dict(mesh.shape))


def flax_specs(config, shape):
    """{Flax parameter path: PartitionSpec}: the canonical rules, reversed for kernels (held
    [in, out] in Flax)."""
    specs = {}
    for name, spec in sharding.rules(config, shape).items():
        key, transposed = weights.flax_key(name)
        specs[key] = P(*(spec[::-1] if transposed else spec))
    return specs


def _flax_key(path):
    """A jax key path into nnx.State ((DictKey('decoder'), ..., GetAttrKey('value'))) -> the
    tuple of its keys."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


class Layout:
    """NamedShardings of one model's parameters, AdamW state, buffers and batches on `mesh`."""

    def __init__(self, mesh, config, params, tx, batch_size):
        self.mesh, self.shape = mesh, mesh_shape(mesh)
        self.shape.check_batch(batch_size)
        specs = flax_specs(config, self.shape)
        self.replicated = NamedSharding(mesh, P())
        self.params = jax.tree_util.tree_map_with_path(
            lambda path, _: NamedSharding(mesh, specs[_flax_key(path)]), params)
        # each AdamW moment as its parameter; step counts and the like replicated
        self.opt_state = optax.tree_map_params(
            tx, lambda _, s: s, jax.eval_shape(tx.init, params), self.params,
            transform_non_params=lambda _: self.replicated)
        self.batch = NamedSharding(mesh, P(None, BATCH_AXES, None))  # (grad_accum, B, T)
        self.lines = sharding.describe(config, self.shape)

    def place(self, params, opt_state, rest):
        """Parameters, optimizer state and buffers (replicated) put on the mesh. With several
        processes each one holds the same whole values (same init or checkpoint) and puts
        its own shards from host memory."""
        if not self.multiprocess:
            return (jax.device_put(params, self.params),
                    jax.device_put(opt_state, self.opt_state),
                    jax.device_put(rest, self.replicated))
        return (jax.tree.map(self.global_array, params, self.params),
                jax.tree.map(self.global_array, opt_state, self.opt_state),
                jax.tree.map(self.global_array, rest))

    @property
    def multiprocess(self):
        """True when the mesh spans devices of other processes (jax.distributed)."""
        return jax.process_count() > 1

    def global_array(self, x, sharding=None):
        """`x`, whole on this process, as one array of the mesh laid out by `sharding`
        (default replicated), this process transferring only its own devices' shards: a
        process cannot put on another's devices. PRNG keys go as their key data."""
        sharding = sharding or self.replicated
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = self.global_array(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def batch_array(self, a):
        """The global batch `a` ((grad_accum, B, T)) on the mesh; this process transfers only
        the rows of its own devices."""
        return self.global_array(a, self.batch)

    def gather(self, tree):
        """`tree` whole on every process (a collective: every process must call it)."""
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)

    def jit_shardings(self):
        """in/out shardings of `step(params, opt_state, rest, x, y, key) -> (params, opt_state,
        metrics)` (flax_gpt.train.make_train_step)."""
        r = self.replicated
        return {"in_shardings": (self.params, self.opt_state, r, self.batch, self.batch, r),
                "out_shardings": (self.params, self.opt_state, r)}


def bytes_per_device(*trees):
    """{device: bytes of the arrays of `trees` it holds}, from the arrays' own shards."""
    held = collections.Counter()
    for leaf in jax.tree.leaves(trees):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)
