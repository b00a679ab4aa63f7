"""Hugging Face GPT-2 checkpoints (`GPT2LMHeadModel`) <-> canonical weights: the one adapter.

One rename-and-layout table, applied each way (torchtitan's state_dict_adapter):

    transformer.wte.weight               embed.token.weight
    transformer.wpe.weight               embed.position.weight
    transformer.h.{i}.ln_1.*             decoder.layers.{i}.layer_norm1.*
    transformer.h.{i}.attn.c_attn.*      decoder.layers.{i}.mhma.{q,k,v}.*  (Conv1D, fused: split)
    transformer.h.{i}.attn.c_proj.*      decoder.layers.{i}.mhma.out.*      (Conv1D)
    transformer.h.{i}.ln_2.*             decoder.layers.{i}.layer_norm2.*
    transformer.h.{i}.mlp.c_fc.*         decoder.layers.{i}.ffn.fc1.*       (Conv1D)
    transformer.h.{i}.mlp.c_proj.*       decoder.layers.{i}.ffn.fc2.*       (Conv1D)
    transformer.ln_f.*                   decoder.final_norm.*
    lm_head.weight                       embed.token.weight (tied) or pred.weight (+ a zero pred.bias)

A Conv1D weight is [in, out], the transpose of a Linear's. `c_attn` is q, k and v concatenated
along its output axis, in that order. `c_proj` is square, so a missing transpose raises no
shape error: only the numbers catch it (parity_tests/test_hf.py). The `attn.bias` /
`attn.masked_bias` buffers of old checkpoints are not weights and are skipped. Anything else
unknown, missing or misshapen is refused, naming it, and so is a config the options cannot
express: nothing is approximated.

Framework-free (numpy and safetensors): a `pytorch_model.bin` is read by the caller
(flax_gpt.experiments.import_hf), which alone may need torch.
"""

import json
import numbers
import re

import numpy as np
from safetensors.numpy import save_file

from flax_gpt.core import weights
from flax_gpt.core.config import ConfigError, GPTConfig
from flax_gpt.core.errors import FlaxGPTError, WeightsError
from flax_gpt.core.files import atomic_dir

GPT2_VOCAB, GPT2_END = 50257, 50256  # GPT-2's vocabulary and its <|endoftext|>
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
EXPORT_FILES = (CONFIG_FILE, SAFETENSORS_FILE)  # what write_folder writes

# HF activation_function -> ours; every name here is the same function (gelu_pytorch_tanh is
# torch's own tanh approximation of it). Export writes the first name of each.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# GPT2Config flags whose non-default values change the function; no option expresses them.
UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
               "reorder_and_upcast_attn": False, "add_cross_attention": False}
_SKIPPED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers
_LAYER = {"ln_1": "layer_norm1", "attn.c_proj": "mhma.out", "ln_2": "layer_norm2",
          "mlp.c_fc": "ffn.fc1", "mlp.c_proj": "ffn.fc2"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---- config --------------------------------------------------------------------------------

def config_from_hf(hf):
    """Our GPTConfig of a GPT-2 config.json (a dict); a ConfigError naming the first field
    that no option expresses or that is not of its type."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json holds a JSON {type(hf).__name__}, not an object")
    if hf.get("model_type") != "gpt2":
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}: only GPT-2 "
                          f"checkpoints (model_type 'gpt2', GPT2LMHeadModel) can be imported")
    for name, supported in UNSUPPORTED.items():
        if hf.get(name, supported) != supported:
            raise ConfigError(f"config.json sets {name}={hf[name]!r}: the model has no such "
                              f"option (only {name}={supported!r} is GPT-2's own attention)")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"config.json's activation_function {activation!r} is not one the model "
                          f"implements: choose one of {', '.join(ACTIVATIONS)}")
    tie = hf.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise ConfigError(f"config.json's tie_word_embeddings must be true or false, got {tie!r}")
    drops = {name: hf.get(name, 0.1) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    numeric = {"layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5), **drops}
    for name, value in numeric.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ConfigError(f"config.json's {name} must be a number, got {value!r}")
    if len(set(drops.values())) > 1:
        raise ConfigError(f"config.json's dropouts differ ({drops}): the model has one dropout "
                          f"rate for all three places; make them equal")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], seq_len=hf["n_positions"],
                         d_model=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"],
                         d_ff=hf.get("n_inner") or 0, dropout=float(drops["resid_pdrop"]),
                         layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                         norm="pre", activation=ACTIVATIONS[activation], positions="learned",
                         tie_embeddings=tie, init="gpt2")
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}, which a GPT-2 config holds") from None


def config_to_hf(config, dtype="float32"):
    """The config.json of `config` for GPT2LMHeadModel; a ConfigError where GPT-2 cannot
    express it (the article's post-norm or sinusoidal positions)."""
    if not config.pre_norm or config.positions != "learned":
        raise ConfigError(f"GPT-2 has pre-norm blocks and learned positions; this model has norm "
                          f"{config.norm!r} and positions {config.positions!r}, which "
                          f"GPT2LMHeadModel cannot hold: export a model with GPT-2's options "
                          f"(e.g. --preset gpt2)")
    activation = next(hf for hf, ours in ACTIVATIONS.items() if ours == config.activation)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.seq_len, "n_ctx": config.seq_len,
            "n_embd": config.d_model, "n_head": config.n_heads, "n_layer": config.n_layers,
            "n_inner": config.d_ff, "activation_function": activation,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout, "layer_norm_epsilon": config.layer_norm_eps,
            "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": config.tie_embeddings,
            # GPT-2's <|endoftext|>, for GPT-2's vocabulary only: this project's datasets have
            # their own <eos> (core/data.py), which a config.json cannot name
            "bos_token_id": GPT2_END if config.vocab_size == GPT2_VOCAB else None,
            "eos_token_id": GPT2_END if config.vocab_size == GPT2_VOCAB else None,
            "torch_dtype": dtype}


# ---- tensors -------------------------------------------------------------------------------

def _hf_name(name):
    """A checkpoint key without GPT2LMHeadModel's `transformer.` prefix (GPT2Model has none)."""
    return name.removeprefix("transformer.")


def is_mask_buffer(name):
    """Whether checkpoint key `name` is an old checkpoint's causal-mask buffer, not a weight."""
    return bool(_SKIPPED.search(_hf_name(name)))


def tensors_from_hf(config, state):
    """Canonical tensors (state_dict order) of a GPT-2 state dict (name -> numpy), which must
    hold exactly the tensors `config` needs, each of its shape: float64 where every tensor is
    float64 (the float64 tier's own), else float32 (half precisions widen exactly)."""
    state = {_hf_name(n): t for n, t in state.items() if not is_mask_buffer(n)}
    shapes = weights.canonical_shapes(config)
    d, out, used = config.d_model, {}, set()

    def take(hf, name, conv1d=False):
        if hf not in state:
            raise WeightsError(f"the checkpoint has no {hf!r}, which a GPT-2 of {config.n_layers} "
                               f"layers, d_model {config.d_model} holds")
        t = np.asarray(state[hf])
        expected = shapes[name][::-1] if conv1d else shapes[name]
        if hf.endswith("c_attn.weight"):
            expected = (d, 3 * d)
        elif hf.endswith("c_attn.bias"):
            expected = (3 * d,)
        if tuple(t.shape) != tuple(expected):
            raise WeightsError(f"checkpoint tensor {hf!r} has shape {list(t.shape)}, GPT-2 of this "
                               f"config needs {list(expected)}")
        used.add(hf)
        return t.T if conv1d else t

    out["embed.token.weight"] = take("wte.weight", "embed.token.weight")
    out["embed.position.weight"] = take("wpe.weight", "embed.position.weight")
    for i in range(config.n_layers):
        ours, hf = f"decoder.layers.{i}.", f"h.{i}."
        q = f"{ours}mhma.q."
        w = take(hf + "attn.c_attn.weight", q + "weight", conv1d=True)  # (3d, d): q, k, v rows
        b = take(hf + "attn.c_attn.bias", q + "bias")
        for j, proj in enumerate("qkv"):
            out[f"{ours}mhma.{proj}.weight"] = w[j * d:(j + 1) * d]
            out[f"{ours}mhma.{proj}.bias"] = b[j * d:(j + 1) * d]
        for theirs, mine in _LAYER.items():
            conv1d = theirs in _CONV1D
            out[f"{ours}{mine}.weight"] = take(f"{hf}{theirs}.weight", f"{ours}{mine}.weight", conv1d)
            out[f"{ours}{mine}.bias"] = take(f"{hf}{theirs}.bias", f"{ours}{mine}.bias")
    out["decoder.final_norm.weight"] = take("ln_f.weight", "decoder.final_norm.weight")
    out["decoder.final_norm.bias"] = take("ln_f.bias", "decoder.final_norm.bias")
    head = "lm_head.weight"
    if config.tie_embeddings:
        if head in state:  # an old checkpoint stores the tied head too: it must be the same
            if not np.array_equal(take(head, "embed.token.weight"), out["embed.token.weight"]):
                raise WeightsError("the checkpoint's lm_head.weight differs from wte.weight, and "
                                   "its config ties them (tie_word_embeddings): it is inconsistent")
    else:
        out["pred.weight"] = take(head, "embed.token.weight")
        out["pred.bias"] = np.zeros(config.vocab_size, out["pred.weight"].dtype)  # lm_head has none
    unknown = sorted(set(state) - used)
    if unknown:
        raise WeightsError(f"unknown checkpoint tensor {unknown[0]!r} ({len(unknown)} unknown in "
                           f"all): not a GPT2LMHeadModel of this config")
    dtype = np.float64 if all(t.dtype == np.float64 for t in out.values()) else np.float32
    out = {name: np.ascontiguousarray(out[name], dtype) for name in shapes}
    weights.check(config, out)
    return out


def tensors_to_hf(config, tensors):
    """The GPT2LMHeadModel state dict (name -> numpy, Conv1D layouts) of canonical tensors; a
    tied head is left out, as save_pretrained leaves it."""
    weights.check(config, tensors)
    config_to_hf(config)  # refuses what GPT-2 cannot hold
    if not config.tie_embeddings and np.any(tensors["pred.bias"]):
        raise WeightsError("pred.bias is not all zero, and GPT2LMHeadModel's lm_head has no bias: "
                           "this model cannot be exported without changing its outputs")
    t = tensors
    state = {"transformer.wte.weight": t["embed.token.weight"],
             "transformer.wpe.weight": t["embed.position.weight"]}
    for i in range(config.n_layers):
        ours, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        state[hf + "attn.c_attn.weight"] = np.concatenate(
            [t[f"{ours}mhma.{p}.weight"] for p in "qkv"]).T  # (d, 3d)
        state[hf + "attn.c_attn.bias"] = np.concatenate([t[f"{ours}mhma.{p}.bias"] for p in "qkv"])
        for theirs, mine in _LAYER.items():
            w = t[f"{ours}{mine}.weight"]
            state[f"{hf}{theirs}.weight"] = w.T if theirs in _CONV1D else w
            state[f"{hf}{theirs}.bias"] = t[f"{ours}{mine}.bias"]
    state["transformer.ln_f.weight"] = t["decoder.final_norm.weight"]
    state["transformer.ln_f.bias"] = t["decoder.final_norm.bias"]
    if not config.tie_embeddings:
        state["lm_head.weight"] = t["pred.weight"]
    return {name: np.ascontiguousarray(v) for name, v in state.items()}


# ---- folders -------------------------------------------------------------------------------

def read_config(folder):
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{folder} has no {CONFIG_FILE}: pass a save_pretrained folder") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read {folder / CONFIG_FILE}: {e}") from None


def read_safetensors(folder):
    """The state dict of `folder`'s model.safetensors (or of every shard its index names);
    None when it has neither."""
    index = folder / SAFETENSORS_INDEX
    try:
        if index.is_file():
            shards = json.loads(index.read_text())["weight_map"].values()
            return {n: t for shard in sorted(set(shards)) for n, t in load_safetensors(folder / shard).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read {index}: {type(e).__name__}: {e}") from None
    if (folder / SAFETENSORS_FILE).is_file():
        return load_safetensors(folder / SAFETENSORS_FILE)
    return None


# safetensors dtypes a checkpoint's weights may have; numpy has no bfloat16, which widens to
# float32 exactly (its bits are a float32's upper half)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def load_safetensors(path):
    """{name: float numpy array} of one safetensors file, bfloat16 widened to float32; a
    WeightsError for a corrupt file or a tensor that is not floating point."""
    try:
        payload = path.read_bytes()
        fields, data = weights.header(payload)
        tensors = {}
        for name, entry in fields.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise WeightsError(f"{path}: tensor {name!r} is {entry['dtype']}, not floating "
                                   f"point: not a checkpoint of weights")
            start, end = entry["data_offsets"]
            raw = np.frombuffer(payload[data + start:data + end], _DTYPES[entry["dtype"]])
            if entry["dtype"] == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = raw.reshape(entry["shape"])
        return tensors
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read {path}: not a readable safetensors file "
                           f"({type(e).__name__}: {e})") from None


def write_folder(folder, config, tensors, *, force=False):
    """A folder GPT2LMHeadModel.from_pretrained loads: config.json and model.safetensors (in
    the tensors' own dtype), written under a temporary name and renamed into place; an
    existing `folder` is replaced only with `force`, and only if it is an export itself
    (check_export_target)."""
    check_export_target(folder, force=force)
    dtype = "float64" if weights.precision_of(tensors) == "float64" else "float32"
    hf_config, state = config_to_hf(config, dtype), tensors_to_hf(config, tensors)
    with atomic_dir(folder, force=force) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        # transformers refuses a safetensors file without format "pt" in its metadata
        save_file(state, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})


def check_export_target(folder, *, force=False, source=None):
    """Refuse (FlaxGPTError) an export folder that exists, unless `force` and it holds only
    what an export writes: --force must never delete a run, a dataset or a folder of runs;
    nor may it be, or hold, `source`."""
    if source is not None and (folder.resolve() == source.resolve()
                               or folder.resolve() in source.resolve().parents):
        raise FlaxGPTError(f"--out {folder} holds the weights being exported ({source}): choose "
                           f"another folder")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FlaxGPTError(f"--out {folder} is a file: choose a folder name")
    if not force:
        raise FlaxGPTError(f"--out {folder} exists: choose another --out, or pass --force to "
                           f"replace it")
    others = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES)
    if others or not (folder / CONFIG_FILE).is_file():
        raise FlaxGPTError(f"--out {folder} is not a Hugging Face export (it holds "
                           f"{', '.join(others[:3]) or 'no config.json'}): --force replaces only an "
                           f"earlier export; choose another --out")
