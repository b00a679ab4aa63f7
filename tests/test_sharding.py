"""The sharding rules (flax_gpt.core.sharding): parsing --mesh, which dimension each axis
splits, what is left whole, and the refusals. Framework-free and fast; the runs on a mesh of
8 CPU devices are tests/test_mesh.py."""

import math

import pytest

from flax_gpt.core.config import GPTConfig
from flax_gpt.core.sharding import (MeshError, MeshShape, Processes, describe, per_device_elements,
                                    rules)
from flax_gpt.core.weights import canonical_shapes
from tests.conftest import run_cli

TINY = GPTConfig.preset("tiny", n_layers=1)  # n_heads 2, d_model 32, d_ff 128, vocab 64


def test_parse():
    assert MeshShape.parse("data=2,fsdp=2,tensor=2").shape == (2, 2, 2)
    assert MeshShape.parse(" tensor=4 , data=2").shape == (2, 1, 4)
    assert str(MeshShape.parse("fsdp=8")) == "data=1,fsdp=8,tensor=1"


@pytest.mark.parametrize("text,message", [
    ("data=2,fsdp", "AXIS=N pairs"), ("2x2x2", "AXIS=N pairs"), ("model=2", "unknown axis"),
    ("data=2,data=2", "given twice"), ("data=0", "at least 1"), ("data=-1", "AXIS=N pairs"),
])
def test_parse_refusals(text, message):
    with pytest.raises(MeshError, match=message):
        MeshShape.parse(text)


def test_device_and_batch_refusals():
    with pytest.raises(MeshError, match="needs 8 devices, and there are 1"):
        MeshShape(2, 2, 2).check_devices(1)
    with pytest.raises(MeshError, match="multiple of 4"):
        MeshShape(2, 2, 2).check_batch(6)
    MeshShape(2, 2, 2).check_batch(8)  # the tensor axis does not split the batch


def test_megatron_directions_and_fsdp():
    """tensor: q/k/v/fc1 by output (dim 0 of [out, in]), out/fc2 by input, pred by vocabulary;
    fsdp: the largest dimension the tensor axis left free."""
    r = rules(TINY, MeshShape(fsdp=2, tensor=2))
    layer = "decoder.layers.0"
    for proj in "qkv":
        assert r[f"{layer}.mhma.{proj}.weight"] == ("tensor", "fsdp")
        assert r[f"{layer}.mhma.{proj}.bias"] == ("tensor",)
    assert r[f"{layer}.mhma.out.weight"] == ("fsdp", "tensor")
    assert r[f"{layer}.mhma.out.bias"] == ("fsdp",)
    assert r[f"{layer}.ffn.fc1.weight"] == ("tensor", "fsdp")
    assert r[f"{layer}.ffn.fc1.bias"] == ("tensor",)
    assert r[f"{layer}.ffn.fc2.weight"] == ("fsdp", "tensor")
    assert r[f"{layer}.ffn.fc2.bias"] == ("fsdp",)
    assert r["pred.weight"] == ("tensor", "fsdp") and r["pred.bias"] == ("tensor",)
    assert r["embed.token.weight"] == ("fsdp", None)  # vocabulary 64 > d_model 32
    assert r[f"{layer}.layer_norm1.weight"] == ("fsdp",)


def test_left_whole_where_the_axis_does_not_divide():
    config = TINY.replace(vocab_size=66)  # 2 heads, vocabulary 66
    r = rules(config, MeshShape(tensor=4))
    assert r["decoder.layers.0.mhma.q.weight"] == (None, None)  # 2 heads over 4: whole
    assert r["decoder.layers.0.mhma.out.weight"] == (None, None)
    assert r["decoder.layers.0.ffn.fc1.weight"] == ("tensor", None)  # d_ff 128 over 4
    assert r["pred.weight"] == (None, None) and r["pred.bias"] == (None,)  # 66 over 4
    lines = "\n".join(describe(config, MeshShape(tensor=4)))
    assert "tensor=4 does not divide n_heads=2" in lines
    assert "tensor=4 does not divide vocab_size=66" in lines
    # fsdp=4 divides d_model 32 but not 66: the embedding falls back to its other dimension
    assert rules(config, MeshShape(fsdp=4))["embed.token.weight"] == (None, "fsdp")
    assert rules(config, MeshShape(fsdp=4))["pred.bias"] == (None,)


def test_axes_of_size_one_split_nothing():
    r = rules(TINY, MeshShape(data=8))
    assert all(axis is None for spec in r.values() for axis in spec)


def test_per_device_elements():
    total = sum(math.prod(s) for s in canonical_shapes(TINY).values())
    assert per_device_elements(TINY, MeshShape()) == total
    assert per_device_elements(TINY, MeshShape(data=8)) == total  # replicated
    assert per_device_elements(TINY, MeshShape(fsdp=2)) * 2 == total  # every tensor has an even dim
    whole = sum(math.prod(s) for n, s in canonical_shapes(TINY).items()
                if n == "embed.token.weight" or "layer_norm" in n or n.endswith(("out.bias", "fc2.bias")))
    assert per_device_elements(TINY, MeshShape(tensor=2)) == whole + (total - whole) // 2


def test_cli_refuses_a_mesh_that_does_not_match_the_devices(tmp_path):
    result = run_cli("train", "--preset", "tiny", "--synthetic", "--steps", "1", "--out",
                     tmp_path / "run", "--mesh", "data=2,fsdp=2,tensor=2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "flax-gpt train: error: --mesh data=2,fsdp=2,tensor=2 needs 8 devices, and there are 1: "
        "make the product of the axes 1 (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "gives 8)"]
    assert not (tmp_path / "run").exists()


def test_processes_from_flags_or_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert Processes.resolve({}) is None  # nothing asked: one process
    assert Processes.resolve({}, distributed=True) == Processes()  # all for JAX to detect
    assert Processes.resolve(env) == Processes("10.0.0.1:1234", 4, 3)
    flags = {"coordinator": "host:99", "num_processes": "2", "process_id": "0"}
    assert Processes.resolve(env, **flags) == Processes("host:99", 2, 0)  # flags first
    assert Processes.resolve({"JAX_PROCESS_ID": ""}) is None  # an empty variable is unset


@pytest.mark.parametrize("env,flags,message", [
    ({}, {"coordinator": "host"}, "--coordinator takes HOST:PORT"),
    ({}, {"coordinator": "host:0"}, "port from 1 to 65535"),
    ({"JAX_COORDINATOR_ADDRESS": ":80"}, {}, "JAX_COORDINATOR_ADDRESS takes HOST:PORT"),
    ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES takes a whole number"),
    ({}, {"process_id": "-1"}, "--process-id takes a whole number"),
    ({"JAX_NUM_PROCESSES": "0"}, {}, "JAX_NUM_PROCESSES must be at least 1"),
    ({"JAX_PROCESS_ID": "2"}, {"num_processes": "2"}, "JAX_PROCESS_ID 2 is out of range"),
])
def test_processes_refusals(env, flags, message):
    with pytest.raises(MeshError, match=message):
        Processes.resolve(env, **flags)
