"""The float64 truth: both frameworks against each other with no masking of any kind, both
against an independent float64 implementation (parity_tests/reference.py), and float32 and
bf16 judged against the truth (Flax's error at most TRUTH_RATIO x PyTorch's plus a floor).
"""

import numpy as np
import pytest
import torch

from flax_gpt.core import weights
from flax_gpt.core.config import GPTConfig
from flax_gpt.sidebyside import pair, parity, tolerances
from flax_gpt.sidebyside.tolerances import DIRECT
from parity_tests import reference
from parity_tests.conftest import CONFIGS, batch, tensors_for

F64 = DIRECT["float64"]
REFERENCE_LOGITS_ATOL = 1e-12  # both frameworks against the independent implementation
REFERENCE_GRAD_RTOL = 1e-11
REFERENCE_TRAIN_ATOL = 1e-10
# GPT-2 small's shape (12 layers, d_model 768, 12 heads) at a short context and a small
# vocabulary, so that three float64 implementations fit the suite's time.
GPT2_SHAPED = GPTConfig(vocab_size=512, seq_len=8, d_model=768, n_heads=12, n_layers=12)


@pytest.fixture
def float64():
    """JAX's x64 mode for this test only; the suite's float32 `highest` after it."""
    pair.apply_precision("float64")
    yield
    pair.apply_precision("highest")


def assert_rows_pass(rows, expected_kinds):
    assert rows, "no rows: nothing was compared"
    failed = [(r.quantity, r.max_abs, r.tolerance) for r in rows if r.passed is False]
    assert not failed, failed
    names = " ".join(r.quantity for r in rows)
    for kind in expected_kinds:
        assert kind in names, f"no {kind!r} row in {names}"


CASES = {**{name: (CONFIGS[name], lambda name=name: tensors_for(name)) for name in CONFIGS},
         "gpt2-shaped": (GPT2_SHAPED, lambda: pair.random_weights(GPT2_SHAPED))}


@pytest.mark.parametrize("name", list(CASES))
def test_frameworks_and_reference_agree_in_float64(float64, tmp_path, name):
    config, tensors = CASES[name][0], CASES[name][1]()
    x, y = batch(config, 2, config.seq_len, seed=5)
    fm, tm = pair.build_pair(config, tensors, "float64")
    assert_rows_pass(parity.compare_forward(fm, tm, x, y, "float64"),
                     ["layer 0 output", "logits", "loss", "gradients"])
    weights.save(tmp_path / "w.safetensors", config, tensors)  # the float32 interchange file
    ref_config, ref_weights = reference.read_weights(tmp_path / "w.safetensors")
    r_loss, r_logits, r_layers, r_grads = reference.loss_and_grads(ref_config, ref_weights, x, y)
    for out in (parity.flax_outputs(fm, x, y), parity.torch_outputs(tm, x, y)):
        loss, logits, hidden, grads = out
        assert logits.dtype == np.float64
        np.testing.assert_allclose(logits, r_logits.numpy(), rtol=0, atol=REFERENCE_LOGITS_ATOL)
        for mine, theirs in zip(hidden["layers"], r_layers):
            np.testing.assert_allclose(mine, theirs.numpy(), rtol=0, atol=REFERENCE_LOGITS_ATOL)
        np.testing.assert_allclose(loss, r_loss, rtol=0, atol=F64.loss)
        largest = max(float(g.abs().max()) for g in r_grads.values())
        assert largest > 0, "no gradient to compare"
        for n, g in r_grads.items():
            # the key bias's gradient is exactly 0 (rounding noise), and with seq_len 1 so are
            # q's and k's (softmax over one key is 1): those are judged against the largest
            scale = largest if tolerances.is_inert(n) else float(g.abs().max()) or largest
            np.testing.assert_allclose(grads[n], g.numpy(), rtol=0,
                                       atol=REFERENCE_GRAD_RTOL * scale, err_msg=n)


def training_batches(config, n, grad_accum=1, seed=0):
    """n steps of (grad_accum, 3, T) batches with something to learn: each row counts up
    from a random start (mod vocab_size), so the next token follows from the current one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows = (rng.integers(0, config.vocab_size, (grad_accum, 3, 1))
                + np.arange(config.seq_len + 1)) % config.vocab_size
        x, y = rows[..., :-1].astype(np.int32), rows[..., 1:].astype(np.int32)
        out.append((x, y))
    return out


@pytest.mark.parametrize("name,steps,grad_accum", [
    ("tiny", 300, 1), ("one-head", 30, 2), ("seq-len-1", 30, 1), ("d36-3heads", 30, 1)])
def test_training_agrees_in_float64(float64, name, steps, grad_accum):
    """AdamW with warmup, cosine decay and clipping: loss <= 1e-10 at every step, parameters
    <= 1e-9 at the end, no masking."""
    config = CONFIGS[name]
    tc = parity.default_train_config("float64").replace(steps=steps, grad_accum=grad_accum,
                                                        lr=3e-3, warmup_steps=min(10, steps // 3))
    rows = parity.compare_training(config, tensors_for(name), training_batches(config, steps, grad_accum), tc)
    assert_rows_pass(rows, ["train loss, each of", "parameters after"])


@pytest.mark.parametrize("name,grad_accum", [("tiny", 1), ("d36-3heads", 2)])
def test_training_agrees_with_the_reference(float64, tmp_path, name, grad_accum):
    """20 AdamW steps of both frameworks against the reference's own AdamW and schedule."""
    config, steps = CONFIGS[name], 20
    tc = parity.default_train_config("float64").replace(steps=steps, grad_accum=grad_accum,
                                                        lr=3e-3, warmup_steps=5, min_lr_ratio=0.2)
    batches = training_batches(config, steps, grad_accum, seed=100)
    f_losses, t_losses, *_ = parity.train_both(config, tensors_for(name), batches, tc)
    weights.save(tmp_path / "w.safetensors", config, tensors_for(name))
    ref_config, ref_weights = reference.read_weights(tmp_path / "w.safetensors")
    r_losses, _ = reference.train(ref_config, ref_weights, batches, steps=steps, lr=tc.lr,
                                  warmup=tc.warmup_steps, min_ratio=tc.min_lr_ratio, b1=tc.beta1,
                                  b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay,
                                  clip=tc.grad_clip)
    assert r_losses[-1] < r_losses[0], "the run must learn"
    np.testing.assert_allclose(f_losses, r_losses, rtol=0, atol=REFERENCE_TRAIN_ATOL)
    np.testing.assert_allclose(t_losses, r_losses, rtol=0, atol=REFERENCE_TRAIN_ATOL)


def truth_of(config, tensors, x, y):
    pair.apply_precision("float64")
    try:
        return parity.torch_outputs(pair.build_pair(config, tensors, "float64")[1], x, y, "float64")
    finally:
        pair.apply_precision("highest")


@pytest.mark.parametrize("precision", ["highest", "default", "bf16"])
def test_lower_precisions_are_judged_against_the_truth(config_name, precision):
    config = CONFIGS[config_name]
    x, y = batch(config, 3, config.seq_len, seed=13)
    truth = truth_of(config, tensors_for(config_name), x, y)
    pair.apply_precision(precision)
    try:
        fm, tm = pair.build_pair(config, tensors_for(config_name), precision)
        rows = parity.compare_forward(fm, tm, x, y, precision, truth=truth)
    finally:
        pair.apply_precision("highest")
    assert_rows_pass(rows, ["logits vs float64", "loss vs float64", "gradients", "layer 0 output vs float64"])
    if precision == "bf16":
        shares = {r.quantity: r.max_abs for r in rows}
        assert shares["top-1 agreement of flax with float64"] > 0.9


def test_a_less_accurate_flax_fails_against_the_truth():
    """The judgement can fail: Flax in bf16 held against PyTorch in float32."""
    config = CONFIGS["tiny"]
    x, y = batch(config, 3, config.seq_len, seed=13)
    truth = truth_of(config, tensors_for("tiny"), x, y)
    fm, _ = pair.build_pair(config, tensors_for("tiny"), "bf16")
    _, tm = pair.build_pair(config, tensors_for("tiny"), "highest")
    f = parity.flax_outputs(fm, x, y)
    t = parity.torch_outputs(tm, x, y)
    rows = parity.truth_rows(f, t, truth, "float32")
    assert any(r.passed is False for r in rows if r.quantity.startswith("logits"))


def test_training_is_judged_against_the_truth():
    config = CONFIGS["tiny"]
    tc = parity.default_train_config("highest").replace(steps=30, lr=3e-3)
    batches = training_batches(config, 30, seed=7)
    pair.apply_precision("float64")
    try:
        truth = parity.train_truth(config, tensors_for("tiny"), batches, tc)
    finally:
        pair.apply_precision("highest")
    rows = parity.compare_training(config, tensors_for("tiny"), batches, tc, truth=truth)
    assert_rows_pass(rows, ["train loss vs float64", "train loss, each of"])
    window_row = next(r for r in rows if "vs float64" in r.quantity)
    assert len(window_row.figures["flax_window_errors"]) == 3


def test_a_float64_model_loads_from_a_float32_file_exactly(float64, tmp_path):
    import flax_gpt
    import torch_reference

    config = CONFIGS["tiny"]
    weights.save(tmp_path / "w.safetensors", config, tensors_for("tiny"))
    fm = flax_gpt.load(tmp_path / "w.safetensors", precision="float64")
    tm = torch_reference.load(tmp_path / "w.safetensors", precision="float64")
    assert next(tm.parameters()).dtype == torch.float64
    for model in (flax_gpt.model.canonical(fm), torch_reference.model.canonical(tm)):
        for n, t in tensors_for("tiny").items():
            assert model[n].dtype == np.float64
            np.testing.assert_array_equal(model[n], t.astype(np.float64))
    flax_gpt.save(fm, tmp_path / "f64.safetensors")  # a float64 model's own file keeps float64
    _, saved = weights.load(tmp_path / "f64.safetensors")
    assert weights.precision_of(saved) == "float64"
    assert flax_gpt.load(tmp_path / "f64.safetensors").config == config
