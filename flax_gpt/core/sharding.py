"""How a training run is laid out on a device mesh: the one source of truth for sharding.

Framework-free: the rules are read from the canonical parameter names and shapes
(flax_gpt.core.weights.canonical_shapes), in the canonical layout (Linear weight [out, in]),
as one entry per dimension: a mesh axis name or None (not split). The Flax side turns them
into jax.sharding.NamedSharding (flax_gpt/mesh.py); the printed table is `describe`.

The mesh has three axes, `data`, `fsdp` and `tensor`:

    batch      rows split over (data, fsdp) together: data * fsdp must divide the batch size
    data       parameters and optimizer state replicated (plain data parallelism)
    fsdp       every parameter, and with it its AdamW moments, split over its largest
               dimension that the tensor axis leaves free and that fsdp divides (ZeRO-3 /
               FSDP); XLA gathers it where a matmul needs it whole
    tensor     Megatron-style: q, k, v and fc1 split by output (heads / hidden units), out
               and fc2 by input, so the pair needs one reduction; their biases follow the
               output (q, k, v, fc1) or stay whole (out, fc2); pred split by vocabulary

A dimension is left whole where the axis does not divide it: q, k, v and out need whole
heads (n_heads divisible by tensor), fc1 and fc2 d_ff, pred the vocabulary size, fsdp the
dimension it takes. An axis of size 1 splits nothing and is not written.
"""

import re
from dataclasses import dataclass

from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.weights import canonical_shapes

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


class MeshError(FlaxGPTError):
    """A --mesh that cannot be used: malformed, or not matching the devices or the batch."""


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the three mesh axes; `parse("data=2,fsdp=2,tensor=2")`."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text):
        """'data=2,fsdp=2,tensor=2' (axes in any order, a missing one is 1) -> MeshShape."""
        sizes = {}
        for part in str(text).split(","):
            match = re.fullmatch(r"\s*([a-z]+)\s*=\s*(\d+)\s*", part)
            if not match:
                raise MeshError(f"--mesh takes AXIS=N pairs separated by commas, axes "
                                f"{', '.join(AXES)} (e.g. data=2,fsdp=2,tensor=2); got {text!r}")
            axis, size = match.group(1), int(match.group(2))
            if axis not in AXES:
                raise MeshError(f"--mesh: unknown axis {axis!r}: the axes are {', '.join(AXES)}")
            if axis in sizes:
                raise MeshError(f"--mesh: axis {axis!r} given twice in {text!r}")
            if size < 1:
                raise MeshError(f"--mesh: axis {axis} must be at least 1, got {size}")
            sizes[axis] = size
        return cls(**sizes)

    @property
    def shape(self):
        return (self.data, self.fsdp, self.tensor)

    @property
    def size(self):
        return self.data * self.fsdp * self.tensor

    @property
    def batch_ways(self):
        return self.data * self.fsdp

    def to_dict(self):
        return dict(zip(AXES, self.shape))

    def __str__(self):
        return ",".join(f"{axis}={n}" for axis, n in self.to_dict().items())

    def check_devices(self, count):
        if self.size != count:
            raise MeshError(f"--mesh {self} needs {self.size} devices, and there are {count}: make "
                            f"the product of the axes {count} (on CPU, XLA_FLAGS="
                            f"--xla_force_host_platform_device_count={self.size} gives {self.size})")

    def check_batch(self, batch_size):
        if batch_size % self.batch_ways:
            raise MeshError(f"--batch-size {batch_size} does not split over data*fsdp = "
                            f"{self.batch_ways} devices of --mesh {self}: make it a multiple of "
                            f"{self.batch_ways}")


def tensor_split(name, config):
    """(canonical dimension the tensor axis splits, the size that must divide by it, what that
    size is) for a Megatron-split tensor, else None."""
    heads = (config.n_heads, "n_heads")
    hidden = (config.d_ff, "d_ff")
    vocab = (config.vocab_size, "vocab_size")
    if re.search(r"\.mhma\.[qkv]\.(weight|bias)$", name):
        return (0, *heads)  # by output: whole heads
    if name.endswith(".mhma.out.weight"):
        return (1, *heads)  # by input
    if re.search(r"\.ffn\.fc1\.(weight|bias)$", name):
        return (0, *hidden)
    if name.endswith(".ffn.fc2.weight"):
        return (1, *hidden)
    if name in ("pred.weight", "pred.bias"):
        return (0, *vocab)
    return None


def tensor_ways(size, mesh):
    """The parts the tensor axis splits a dimension of `size` (n_heads, d_ff, the vocabulary
    size) into: mesh.tensor where it divides, else 1 (left whole)."""
    return mesh.tensor if size % mesh.tensor == 0 else 1


def rules(config, mesh):
    """{canonical name: (axis or None per dimension, canonical layout)} for every tensor.

    Each AdamW moment takes its parameter's entry; scalars (step counts) are replicated.
    """
    specs = {}
    for name, shape in canonical_shapes(config).items():
        spec = [None] * len(shape)
        split = tensor_split(name, config)
        if split and tensor_ways(split[1], mesh) > 1:
            spec[split[0]] = "tensor"
        if mesh.fsdp > 1:
            free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % mesh.fsdp == 0]
            if free:
                spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"  # largest, then first
        specs[name] = tuple(spec)
    return specs


def layer_pattern(name):
    """'decoder.layers.3.mhma.q.weight' -> 'decoder.layers.*.mhma.q.weight'."""
    return re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.*.", name)


def describe(config, mesh):
    """The rules as printable lines: a header, then one line per tensor (layers folded into
    `*`), with why a dimension an axis could have split was left whole."""
    shapes, specs = canonical_shapes(config), rules(config, mesh)
    lines = [f"mesh {mesh} ({mesh.size} devices): batch rows over data*fsdp = {mesh.batch_ways}; "
             f"parameters and AdamW moments (canonical [out, in] layout; '-' = whole):"]
    seen = set()
    for name, shape in shapes.items():
        pattern = layer_pattern(name)
        if pattern in seen:
            continue
        seen.add(pattern)
        spec = specs[name]
        dims = ", ".join(f"{n}:{axis or '-'}" for n, axis in zip(shape, spec))
        note = ""
        split = tensor_split(name, config)
        if mesh.tensor > 1 and split and "tensor" not in spec:
            note = f"  (tensor={mesh.tensor} does not divide {split[2]}={split[1]})"
        elif mesh.fsdp > 1 and "fsdp" not in spec and None in spec:
            note = f"  (fsdp={mesh.fsdp} divides no dimension left free)"
        lines.append(f"  {pattern} [{dims}]{note}")
    return lines


def per_device_elements(config, mesh):
    """Parameter elements each device holds under `rules` (the AdamW moments hold twice as
    many): the figure `bench --mesh` measures from the arrays themselves. Every layer is
    laid out alike, so one is counted for all: the memory check must refuse a config of a
    million layers, not list them."""
    one = config.replace(n_layers=1)
    sizes, specs = mesh.to_dict(), rules(one, mesh)
    total = 0
    for name, shape in canonical_shapes(one).items():
        n = 1
        for dim, axis in zip(shape, specs[name]):
            n *= dim // sizes[axis] if axis else dim
        total += n * (config.n_layers if name.startswith("decoder.layers.") else 1)
    return total


# The environment variables a multi-process Flax run reads where its flags are not given
# (JAX itself reads JAX_COORDINATOR_ADDRESS; the two others are this project's).
PROCESS_ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
               "process_id": "JAX_PROCESS_ID"}
PROCESS_FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
                 "process_id": "--process-id"}


@dataclass(frozen=True)
class Processes:
    """How this process joins a multi-process JAX job (`jax.distributed.initialize`): the
    coordinator's HOST:PORT, the number of processes and this one's index. A field left None
    is for JAX to detect from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def resolve(cls, environ, *, distributed=False, **flags):
        """The settings from `flags` (coordinator=, num_processes=, process_id=; None where
        not given), else from PROCESS_ENV in `environ`; None for a single-process run (nothing
        given and not `distributed`). Refused (MeshError) when malformed or out of range."""
        given = {}
        for field, var in PROCESS_ENV.items():
            value = flags.get(field)
            source = PROCESS_FLAGS[field]
            if value is None and environ.get(var, "") != "":
                value, source = environ[var], var
            if value is not None:
                given[field] = (value, source)
        if not given and not distributed:
            return None
        settings = {}
        if "coordinator" in given:
            text, source = given["coordinator"]
            host, _, port = str(text).rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise MeshError(f"{source} takes HOST:PORT with a port from 1 to 65535 (e.g. "
                                f"10.0.0.1:1234), got {text!r}")
            settings["coordinator"] = str(text)
        for field in ("num_processes", "process_id"):
            if field in given:
                text, source = given[field]
                if not re.fullmatch(r"\s*\d+\s*", str(text)):
                    raise MeshError(f"{source} takes a whole number, got {text!r}")
                settings[field] = int(text)
        n, i = settings.get("num_processes"), settings.get("process_id")
        if n is not None and n < 1:
            raise MeshError(f"{given['num_processes'][1]} must be at least 1, got {n}")
        if n is not None and i is not None and i >= n:
            raise MeshError(f"{given['process_id'][1]} {i} is out of range for {n} processes: "
                            f"give 0 to {n - 1}")
        return cls(**settings)
