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

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_gpt.core import sharding, weights
from flax_gpt.core.sharding import AXES, BATCH_AXES, MeshShape


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
        """Parameters, optimizer state and buffers (replicated) put on the mesh."""
        return (jax.device_put(params, self.params), jax.device_put(opt_state, self.opt_state),
                jax.device_put(rest, self.replicated))

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
