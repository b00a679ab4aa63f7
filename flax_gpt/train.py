"""The Flax trainer's core: optax AdamW and one jit-compiled train step over nnx.split state.

The whole step (forward, loss, gradients, clipping, AdamW update) is one `jax.jit` with the
parameters and optimizer state donated on accelerators (see `donated`), so XLA updates them
in place; the model object is split once (`nnx.split`) and never walked again in the loop.
Dropout masks come from a key the caller derives from (seed, step), so the step carries no
random state from one call to the next.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file
from safetensors.numpy import save as save_bytes

from flax_gpt import precision
from flax_gpt.core import runfolder, weights
from flax_gpt.core.errors import CheckpointError
from flax_gpt.core.files import atomic_file
from flax_gpt.core.hparams import learning_rates
from flax_gpt.mesh import Layout, barrier
from flax_gpt.model import GPT, canonical, cross_entropy, set_canonical

OPTIMIZER = "optimizer.safetensors"


def optimizer(tc):
    """AdamW (+ global-norm clip) on the shared learning-rate table.

    optax.adamw's update is lr * (m_hat / (sqrt(v_hat) + eps) + wd * p); PyTorch's AdamW first
    scales p by (1 - lr * wd) then subtracts lr * m_hat / (sqrt(v_hat) + eps): the same update,
    with eps outside the square root in both.
    """
    lrs = jnp.asarray(learning_rates(tc))

    def schedule(count):
        return lrs[jnp.minimum(count, tc.steps - 1)]

    adamw = optax.adamw(schedule, b1=tc.beta1, b2=tc.beta2, eps=tc.eps,
                        weight_decay=tc.weight_decay)
    if tc.grad_clip:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
    return adamw


# The first jaxlib measured free of the CPU donation fault (see donated); 0.7.1 has it.
CPU_DONATION_FIXED_IN = (0, 10, 2)


def donated():
    """Buffers the train step donates: parameters and optimizer state, except on CPU with a
    jaxlib older than CPU_DONATION_FIXED_IN.

    On CPU (jaxlib 0.7.1), a step whose donated parameters are the outputs of the previous
    donated step computes a wrong loss and update, though those parameters read back
    bit-identical to the undonated run's (copied into fresh buffers first, they give the
    right result). Seen with gradient clipping on and d_model 256, with 1 to 4 layers and
    vocabularies of 64 to 2048, grad_accum 1 or 2; not without clipping, nor at d_model 128
    or on `tiny`. On the `small` preset (vocabulary 2048) the loss of step 1 came out
    7.641478 instead of 7.638402 (PyTorch, and this step undonated). jaxlib 0.10.2 gives
    the undonated result. scripts/donation_bug.py reproduces it; tests/test_train.py
    test_cpu_donation holds donated() to what the installed jaxlib does.
    """
    import jaxlib

    if jax.default_backend() == "cpu" and jaxlib.version.__version_info__ < CPU_DONATION_FIXED_IN:
        return ()
    return (0, 1)


def reseed_dropout(model, key):
    """Restart every random stream `model` holds from `key`: its dropout layers' streams, the
    only ones a GPT keeps (its initialisers draw once and keep nothing).

    Each nnx.Dropout forks its stream at construction from `rngs["dropout"]`, which is the
    `default` stream when the caller's nnx.Rngs has no `dropout` one (nnx.Rngs(seed), as
    every builder here passes), so the streams are reseeded under the name they carry.
    """
    tags = {s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)}
    nnx.reseed(model, **dict.fromkeys(tags, key))


def make_train_step(graphdef, tx, *, donate=None, layout=None):
    """A jitted `step(params, opt_state, rest, x, y, key) -> (params, opt_state, metrics)`,
    donating the arguments `donate` (default: `donated()`); `layout` (flax_gpt.mesh.Layout):
    the in/out shardings on a device mesh.

    `x`, `y`: int32 `(grad_accum, B, T)`. Gradients of loss / grad_accum are summed over the
    micro-batches in order, as PyTorch's repeated `backward()` accumulates them, by a
    `lax.scan`: one compiled forward and backward whatever grad_accum. Micro-batch i draws
    its dropout masks from `jax.random.split(key, grad_accum)[i]`, so the step is a pure
    function of its arguments (no random state is carried from one step to the next).
    """

    shardings = layout.jit_shardings() if layout else {}

    @functools.partial(jax.jit, donate_argnums=donated() if donate is None else donate,
                       **shardings)
    def step(params, opt_state, rest, x, y, key):
        grad_accum = x.shape[0]

        def loss_fn(params, x, y, key):
            # copy=True: Variables of this trace level; nnx refuses to reseed or advance the
            # dropout streams in `rest`'s own, which belong to the jit trace outside
            model = nnx.merge(graphdef, params, rest, copy=True)
            reseed_dropout(model, key)
            return cross_entropy(model(x), y) / grad_accum

        grad_fn = jax.value_and_grad(loss_fn)

        def accumulate(total, micro):
            # total + this micro-batch's share, in order: PyTorch's p.grad += on each backward
            return jax.tree.map(jnp.add, total, grad_fn(params, *micro)), None

        micro = (x, y, jax.random.split(key, grad_accum))
        # 0 + g == g: starting the sum at zero (in the dtypes the step computes) changes no value
        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, *(m[0] for m in micro)))
        (loss, grads), _ = jax.lax.scan(accumulate, zero, micro)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm}

    return step


@functools.partial(jax.jit, static_argnums=0)
def eval_loss(graphdef, params, rest, x, y):
    """Mean loss of one batch, in eval mode (no dropout)."""
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return cross_entropy(model(x), y)


# jax.jit keeps its compilations per function object, so a step made anew for every backend
# is compiled anew: seconds to tens of seconds on a CPU, paid again by every backend of an
# experiment (compare, the mesh checks, a resume in the same process). The step is a function
# of (config, tc, mesh) alone (graphdef, optimizer and shardings are made from them), so
# backends of one key share it; the last few keys are kept.
_STEPS = collections.OrderedDict()
STEPS_KEPT = 8


def shared_step(key, make):
    """The step of `key` made by `make()` the first time, the same function afterwards."""
    if key in _STEPS:
        _STEPS.move_to_end(key)
    else:
        _STEPS[key] = make()
        if len(_STEPS) > STEPS_KEPT:
            _STEPS.popitem(last=False)
    return _STEPS[key]


def _nonfinite_counts(params):
    return jax.tree.map(lambda a: jnp.sum(~jnp.isfinite(a)), params)


class FlaxBackend:
    """The Flax side of flax_gpt.core.loop.train: model state, jitted step, checkpoint I/O."""

    name = "flax"

    def __init__(self, config, tc, tensors=None, mesh=None):
        """`mesh`: a jax.sharding.Mesh (flax_gpt.mesh.make_mesh) to shard the run over."""
        self.config, self.tc = config, tc
        param_dtype, dtype = precision.dtypes(tc.precision)
        model = GPT(config, rngs=nnx.Rngs(tc.seed), dtype=dtype, param_dtype=param_dtype,
                    attention=tc.attention)
        if tensors is not None:
            set_canonical(model, tensors)
        model.train()
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx = optimizer(tc)
        self.opt_state = self.tx.init(self.params)
        self.layout = None if mesh is None else Layout(mesh, config, self.params, self.tx,
                                                       tc.batch_size)
        self._place()
        self._step = shared_step((config, tc, mesh), lambda: make_train_step(
            self.graphdef, self.tx, layout=self.layout))
        self.key = jax.random.key(tc.seed)
        self.lrs = learning_rates(tc)

    @property
    def collective(self):
        """True when the state spans processes: every process then steps, saves and loads
        together (flax_gpt.core.runfolder.save_checkpoint)."""
        return bool(self.layout and self.layout.multiprocess)

    barrier = staticmethod(barrier)

    def _place(self):
        """On a mesh, put parameters, optimizer state and buffers where the layout says."""
        if self.layout:
            self.params, self.opt_state, self.rest = self.layout.place(
                self.params, self.opt_state, self.rest)

    def step(self, index, x, y):
        key = jax.random.fold_in(self.key, index)
        if self.collective:  # the step's inputs span the processes
            x, y = self.layout.batch_array(x), self.layout.batch_array(y)
            key = self.layout.global_array(key)
        self.params, self.opt_state, metrics = self._step(
            self.params, self.opt_state, self.rest, x, y, key)
        return metrics

    @staticmethod
    def fetch(metrics):
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def lr(self, index):
        return float(self.lrs[min(index, self.tc.steps - 1)])

    def eval_loss(self, x, y):
        if self.collective:
            x, y = self.layout.global_array(x), self.layout.global_array(y)
        return float(eval_loss(self.graphdef, self.params, self.rest, x, y))

    def canonical(self):
        """The parameters as canonical tensors; with several processes a collective, which
        every process calls."""
        if self.collective:
            return canonical(self.layout.gather(self.params), self.config)
        return canonical(self.params, self.config)

    def check_finite(self):
        """Raise NonFiniteError naming the first canonical tensor that holds NaN or Inf, as
        weights.save would. With several processes a collective: the counts are reduced over
        the global arrays and come back replicated, so every process raises alike."""
        out = {} if self.layout is None else {"out_shardings": self.layout.replicated}
        counts = nnx.to_pure_dict(jax.jit(_nonfinite_counts, **out)(self.params))
        weights.refuse_nonfinite((name, int(weights.flax_leaf(counts, name)))
                                 for name in weights.canonical_shapes(self.config))

    def save(self, folder):
        """The checkpoint files into `folder`: the canonical weights, gathered, and the
        optimizer state. One process writes both whole. Several processes (`collective`)
        write parameters and optimizer state with orbax, each process only the shards it
        owns, into runfolder.SHARDED; process 0 alone writes the gathered canonical weights."""
        if self.collective:
            import orbax.checkpoint as ocp  # here: it adds 0.4 s to every import of this module

            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save((folder / runfolder.SHARDED).absolute(), self._state())
            checkpointer.wait_until_finished()
            tensors = self.canonical()  # a collective: every process gathers
            if jax.process_index() == 0:
                weights.save(folder / runfolder.WEIGHTS, self.config, tensors)
            return
        weights.save(folder / runfolder.WEIGHTS, self.config, self.canonical())
        leaves = jax.tree_util.tree_leaves_with_path(self.opt_state)
        # through atomic_file, not safetensors' save_file: that one creates its files 0600,
        # and every file of a run folder gets the same (umask) mode
        with atomic_file(folder / OPTIMIZER) as f:
            f.write(save_bytes({jax.tree_util.keystr(path): np.asarray(leaf)
                                for path, leaf in leaves}))

    def load(self, folder):
        """Restore a checkpoint of `save`, onto this backend's devices whatever the mesh or
        the number of processes that wrote it: orbax reads each array's shards where this
        layout wants them, and the gathered files are placed again."""
        sharded = folder / runfolder.SHARDED
        if sharded.is_dir():
            import orbax.checkpoint as ocp

            target = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                self._state())
            try:
                state = ocp.StandardCheckpointer().restore(sharded.absolute(), target)
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{sharded} cannot be restored: {e}") from None
            self.params, self.opt_state = state["params"], state["opt_state"]
            return
        tensors = runfolder.checkpoint_weights(folder, self.config)
        set_canonical(self.params, tensors)
        saved = load_file(str(folder / OPTIMIZER))
        paths, treedef = jax.tree_util.tree_flatten_with_path(self.opt_state)
        try:
            leaves = [jnp.asarray(saved[jax.tree_util.keystr(path)]) for path, _ in paths]
        except KeyError as e:
            raise CheckpointError(f"{folder / OPTIMIZER} lacks optimizer state {e}") from None
        self.opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
        self._place()  # the checkpoint is gathered: it restores onto any mesh

    def _state(self):
        return {"params": self.params, "opt_state": self.opt_state}
