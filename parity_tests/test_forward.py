"""Forward and backward parity: every layer, the logits, the loss, every gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from flax_gpt import model as flax_model
from flax_gpt.core.config import ConfigError
from flax_gpt.core.data import IGNORE_INDEX
from flax_gpt.core.hparams import TrainConfig
from flax_gpt.sidebyside import pair, parity, tolerances
from flax_gpt.sidebyside.tolerances import GRAD_RTOL, LOGITS_ATOL, LOSS_ATOL
from parity_tests.conftest import CONFIGS, batch, tensors_for
from tests.conftest import assert_close
from torch_reference import model as torch_model


def outputs(name, x, y, attention="explicit"):
    fm, tm = pair.build_pair(CONFIGS[name], tensors_for(name), attention=attention)
    return parity.flax_outputs(fm, x, y), parity.torch_outputs(tm, x, y)


def assert_gradients_close(grads, reference):
    assert grads.keys() == reference.keys()
    largest = max(float(np.abs(g).max()) for g in reference.values())
    assert largest > 0, "no gradient to compare: every label ignored?"
    for name, t in reference.items():
        f = grads[name]
        # analytically zero (k.bias; q and k with one key, seq_len 1, where PyTorch's explicit
        # softmax gives exact zeros and a fused kernel rounding): zero up to rounding in both
        if tolerances.is_inert(name) or not np.abs(t).any():
            assert np.abs(f).max() <= GRAD_RTOL * largest and np.abs(t).max() <= GRAD_RTOL * largest
        else:
            assert_close(f, t, rtol=0, atol=GRAD_RTOL * np.abs(t).max(),
                         err_msg=name)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_layers_logits_and_loss(config_name, batch_size):
    config = CONFIGS[config_name]
    x, y = batch(config, batch_size, config.seq_len, seed=batch_size)
    (f_loss, f_logits, f_hidden, _), (t_loss, t_logits, t_hidden, _) = outputs(config_name, x, y)
    assert_close(f_hidden["embed"], t_hidden["embed"], rtol=0, atol=LOGITS_ATOL)
    assert len(f_hidden["layers"]) == len(t_hidden["layers"]) == config.n_layers
    for i, (f, t) in enumerate(zip(f_hidden["layers"], t_hidden["layers"])):
        assert_close(f, t, rtol=0, atol=LOGITS_ATOL, err_msg=f"layer {i}")
    assert_close(f_logits, t_logits, rtol=0, atol=LOGITS_ATOL)
    assert_close(f_loss, t_loss, rtol=0, atol=LOSS_ATOL)
    assert np.isfinite(f_loss)  # seq_len 1 too: conftest.batch gives it real labels


def test_gradients(config_name):
    config = CONFIGS[config_name]
    x, y = batch(config, 3, config.seq_len, seed=7)
    (_, _, _, f_grads), (_, _, _, t_grads) = outputs(config_name, x, y)
    assert_gradients_close(f_grads, t_grads)


def test_fused_attention_is_the_same_function(config_name):
    """jax.nn.dot_product_attention and F.scaled_dot_product_attention against the explicit
    masked softmax of PyTorch: logits, loss and every gradient, in both frameworks."""
    config = CONFIGS[config_name]
    x, y = batch(config, 3, config.seq_len, seed=11)
    flax_explicit, reference = outputs(config_name, x, y)
    for loss, logits, _, grads in (*outputs(config_name, x, y, attention="fused"), flax_explicit):
        assert_close(logits, reference[1], rtol=0, atol=LOGITS_ATOL)
        assert_close(loss, reference[0], rtol=0, atol=LOSS_ATOL)
        assert_gradients_close(grads, reference[3])


def test_fully_ignored_rows_do_not_change_the_mean():
    config = CONFIGS["tiny"]
    x, y = batch(config, 4, config.seq_len, seed=3)
    y[1] = IGNORE_INDEX  # rows 1 and 3 (synthetic_batch ignores the last) are ignored
    (f_loss, *_), (t_loss, *_) = outputs("tiny", x, y)
    keep = [0, 2]
    (f_kept, *_), (t_kept, *_) = outputs("tiny", x[keep], y[keep])
    assert_close(f_loss, t_loss, rtol=0, atol=LOSS_ATOL)
    assert_close(f_loss, f_kept, rtol=0, atol=LOSS_ATOL)
    assert_close(t_loss, t_kept, rtol=0, atol=LOSS_ATOL)


def test_all_ignored_batch_is_nan_in_both():
    config = CONFIGS["tiny"]
    x, y = batch(config, 2, config.seq_len)
    y[:] = IGNORE_INDEX
    (f_loss, *_), (t_loss, *_) = outputs("tiny", x, y)
    assert np.isnan(f_loss) and np.isnan(t_loss)


@settings(max_examples=12, deadline=None)
@given(batch_size=st.integers(1, 4), seq_len=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_property_any_batch_and_length(batch_size, seq_len, seed):
    """Any batch size and any length up to the context: logits and loss agree. Forward only,
    on one pair of models: each new shape compiles, and a forward with its backward costs
    three times a forward (the tests above hold the gradients)."""
    config = CONFIGS["tiny"]
    x, y = batch(config, batch_size, seq_len, seed)
    fm, tm = tiny_pair()
    f_logits = np.asarray(flax_logits(*nnx.split(fm), jnp.asarray(x)))
    f_loss = float(flax_model.cross_entropy(jnp.asarray(f_logits), jnp.asarray(y)))
    with torch.no_grad():
        t_logits = tm(torch.from_numpy(x).long())
        t_loss = float(torch_model.cross_entropy(t_logits, torch.from_numpy(y).long()))
    assert_close(f_logits, t_logits.numpy(), rtol=0, atol=LOGITS_ATOL)
    if np.all(y == IGNORE_INDEX):  # a mean over no labels: NaN in both, and nowhere else
        assert np.isnan(f_loss) and np.isnan(t_loss), (f_loss, t_loss)
    else:
        assert_close(f_loss, t_loss, rtol=0, atol=LOSS_ATOL)


@functools.partial(jax.jit, static_argnums=0)
def flax_logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


@functools.cache
def tiny_pair():
    return pair.build_pair(CONFIGS["tiny"], tensors_for("tiny"))


def test_key_bias_cannot_change_the_output():
    """Why key-bias gradients are zero: a shift of b_k moves a whole row of scores."""
    config = CONFIGS["tiny"]
    x, y = batch(config, 2, config.seq_len)
    shifted = dict(tensors_for("tiny"))
    rng = np.random.default_rng(0)
    for name in shifted:
        if tolerances.is_inert(name):
            shifted[name] = rng.normal(0, 1.0, shifted[name].shape).astype(np.float32)
    for before, after in zip(pair.build_pair(config, tensors_for("tiny")),
                             pair.build_pair(config, shifted)):
        is_flax = hasattr(before, "config") and not hasattr(before, "state_dict")
        run = parity.flax_outputs if is_flax else parity.torch_outputs
        assert_close(run(after, x, y)[1], run(before, x, y)[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_unknown_or_dropout_fused_attention_is_refused(framework):
    def build(config, attention):
        if framework == "flax":
            return flax_model.GPT(config, rngs=nnx.Rngs(0), attention=attention)
        return torch_model.GPT(config, attention=attention)

    with pytest.raises(ConfigError, match="fused attention has no attention dropout"):
        build(CONFIGS["tiny"].replace(dropout=0.1), "fused")
    with pytest.raises(ConfigError, match="unknown attention 'flash'"):
        build(CONFIGS["tiny"], "flash")
    with pytest.raises(ConfigError, match="unknown attention 'flash'"):
        TrainConfig(attention="flash")


def test_too_long_input_is_refused():
    config = CONFIGS["tiny"]
    fm, tm = pair.build_pair(config, tensors_for("tiny"))
    x, y = batch(config, 1, config.seq_len + 1)
    with pytest.raises(ValueError, match="exceeds seq_len"):
        parity.flax_outputs(fm, x, y)
    with pytest.raises(ValueError, match="exceeds seq_len"):
        parity.torch_outputs(tm, x, y)


@pytest.mark.parametrize("precision_name", ["highest", "float64"])
def test_where_they_part_is_named(precision_name):
    """Both frameworks' gradients at every layer's output agree; with PyTorch's head moved
    by 1%, the report names the logits (forward), the top layer's output (backward: the
    first output gradient from the top that fails) and the head's parameters."""
    config = CONFIGS["tiny"]
    x, y = batch(config, 3, config.seq_len, seed=7)
    tensors = tensors_for("tiny")
    wrong = {**tensors, "pred.weight": tensors["pred.weight"] * np.float32(1.01)}
    pair.apply_precision(precision_name)
    try:
        fm = pair.build_pair(config, tensors, precision_name)[0]
        results = [parity.ParityResult({}, "explicit", 3, 0, "", parity.compare_forward(
            fm, pair.build_pair(config, other, precision_name)[1], x, y, precision_name), {})
            for other in (tensors, wrong)]
    finally:
        pair.apply_precision("highest")
    same, moved = ({r.quantity: r for r in result.rows} for result in results)
    outputs = same[f"output gradients ({config.n_layers + 1} outputs)"]
    assert outputs.passed and list(outputs.figures["per_layer_rel"]) == [
        "embed output", *[f"layer {i} output" for i in range(config.n_layers)]]
    assert results[0].divergence == {}
    assert results[1].divergence == {"forward": "logits", "backward": f"layer {config.n_layers - 1} output",
                                     "gradient_tensor": "pred.bias"}  # the last in canonical order
    assert moved[f"output gradients ({config.n_layers + 1} outputs)"].passed is False
