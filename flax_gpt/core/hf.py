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
import re

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from flax_gpt.core import weights
from flax_gpt.core.config import ConfigError, GPTConfig
from flax_gpt.core.errors import WeightsError
from flax_gpt.core.files import atomic_dir

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"

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
    that no option expresses."""
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
    drops = {name: hf.get(name, 0.1) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) > 1:
        raise ConfigError(f"config.json's dropouts differ ({drops}): the model has one dropout "
                          f"rate for all three places; make them equal")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], seq_len=hf["n_positions"],
                         d_model=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"],
                         d_ff=hf.get("n_inner") or 0, dropout=float(drops["resid_pdrop"]),
                         layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                         norm="pre", activation=ACTIVATIONS[activation], positions="learned",
                         tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init="gpt2")
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
            # GPT-2's <|endoftext|> is its last id (50256)
            "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1,
            "torch_dtype": dtype}


# ---- tensors -------------------------------------------------------------------------------

def _hf_name(name):
    """A checkpoint key without GPT2LMHeadModel's `transformer.` prefix (GPT2Model has none)."""
    return name.removeprefix("transformer.")


def tensors_from_hf(config, state):
    """Canonical tensors (state_dict order) of a GPT-2 state dict (name -> numpy), which must
    hold exactly the tensors `config` needs, each of its shape: float64 where every tensor is
    float64 (the float64 tier's own), else float32 (half precisions widen exactly)."""
    state = {_hf_name(n): t for n, t in state.items() if not _SKIPPED.search(_hf_name(n))}
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
    t, d = tensors, config.d_model
    state = {"transformer.wte.weight": t["embed.token.weight"],
             "transformer.wpe.weight": t["embed.position.weight"]}
    for i in range(config.n_layers):
        ours, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        state[hf + "attn.c_attn.weight"] = np.concatenate(
            [t[f"{ours}mhma.{p}.weight"] for p in "qkv"]).T  # (d, 3d)
        state[hf + "attn.c_attn.bias"] = np.concatenate([t[f"{ours}mhma.{p}.bias"] for p in "qkv"])
        assert state[hf + "attn.c_attn.weight"].shape == (d, 3 * d)
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
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {n: t for shard in shards for n, t in load_file(folder / shard).items()}
        if (folder / SAFETENSORS_FILE).is_file():
            return load_file(folder / SAFETENSORS_FILE)
    except (OSError, SafetensorError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read the safetensors weights in {folder}: {e}") from None
    return None


def write_folder(folder, config, tensors, *, force=False):
    """A folder GPT2LMHeadModel.from_pretrained loads: config.json and model.safetensors (in
    the tensors' own dtype), written under a temporary name and renamed into place; an
    existing `folder` is replaced only with `force`."""
    dtype = "float64" if weights.precision_of(tensors) == "float64" else "float32"
    hf_config, state = config_to_hf(config, dtype), tensors_to_hf(config, tensors)
    with atomic_dir(folder, force=force) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        # transformers refuses a safetensors file without format "pt" in its metadata
        save_file(state, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
