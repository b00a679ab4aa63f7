"""Both frameworks held to Hugging Face's own GPT-2 (`transformers.GPT2LMHeadModel`), an
implementation nobody here wrote, through the one adapter (flax_gpt/core/hf.py).

A small GPT-2 with every parameter randomised (biases and LayerNorm gains and biases too: GPT-2's
own init leaves those at 0 and 1, and a bug there would hide) is imported twice, from its
state_dict() and from a save_pretrained folder. In float64: logits, every hidden state, the loss
and every gradient equal to HF's; greedy generation token for token. In float32 at the highest
matmul precision: logits against HF's eager and sdpa attention. And the controls: five planted
mistakes that the same float64 comparison must catch.
"""

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

import flax_gpt.model as flax_model
import torch_reference.model as torch_model
from flax_gpt import experiments
from flax_gpt.core import hf, weights
from flax_gpt.sample import generate as flax_generate
from flax_gpt.sidebyside import pair, parity, tolerances
from tests.conftest import assert_close, assert_same
from torch_reference.sample import generate as torch_generate

LOGITS_ATOL = 1e-12  # float64: logits, hidden states and the loss, against HF's
# HF's own loss (labels=ids) is float32 even for a float64 model: ForCausalLMLoss "upcasts"
# with logits.float(), which rounds float64 logits down to float32 (transformers
# loss/loss_utils.py). It is held to float32's rounding; the float64 loss and gradients are
# taken through the same cross-entropy on HF's float64 logits, without that cast.
HF_LOSS_RTOL = 4 * float(np.finfo(np.float32).eps)
GRAD_RTOL = 1e-12  # float64: each gradient, relative to its largest |value|
FLOAT32_LOGITS_ATOL = 1e-5  # float32 highest, against HF's eager and sdpa
CONTROL_MARGIN = 1e3  # a planted mistake must miss by this many tolerances at least
NEW_TOKENS = 50

SHAPE = dict(vocab_size=53, n_positions=64, n_embd=24, n_layer=3, n_head=3)  # d_model 24: dk 8


def hf_model(dtype=torch.float64, attention="eager", **changes):
    """The randomised GPT-2, seeded: the same parameters every call, at `dtype`."""
    end = SHAPE["vocab_size"] - 1  # GPT-2's <|endoftext|> is its last id
    config = transformers.GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=end, eos_token_id=end, **changes)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_((1.0 if gain else 0.0) + 0.2 * torch.randn(p.shape, generator=generator))
    return model.to(dtype).eval()


def hf_state(model):
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(config, float32 canonical tensors) of hf_model, imported from its state_dict; the
    save_pretrained route is held equal to it bit for bit."""
    model = hf_model(torch.float32)
    config = hf.config_from_hf(model.config.to_dict())
    tensors = hf.tensors_from_hf(config, hf_state(model))
    folder = tmp_path_factory.mktemp("hf") / "saved"
    model.save_pretrained(folder)
    r = experiments.import_hf(folder, folder.parent / "w.safetensors")
    loaded_config, loaded = weights.load(r.path)
    assert loaded_config == config
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert_same(loaded[name], tensors[name], err_msg=name)
    return config, tensors


def ids_cases(config):
    """Full context with ids 0 and vocab-1 in it, and a one-token row."""
    rng = np.random.default_rng(3)
    full = rng.integers(0, config.vocab_size, (2, config.seq_len))
    full[0, :2], full[1, -2:] = 0, config.vocab_size - 1
    return {"full-context": full, "one-token": np.array([[config.vocab_size - 1]])}


def hf_outputs(model, ids, config):
    """HF's float64 loss, logits, hidden states and gradients, the last in the canonical names
    and layouts of `config` through the adapter itself (a gradient has its parameter's
    layout). The loss is HF's shifted-label cross-entropy without its float32 cast (see
    HF_LOSS_RTOL), after HF's own loss is checked against it. A one-token row has no label:
    its forward alone (loss and gradients None)."""
    model.zero_grad(set_to_none=True)
    ids = torch.from_numpy(ids)
    if ids.shape[1] == 1:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        return None, out.logits.numpy(), [h.numpy() for h in out.hidden_states], None
    out = model(ids, labels=ids, output_hidden_states=True)
    logits = out.logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    assert_close(out.loss.item(), loss.item(), rtol=HF_LOSS_RTOL, atol=0)
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    return (loss.item(), out.logits.detach().numpy(),
            [h.detach().numpy() for h in out.hidden_states], hf.tensors_from_hf(config, grads))


def ours(framework, config, tensors, ids):
    """Our loss, logits, hidden states in HF's order (the embedding, each layer's output but the
    last, then the final LayerNorm's) and canonical gradients, in float64, on SPEC's labels
    (the next token; the last position ignored), which are HF's shifted labels."""
    labels = np.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    if framework == "flax":
        out = parity.flax_outputs(flax_model.build(config, tensors, precision="float64"), ids, labels)
    else:
        out = parity.torch_outputs(torch_model.build(config, tensors, precision="float64"), ids,
                                   labels, "float64")
    loss, logits, hidden, grads = out
    return loss, logits, [hidden["embed"], *hidden["layers"][:-1], hidden["final_norm"]], grads


def misses(mine, theirs):
    """{quantity: how many tolerances it misses by} for each quantity beyond its tolerance
    (NaN included); empty when all agree. Without labels (`theirs` has no loss) the forward
    alone."""
    (loss, logits, hidden, grads), (h_loss, h_logits, h_hidden, h_grads) = mine, theirs
    assert len(hidden) == len(h_hidden)
    ratios = {"logits": np.max(np.abs(logits - h_logits)) / LOGITS_ATOL}
    for i, (h, g) in enumerate(zip(hidden, h_hidden)):
        ratios[f"hidden state {i}"] = np.max(np.abs(h - g)) / LOGITS_ATOL
    if h_loss is not None:
        assert h_grads.keys() <= grads.keys()  # an untied head (a control) has pred.* too
        ratios["loss"] = abs(loss - h_loss) / LOGITS_ATOL
        largest = max(float(np.max(np.abs(g))) for g in h_grads.values())
        for name, g in h_grads.items():
            # the key bias's gradient is 0 up to rounding (softmax ignores a shift of all of a
            # query's scores): judged against the largest gradient, as in test_float64
            scale = largest if tolerances.is_inert(name) else float(np.max(np.abs(g)))
            assert scale > 0, f"HF's gradient of {name} is all zero: nothing to compare"
            ratios[f"gradient {name}"] = np.max(np.abs(grads[name] - g)) / (GRAD_RTOL * scale)
    return {q: float(r) for q, r in ratios.items() if not r <= 1}


@pytest.fixture(scope="module")
def hf64():
    return hf_model(torch.float64)


@pytest.fixture
def float64_hf(hf64):
    """The float64 HF model, with JAX's x64 mode for this test only."""
    pair.apply_precision("float64")
    yield hf64
    pair.apply_precision("highest")


@pytest.mark.parametrize("case", ["full-context", "one-token"])
@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_float64_equals_hugging_face(imported, float64_hf, framework, case):
    config, tensors = imported
    ids = ids_cases(config)[case]
    assert misses(ours(framework, config, tensors, ids), hf_outputs(float64_hf, ids, config)) == {}


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_greedy_generation_equals_hugging_face(imported, float64_hf, framework):
    config, tensors = imported
    prompt = [0, 7, config.vocab_size - 1, 3]
    ids = torch.tensor([prompt])
    # the mask given: HF would otherwise read the prompt's id 0 as padding and hide it
    expected = float64_hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(expected) == NEW_TOKENS
    if framework == "flax":
        model, generate = flax_model.build(config, tensors, precision="float64"), flax_generate
    else:
        model, generate = torch_model.build(config, tensors, precision="float64"), torch_generate
    got = generate(model, prompt, NEW_TOKENS, temperature=0.0)
    assert got.tokens[0] == expected


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_float32_logits_near_hugging_face(imported, framework, attention):
    config, tensors = imported
    model = hf_model(torch.float32, attention)
    for ids in ids_cases(config).values():
        with torch.no_grad():
            expected = model(torch.from_numpy(ids)).logits.numpy()
        if framework == "flax":
            got = np.asarray(flax_model.build(config, tensors)(ids))
        else:
            with torch.no_grad():
                got = torch_model.build(config, tensors)(torch.from_numpy(ids)).numpy()
        assert_close(got, expected, rtol=0, atol=FLOAT32_LOGITS_ATOL)


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
@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_float64_comparison_catches(imported, float64_hf, framework, control):
    plant, hf_changes, caught_at = CONTROLS[control]
    config, tensors = plant(*imported)
    reference = hf_model(torch.float64, **hf_changes) if hf_changes else float64_hf
    ids = ids_cases(imported[0])["full-context"]
    missed = misses(ours(framework, config, tensors, ids), hf_outputs(reference, ids, imported[0]))
    assert caught_at in missed, sorted(missed)
    assert missed[caught_at] > CONTROL_MARGIN, missed[caught_at]


def test_import_export_import_is_bit_exact(imported, tmp_path):
    config, tensors = imported
    weights.save(tmp_path / "w.safetensors", config, tensors)
    experiments.export_hf(tmp_path / "w.safetensors", tmp_path / "hf")
    again = experiments.import_hf(tmp_path / "hf", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    assert again.config == config
    # and transformers itself loads the export, to HF's own state_dict bit for bit
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    for name, t in hf_state(hf_model(torch.float32)).items():
        assert_same(loaded.state_dict()[name].numpy(), t, err_msg=name)
