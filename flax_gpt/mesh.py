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
import contextlib
import hashlib
import inspect
import os
import signal
import socket
import sys
import threading
import traceback

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_gpt.core import sharding, weights
from flax_gpt.core.errors import FlaxGPTError, Interrupted
from flax_gpt.core.sharding import AXES, BATCH_AXES, MeshError, MeshShape


# A JAX job's faults. JAX's coordination service declares a process dead after
# HEARTBEAT_TIMEOUT_S without its heartbeats and then ends every process with a multi-line
# fatal log; its default, 100 s, kept a survivor waiting over a minute (a collective never
# times out). That remains the net for a process that hangs; one that dies (killed, crashed)
# is heard of at once through its Lifeline.
HEARTBEAT_TIMEOUT_S = 10
# How long a finished process waits for the others at exit: a process that is gone is heard
# of through the Lifeline, so this bounds only one that is slow to finish, as on a loaded
# machine, where 30 s once ended both processes of a job that had stopped in good order
SHUTDOWN_TIMEOUT_S = 120
CONNECT_TIMEOUT_S = 300  # JAX's own initialization timeout
HELLO_TIMEOUT_S = 10  # for a connection to the lifeline to say which process it is
LOST_EXIT = 2  # a process of the job is gone: as a run that failed with a FlaxGPTError


def join(processes):
    """Join the multi-process job `processes` (a flax_gpt.core.sharding.Processes) and return
    this process's index: call it before anything else touches JAX's devices. On the CPU the
    processes' collectives go over gloo. What JAX cannot start from (settings neither given
    nor detected) is refused with MeshError."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = {"heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S}
    if "shutdown_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        timeouts["shutdown_timeout_seconds"] = SHUTDOWN_TIMEOUT_S  # jax >= 0.8
    try:
        jax.distributed.initialize(coordinator_address=processes.coordinator,
                                   num_processes=processes.num_processes,
                                   process_id=processes.process_id, **timeouts)
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


def _job():
    """JAX's state of the job: its key-value store (`.client`, the coordination service's
    client, as orbax reads it) and `.coordinator_address`."""
    from jax._src.distributed import global_state

    return global_state


class Lifeline:
    """A TCP connection between process 0 and each other process of the job, opened once
    all joined: the kernel closes a process's end when the process dies, however it died, so
    the others hear of it at once. Process 0 passes word of a lost process on to the rest.

    `lost(index)` runs on a watcher thread when process `index` is gone before it closed its
    lifeline; then this process exits with LOST_EXIT (it may be waiting in a collective that
    will never complete). `close()` (the job ends, or stops as all its processes agreed)
    says goodbye, so that the others take this process's exit for no fault."""

    KEY = "flax_gpt/lifeline"

    def __init__(self, lost):
        client, self.lost = _job().client, lost
        self.me, self.closed, self.once = jax.process_index(), threading.Event(), threading.Lock()
        self.peers, readers = {}, {}  # process index -> its socket, the lines it sends
        if self.me == 0:
            dual = socket.has_dualstack_ipv6()
            with socket.create_server(("::" if dual else "", 0), dualstack_ipv6=dual,
                                      family=socket.AF_INET6 if dual else socket.AF_INET) as server:
                host = _job().coordinator_address.rpartition(":")[0].strip("[]")
                client.key_value_set(self.KEY, f"{host} {server.getsockname()[1]}")
                server.settimeout(CONNECT_TIMEOUT_S)
                others = set(range(1, jax.process_count()))
                while others - set(self.peers):
                    conn, _ = server.accept()
                    conn.settimeout(HELLO_TIMEOUT_S)
                    reader = conn.makefile("r")
                    try:
                        index = int(reader.readline())
                    except (OSError, ValueError):
                        index = None
                    if index not in others or index in self.peers:  # not one of the job's
                        conn.close()
                        continue
                    conn.settimeout(None)
                    self.peers[index], readers[index] = conn, reader
        else:
            host, port = client.blocking_key_value_get(self.KEY, CONNECT_TIMEOUT_S * 1000).split()
            conn = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
            conn.settimeout(None)
            conn.sendall(f"{self.me}\n".encode())
            self.peers[0], readers[0] = conn, conn.makefile("r")
        for index, reader in readers.items():
            threading.Thread(target=self._watch, args=(index, reader), daemon=True).start()

    def _watch(self, index, reader):
        with contextlib.suppress(OSError):  # a reset connection is a closed one
            for line in reader:
                if line == "bye\n":
                    return
                if line.startswith("lost "):  # from process 0
                    self._gone(int(line.split()[1]))
        self._gone(index)  # its end closed without a goodbye

    def _gone(self, index):
        with self.once:  # the first loss heard is the one reported; the process then exits
            if self.closed.is_set():
                return
            self.closed.set()
        if self.me == 0:
            self._send(f"lost {index}\n", [i for i in self.peers if i != index])
        self.lost(index)
        sys.stderr.flush()
        os._exit(LOST_EXIT)

    def _send(self, text, to):
        for i in to:
            with contextlib.suppress(OSError):
                self.peers[i].sendall(text.encode())

    def close(self):
        if not self.closed.is_set():
            self.closed.set()
            self._send("bye\n", list(self.peers))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        """Closed when the job ends, or stops with an error or interrupt that every process
        meets alike. After an unforeseen exception (a bug, Ctrl-C before training started)
        the connections are dropped without a goodbye, so the others hear of it at once, and
        this process exits at once, its traceback printed: at a normal exit it would wait
        SHUTDOWN_TIMEOUT_S at JAX's shutdown barrier for processes that are gone."""
        if kind is None or issubclass(kind, (FlaxGPTError, Interrupted)):
            self.close()
            return
        self.closed.set()
        for conn in self.peers.values():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted before training started; nothing was saved", file=sys.stderr)
        else:
            traceback.print_exception(kind, value, tb)
        sys.stderr.flush()
        os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)


class JobStop:
    """When a JAX job stops for a signal (flax_gpt.core.loop.LocalStop's multi-process
    twin): JAX's preemption sync manager hears SIGTERM, what a scheduler sends before it
    preempts, on any process, finds the first step that no process has passed, and every
    process stops after that step. SIGINT is handed over as SIGTERM; which process got which
    signal is left in the job's key-value store for the report."""

    signals = (signal.SIGINT,)  # SIGTERM is the preemption notifier's own (C++) handler
    KEY = "flax_gpt/interrupt/"
    DECIDED = "flax_gpt/stopped"

    def __init__(self):
        self.told, self.calls = False, 0

    def received(self, signum):
        if not self.told:
            self.told = True
            _job().client.key_value_set(f"{self.KEY}{jax.process_index()}", str(signum))
        signal.raise_signal(signal.SIGTERM)

    def agreed(self, step):
        from jax.experimental import multihost_utils

        # The sync manager counts steps from 0 wherever training starts: a notice that came
        # before the first call (a resume's loading, the first compile) is for its step 1
        self.calls += 1
        if not multihost_utils.reached_preemption_sync_point(self.calls):
            return None
        store = _job().client
        if jax.process_index() == 0:  # decides what every process reports and exits with
            told = sorted((int(key.rpartition("/")[2]), int(value))
                          for key, value in store.key_value_dir_get(self.KEY))
            # SIGTERM straight to the notifier (a scheduler's): no saying which process got it
            decided = f"{told[0][1]} sent to process {told[0][0]}" if told else f"{signal.SIGTERM:d}"
            store.key_value_set(self.DECIDED, decided)
        else:
            decided = store.blocking_key_value_get(self.DECIDED, CONNECT_TIMEOUT_S * 1000)
        signum, _, who = decided.partition(" ")
        return int(signum), who or None


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
