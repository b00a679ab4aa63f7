"""Both frameworks held to Hugging Face's own GPT-2 (`transformers.GPT2LMHeadModel`), an
implementation nobody here wrote, through the one adapter (flax_gpt/core/hf.py).

A small GPT-2 with every parameter randomised (biases and LayerNorm gains and biases too: GPT-2's
own init leaves those at 0 and 1, and a bug there would hide) is imported twice, from its
state_dict() and from a save_pretrained folder. In float64: logits, every hidden state, the loss
and every gradient equal to HF's; greedy generation token for token. In float32 at the highest
matmul precision: logits against HF's eager and sdpa attention. And the controls: five planted
mistakes that the same float64 comparison must catch.
"""

import json
import os

import numpy as np
import pytest
import torch

try:
    import transformers
except ImportError:  # the lent GPU machines have no transformers; CI must have it
    if os.environ.get("CI"):
        raise
    pytest.skip("transformers is not installed: pip install -e '.[test]'", allow_module_level=True)

from flax_gpt import experiments
from flax_gpt.core import hf, weights
from flax_gpt.sidebyside import pair
from parity_tests.against_hf import (FRAMEWORKS, differences, float32_logits, greedy, hf_model,
                                     hf_outputs, hf_state, ids_cases, imported, ours)
from tests.conftest import assert_close, assert_same
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

LOGITS_ATOL = 1e-12  # float64: logits, hidden states and the loss, against HF's
GRAD_RTOL = 1e-12  # float64: each gradient, relative to its largest |value|
FLOAT32_LOGITS_ATOL = 1e-5  # float32 highest, against HF's eager and sdpa
CONTROL_MARGIN = 1e3  # a planted mistake must miss by this many tolerances at least
NEW_TOKENS = 50
CONTEXT = 64  # the tiny shape's seq_len: the full context


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(config, float32 canonical tensors) of the tiny randomised GPT-2, imported from its
    state_dict; the save_pretrained route is held equal to it bit for bit."""
    hf32 = hf_model("tiny", torch.float32)
    config, tensors = imported(hf32)
    folder = tmp_path_factory.mktemp("hf") / "saved"
    hf32.save_pretrained(folder)
    r = experiments.import_hf(folder, folder.parent / "w.safetensors")
    loaded_config, loaded = weights.load(r.path)
    assert loaded_config == config
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert_same(loaded[name], tensors[name], err_msg=name)
    return config, tensors


def misses(mine, theirs):
    """{quantity: how many tolerances it misses by} for each quantity beyond its tolerance
    (NaN included); empty when all agree."""
    found = {}
    for quantity, diff in differences(mine, theirs).items():
        ratio = diff / (GRAD_RTOL if quantity.startswith("gradient") else LOGITS_ATOL)
        if not ratio <= 1:
            found[quantity] = ratio
    return found


@pytest.fixture(scope="module")
def hf64():
    return hf_model("tiny", torch.float64)


@pytest.fixture
def float64_hf(hf64):
    """The float64 HF model, with JAX's x64 mode for this test only."""
    pair.apply_precision("float64")
    yield hf64
    pair.apply_precision("highest")


@pytest.mark.parametrize("case", ["full-context", "one-token"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_float64_equals_hugging_face(model, float64_hf, framework, case):
    config, tensors = model
    ids = ids_cases(config, CONTEXT)[case]
    assert misses(ours(framework, config, tensors, ids), hf_outputs(float64_hf, ids, config)) == {}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_greedy_generation_equals_hugging_face(model, float64_hf, framework):
    config, tensors = model
    prompt = [0, 7, config.vocab_size - 1, 3]
    mine, theirs = greedy(framework, config, tensors, float64_hf, prompt, NEW_TOKENS)
    assert len(theirs) == NEW_TOKENS and mine == theirs


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_float32_logits_near_hugging_face(model, framework, attention):
    config, tensors = model
    hf32 = hf_model("tiny", torch.float32, attention)
    for ids in ids_cases(config, CONTEXT).values():
        with torch.no_grad():
            expected = hf32(torch.from_numpy(ids)).logits.numpy()
        assert_close(float32_logits(framework, config, tensors, ids), expected, rtol=0,
                     atol=FLOAT32_LOGITS_ATOL)


# ---- controls: the comparison above must catch each of these ------------------------------

def untransposed_c_proj(config, tensors):
    """The adapter forgetting c_proj's Conv1D transpose (square: no shape error)."""
    return config, {n: t.T.copy() if n.endswith("mhma.out.weight") else t for n, t in tensors.items()}


def swapped_q_k(config, tensors):
    """c_attn split in the wrong order: k's rows taken for q and q's for k."""
    swap = {"mhma.q.": "mhma.k.", "mhma.k.": "mhma.q."}
    out = dict(tensors)
    for name, t in tensors.items():
        for a, b in swap.items():
            if a in name:
                out[name.replace(a, b)] = t
    return config, out


def untied_head(config, tensors):
    """A copy of the embedding as an untied head: the same logits, but the embedding's
    gradient then misses the head's share."""
    return (config.replace(tie_embeddings=False),
            {**tensors, "pred.weight": tensors["embed.token.weight"].copy(),
             "pred.bias": np.zeros(config.vocab_size, np.float32)})


def flax_epsilon(config, tensors):
    """LayerNorm at Flax's default epsilon, 1e-6, instead of GPT-2's 1e-5."""
    return config.replace(layer_norm_eps=1e-6), tensors


CONTROLS = {"c_proj not transposed": (untransposed_c_proj, {}, "logits"),
            "q and k swapped": (swapped_q_k, {}, "logits"),
            "untied head": (untied_head, {}, "gradient embed.token.weight"),
            "LayerNorm eps 1e-6": (flax_epsilon, {}, "logits"),
            # ours kept, HF's activation changed: erf GELU on one side of the comparison
            "erf GELU": (lambda c, t: (c, t), {"activation_function": "gelu"}, "logits")}


@pytest.mark.parametrize("control", list(CONTROLS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_float64_comparison_catches(model, float64_hf, framework, control):
    plant, hf_changes, caught_at = CONTROLS[control]
    config, tensors = plant(*model)
    reference = hf_model("tiny", torch.float64, **hf_changes) if hf_changes else float64_hf
    ids = ids_cases(model[0], CONTEXT)["full-context"]
    missed = misses(ours(framework, config, tensors, ids), hf_outputs(reference, ids, model[0]))
    assert caught_at in missed, sorted(missed)
    assert missed[caught_at] > CONTROL_MARGIN, missed[caught_at]


def test_import_export_import_is_bit_exact(model, tmp_path):
    config, tensors = model
    weights.save(tmp_path / "w.safetensors", config, tensors)
    experiments.export_hf(tmp_path / "w.safetensors", tmp_path / "hf")
    again = experiments.import_hf(tmp_path / "hf", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    assert again.config == config
    # and transformers itself loads the export, to HF's own state_dict bit for bit
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    for name, t in hf_state(hf_model("tiny", torch.float32)).items():
        assert_same(loaded.state_dict()[name].numpy(), t, err_msg=name)


def test_every_checkpoint_format_imports_to_the_same_tensors(model, tmp_path):
    """save_pretrained's file (the fixture's), an old pytorch_model.bin (keys without
    `transformer.`, the attn.bias / masked_bias buffers, lm_head stored beside wte), a sharded
    safetensors folder, a bfloat16 file (widened exactly) and a float64 file (kept float64)."""
    config, tensors = model
    hf32 = hf_model("tiny", torch.float32)
    state = hf32.state_dict()

    def folder(name, files):
        (tmp_path / name).mkdir()
        hf32.config.to_json_file(tmp_path / name / "config.json")
        for file, write in files.items():
            write(tmp_path / name / file)
        return experiments.import_hf(tmp_path / name, tmp_path / f"{name}.safetensors").path

    old = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(hf32.config.n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.uint8))
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    names = sorted(state)
    halves = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
    index = {"metadata": {}, "weight_map": {n: f for f, ns in halves.items() for n in ns}}
    as_numpy = {n: t.numpy() for n, t in state.items()}
    paths = {
        "bin": folder("bin", {"pytorch_model.bin": lambda p: torch.save(old, p)}),
        "sharded": folder("sharded", {
            "model.safetensors.index.json": lambda p: p.write_text(json.dumps(index)),
            **{f: (lambda p, ns=ns: save_file({n: as_numpy[n] for n in ns}, str(p),
                                              metadata={"format": "pt"}))
               for f, ns in halves.items()}}),
    }
    for path in paths.values():
        got = weights.load(path)[1]
        assert got.keys() == tensors.keys()
        for name in tensors:
            assert_same(got[name], tensors[name], err_msg=f"{path.name}: {name}")

    bf16 = {n: t.to(torch.bfloat16) for n, t in state.items() if n != "lm_head.weight"}
    got = weights.load(folder("bf16", {"model.safetensors": lambda p: save_torch(
        bf16, str(p), metadata={"format": "pt"})}))[1]
    widened = hf.tensors_from_hf(config, {n: t.float().numpy() for n, t in bf16.items()})
    for name in tensors:
        assert_same(got[name], widened[name], err_msg=name)
    f64 = hf.tensors_from_hf(config, {n: t.double().numpy() for n, t in state.items()})
    assert all(t.dtype == np.float64 for t in f64.values())
    for name in tensors:
        assert_same(f64[name].astype(np.float32), tensors[name], err_msg=name)


def test_an_untied_checkpoint_imports_with_a_zero_bias_and_exports_back(tmp_path):
    hf32 = hf_model("tiny", torch.float32, tie_word_embeddings=False)
    assert not hf32.lm_head.weight.data_ptr() == hf32.transformer.wte.weight.data_ptr()
    hf32.save_pretrained(tmp_path / "untied")
    r = experiments.import_hf(tmp_path / "untied", tmp_path / "w.safetensors")
    config, tensors = weights.load(r.path)
    assert not config.tie_embeddings
    assert_same(tensors["pred.weight"], hf32.lm_head.weight.detach().numpy())
    assert_same(tensors["pred.bias"], np.zeros(config.vocab_size, np.float32))
    experiments.export_hf(r.path, tmp_path / "back")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back")
    for name, t in hf_state(hf32).items():
        assert_same(loaded.state_dict()[name].numpy(), t, err_msg=name)
