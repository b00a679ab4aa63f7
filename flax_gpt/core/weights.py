"""The canonical weights file, and all conversion between it and each framework's parameters.

The file is safetensors holding the PyTorch reference's `state_dict` names and layouts
(SPEC.md, "Canonical weights"), float32 (float64 for a float64 run's checkpoints, every
tensor alike: the tensors' dtype says which), with the config as JSON under the metadata
key `config`. PyTorch's parameters *are* the canonical tensors; Flax's differ in three ways,
all handled here and nowhere else:

    Linear     weight [out, in]  <->  kernel [in, out] (transposed)
    LayerNorm  weight            <->  scale
    Embedding  weight            <->  embedding  (embed.token, embed.position)

Framework-free: the models wrap these numpy arrays with `jnp.asarray` / `torch.from_numpy`.
"""

import json

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_bytes
from safetensors.numpy import save as save_bytes

from flax_gpt.core.config import ConfigError, GPTConfig
from flax_gpt.core.errors import NonFiniteError, WeightsError
from flax_gpt.core.files import atomic_file

DTYPES = (np.float32, np.float64)  # float32 is the interchange; float64 a float64 run's own


def canonical_shapes(config):
    """Every canonical tensor name, in state_dict order, with its shape. The GPT-2 options
    add `embed.position.weight` (learned positions) and `decoder.final_norm.*` (pre-norm),
    and a tied head has no `pred.*`: its weight is `embed.token.weight`, stored once."""
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    shapes = {"embed.token.weight": (v, d)}
    if config.positions == "learned":
        shapes["embed.position.weight"] = (config.seq_len, d)
    for i in range(config.n_layers):
        layer = f"decoder.layers.{i}"
        for proj in ("q", "k", "v", "out"):
            shapes[f"{layer}.mhma.{proj}.weight"] = (d, d)
            shapes[f"{layer}.mhma.{proj}.bias"] = (d,)
        shapes[f"{layer}.layer_norm1.weight"] = (d,)
        shapes[f"{layer}.layer_norm1.bias"] = (d,)
        shapes[f"{layer}.ffn.fc1.weight"] = (f, d)
        shapes[f"{layer}.ffn.fc1.bias"] = (f,)
        shapes[f"{layer}.ffn.fc2.weight"] = (d, f)
        shapes[f"{layer}.ffn.fc2.bias"] = (d,)
        shapes[f"{layer}.layer_norm2.weight"] = (d,)
        shapes[f"{layer}.layer_norm2.bias"] = (d,)
    if config.pre_norm:
        shapes["decoder.final_norm.weight"] = (d,)
        shapes["decoder.final_norm.bias"] = (d,)
    if not config.tie_embeddings:
        shapes["pred.weight"] = (v, d)
        shapes["pred.bias"] = (v,)
    return shapes


def check(config, tensors):
    """Raise WeightsError naming the first tensor that is missing, unexpected or misshapen."""
    shapes = canonical_shapes(config)
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise WeightsError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all) for "
                           f"config {config.to_json()}")
    unexpected = [name for name in tensors if name not in shapes]
    if unexpected:
        raise WeightsError(f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all): the "
                           f"file does not match its config ({config.n_layers} layers)")
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise WeightsError(f"tensor {name!r} has shape {list(tensor.shape)}, config "
                               f"{config.to_json()} needs {list(shape)}")
        if tensor.dtype not in DTYPES:
            raise WeightsError(f"tensor {name!r} is {tensor.dtype}, canonical weights are float32 "
                               f"(or float64)")
    dtypes = {tensors[name].dtype for name in shapes}
    if len(dtypes) > 1:
        raise WeightsError(f"tensors mix dtypes {sorted(map(str, dtypes))}: a weights file holds "
                           f"one dtype")


def precision_of(tensors):
    """The precision a file's tensors are held at: "float64" for float64, else "highest"."""
    return "float64" if next(iter(tensors.values())).dtype == np.float64 else "highest"


def check_finite(tensors):
    """Raise NonFiniteError naming the first tensor that holds NaN or Inf."""
    refuse_nonfinite((name, np.size(t) - np.count_nonzero(np.isfinite(t)))
                     for name, t in tensors.items())


def refuse_nonfinite(counts):
    """Raise NonFiniteError naming the first of `counts` ((name, how many of its values are
    NaN or Inf) pairs, in canonical order) with any: also the check of a state spread over
    processes, whose backends count their own shards and add the counts up."""
    for name, n in counts:
        if n:
            raise NonFiniteError(f"tensor {name!r} holds {int(n)} NaN or Inf value(s)")


def save(path, config, tensors, *, allow_nonfinite=False):
    """Write canonical `tensors` (name -> float32 or float64 numpy) and `config` to `path`, atomically.
    Tensors holding NaN or Inf are refused unless `allow_nonfinite`: such a file would load
    into a model that only ever answers NaN."""
    check(config, tensors)
    if not allow_nonfinite:
        check_finite(tensors)
    shapes = canonical_shapes(config)
    ordered = {name: np.ascontiguousarray(tensors[name]) for name in shapes}
    # One metadata key only: safetensors keeps metadata in a hash map, so the order of two
    # keys in the header changes from call to call and the bytes would too.
    payload = save_bytes(ordered, metadata={"config": config.to_json()})
    try:
        with atomic_file(path) as f:
            f.write(payload)
    except OSError as e:
        raise WeightsError(f"cannot write weights {path}: {e.strerror}") from None


def load(path, *, allow_nonfinite=False):
    """Read a canonical weights file: `(config, tensors)`, checked against each other. A
    tensor holding NaN or Inf is refused (NonFiniteError) unless `allow_nonfinite`."""
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} does not exist") from None
    except OSError as e:
        raise WeightsError(f"cannot read weights file {path}: {e.strerror}") from None
    try:
        metadata = _metadata(payload)
        tensors = load_bytes(payload)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt: "
                           f"{e})") from None
    if "config" not in metadata:
        raise WeightsError(f"{path} has no 'config' in its metadata: it was not written by "
                           f"flax_gpt.save or torch_reference.save")
    try:
        config = GPTConfig.from_json(metadata["config"])
    except ConfigError as e:
        raise WeightsError(f"{path}: bad config in metadata: {e}") from None
    try:
        check(config, tensors)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    if not allow_nonfinite:
        try:
            check_finite(tensors)
        except NonFiniteError as e:
            raise NonFiniteError(f"{path}: {e}: the weights are unusable (a diverged run?)") from None
    return config, tensors


def header(payload):
    """(the safetensors header of file bytes `payload` as a dict, where its tensor bytes
    start); ValueError for a header that is cut short or not a JSON object."""
    n = int.from_bytes(payload[:8], "little")
    if len(payload) < 8 + n:
        raise ValueError("header is longer than the file")
    fields = json.loads(payload[8:8 + n])
    if not isinstance(fields, dict):
        raise ValueError(f"the header is a JSON {type(fields).__name__}, not an object")
    return fields, 8 + n


def _metadata(payload):
    """The safetensors header's __metadata__ (the numpy loader does not return it), as a dict
    of strings; ValueError for a header of any other shape."""
    metadata = header(payload)[0].get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not an object of strings")
    return metadata


# ---- Flax <-> canonical -----------------------------------------------------------------

_FLAX_LEAF = {"embed.": "embedding", "norm": "scale"}  # else Linear: "kernel"


def _flax_path(name):
    """'decoder.layers.0.mhma.q.weight' -> (('decoder', 'layers', 0, 'mhma', 'q'), 'kernel')."""
    *module, leaf = name.split(".")
    path = tuple(int(p) if p.isdigit() else p for p in module)
    if leaf == "bias":
        return path, "bias"
    module_name = ".".join(module) + "."
    for key, flax_leaf in _FLAX_LEAF.items():
        if key in module_name:
            return path, flax_leaf
    return path, "kernel"


def flax_key(name):
    """Where canonical tensor `name` sits in the Flax parameter tree, and whether it is held
    there transposed: ('decoder', 'layers', 0, 'mhma', 'q', 'kernel'), True."""
    path, leaf = _flax_path(name)
    return (*path, leaf), leaf == "kernel"


def to_flax(tensors):
    """Canonical tensors -> the nested dict of `nnx.state(model, nnx.Param).to_pure_dict()`."""
    tree = {}
    for name, tensor in tensors.items():
        path, leaf = _flax_path(name)
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(tensor.T) if leaf == "kernel" else tensor
    return tree


def from_flax(config, tree):
    """The pure-dict Flax parameter tree -> canonical tensors (numpy, state_dict order)."""
    tensors = {}
    for name in canonical_shapes(config):
        array = np.asarray(flax_leaf(tree, name))
        tensors[name] = np.ascontiguousarray(array.T) if flax_key(name)[1] else array
    check(config, tensors)
    return tensors


def flax_leaf(tree, name):
    """The leaf of canonical tensor `name` in a pure-dict Flax tree, as the tree holds it (a
    kernel transposed), or whatever a tree of the parameters' shape holds there."""
    key, _ = flax_key(name)
    node = tree
    try:
        for part in key:
            node = node[part]
    except (KeyError, TypeError):
        raise WeightsError(f"Flax parameters have no {'/'.join(map(str, key))} for canonical "
                           f"tensor {name!r}") from None
    return node
