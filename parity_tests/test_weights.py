"""The canonical weights file: bit-exact round trips and clear errors naming the tensor."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

import flax_gpt
import torch_reference
from flax_gpt import model as flax_model
from flax_gpt.sidebyside import parity, tolerances
from flax_gpt.core import weights
from flax_gpt.core.errors import WeightsError
from parity_tests.conftest import CONFIGS, batch, tensors_for
from tests.conftest import assert_close
from torch_reference import model as torch_model


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32, name
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name


def test_torch_file_flax_file_torch_is_bit_exact(config_name, tmp_path):
    config = CONFIGS[config_name]
    torch.manual_seed(1)
    tm = torch_model.GPT(config)
    torch_reference.save(tm, tmp_path / "a.safetensors")
    fm = flax_gpt.load(tmp_path / "a.safetensors")
    flax_gpt.save(fm, tmp_path / "b.safetensors")
    back = torch_reference.load(tmp_path / "b.safetensors")
    assert_bit_equal(torch_model.canonical(back), torch_model.canonical(tm))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_flax_file_torch_file_is_bit_exact(config_name, tmp_path):
    config = CONFIGS[config_name]
    fm = flax_model.GPT(config, rngs=nnx.Rngs(5))
    flax_gpt.save(fm, tmp_path / "a.safetensors")
    torch_reference.save(torch_reference.load(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    assert_bit_equal(weights.load(tmp_path / "b.safetensors")[1], flax_model.canonical(fm))
    assert weights.load(tmp_path / "b.safetensors")[0] == config


def test_loaded_models_agree(tmp_path):
    config = CONFIGS["d36-3heads"]
    weights.save(tmp_path / "w.safetensors", config, tensors_for("d36-3heads"))
    fm, tm = flax_gpt.load(tmp_path / "w.safetensors"), torch_reference.load(tmp_path / "w.safetensors")
    x, y = batch(config, 2, config.seq_len)
    assert_close(parity.flax_outputs(fm, x, y)[1], parity.torch_outputs(tm, x, y)[1],
                 rtol=0, atol=tolerances.LOGITS_ATOL)


def test_canonical_names_are_the_torch_state_dict():
    config = CONFIGS["one-head"]
    tm = torch_model.GPT(config)
    shapes = weights.canonical_shapes(config)
    assert list(tm.state_dict()) == list(shapes)
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == shapes
    flax_params = nnx.to_pure_dict(nnx.state(flax_model.GPT(config, rngs=nnx.Rngs(0)), nnx.Param))
    assert sum(np.size(leaf) for leaf in jax_leaves(flax_params)) == sum(
        np.prod(s) for s in shapes.values())


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def edited(tensors, **changes):
    out = dict(tensors)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("change,message", [
    (lambda t: edited(t, pred__bias=None), "missing tensor 'pred.bias'"),
    (lambda t: {**t, "extra.weight": np.zeros(2, np.float32)}, "unexpected tensor 'extra.weight'"),
    (lambda t: edited(t, pred__bias=np.zeros(3, np.float32)), r"'pred.bias' has shape \[3\]"),
    (lambda t: edited(t, pred__bias=t["pred.bias"].astype(np.float16)), "'pred.bias' is float16"),
    (lambda t: edited(t, pred__bias=t["pred.bias"].astype(np.float64)), "tensors mix dtypes"),
])
def test_bad_tensors_are_named(tmp_path, change, message):
    config = CONFIGS["tiny"]
    with pytest.raises(WeightsError, match=message):
        weights.save(tmp_path / "w.safetensors", config, change(tensors_for("tiny")))
    assert list(tmp_path.iterdir()) == [], "nothing half-written"


def write_raw(path, tensors, metadata):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)


def test_config_that_does_not_match_the_tensors(tmp_path):
    config = CONFIGS["tiny"]
    wrong = config.replace(n_layers=3)
    write_raw(tmp_path / "w.safetensors", tensors_for("tiny"), {"config": wrong.to_json()})
    with pytest.raises(WeightsError, match="missing tensor 'decoder.layers.2.mhma.q.weight'"):
        flax_gpt.load(tmp_path / "w.safetensors")
    write_raw(tmp_path / "w.safetensors", tensors_for("tiny"),
              {"config": config.replace(d_ff=64).to_json()})
    with pytest.raises(WeightsError, match="'decoder.layers.0.ffn.fc1.weight' has shape"):
        torch_reference.load(tmp_path / "w.safetensors")


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"\x00" * 4), "truncated or corrupt"),
    (lambda p: p.unlink(), "does not exist"),
])
def test_damaged_file(tmp_path, damage, message):
    path = tmp_path / "w.safetensors"
    weights.save(path, CONFIGS["tiny"], tensors_for("tiny"))
    damage(path)
    with pytest.raises(WeightsError, match=message):
        weights.load(path)


def test_file_without_config_metadata(tmp_path):
    write_raw(tmp_path / "w.safetensors", tensors_for("tiny"), {"other": "x"})
    with pytest.raises(WeightsError, match="no 'config' in its metadata"):
        weights.load(tmp_path / "w.safetensors")
    write_raw(tmp_path / "w.safetensors", tensors_for("tiny"), {"config": json.dumps({"d_model": 4})})
    with pytest.raises(WeightsError, match="bad config"):
        weights.load(tmp_path / "w.safetensors")
