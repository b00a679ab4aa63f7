"""Training parity: AdamW (optax vs torch.optim) for STEPS steps on real batches."""

import numpy as np
import pytest

from flax_gpt.sidebyside import pair, parity, tolerances
from flax_gpt.sidebyside.parity import parity_batches
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.data import TokenDataset
from flax_gpt.sidebyside.tolerances import MIN_EVIDENCE_SHARE, TRAIN_LOSS_ATOL, TRAIN_PARAM_ATOL
from tests.conftest import assert_close, assert_same
from tests.datasets import prepare_dataset

STEPS = 30  # the long run is test_float64's 300 steps of tiny; 30 keep the suite in its time
LR = 3e-3  # these tiny models take it, and visibly learn in 30 steps


@pytest.fixture(scope="module")
def dataset(shakespeare, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "ds"
    prepare_dataset([(shakespeare.name, shakespeare.read_bytes())], out, max_vocab=512)
    return TokenDataset.load(out)


@pytest.mark.parametrize("shape,grad_accum,grad_clip,attention", [
    (dict(seq_len=16, d_model=32, n_heads=2, n_layers=2), 1, 1.0, "explicit"),
    (dict(seq_len=12, d_model=36, n_heads=3, n_layers=2, d_ff=50), 2, 0.5, "explicit"),
    (dict(seq_len=8, d_model=24, n_heads=1, n_layers=1), 1, 0.0, "explicit"),
    (dict(seq_len=12, d_model=36, n_heads=3, n_layers=2, d_ff=50), 1, 1.0, "fused"),
])
def test_adamw_run_matches(dataset, shape, grad_accum, grad_clip, attention):
    config = GPTConfig(vocab_size=dataset.vocab_size, **shape)
    tc = parity.default_train_config(attention=attention).replace(
        steps=STEPS, lr=LR, grad_accum=grad_accum, grad_clip=grad_clip)
    flat = parity_batches(config, dataset, tc.batch_size, config.seq_len, STEPS * grad_accum, 0)
    batches = [tuple(np.concatenate(part) for part in zip(*flat[i:i + grad_accum]))
               for i in range(0, len(flat), grad_accum)]
    assert batches[0][0].shape == (grad_accum, tc.batch_size, config.seq_len)
    tensors = pair.random_weights(config)
    run = parity.train_both(config, tensors, batches, tc, mask_kinks=True)
    f_losses, t_losses, f_params, t_params = (run.flax.losses, run.torch.losses, run.flax.params,
                                              run.torch.params)
    assert len(f_losses) == len(run.kept) == STEPS and min(run.kept) >= MIN_EVIDENCE_SHARE, run.kept
    if grad_clip:  # the clipping branch ran in both, at the same steps
        assert_same(run.flax.grad_norms > grad_clip, run.torch.grad_norms > grad_clip)
    assert_close(f_losses, t_losses, rtol=0, atol=TRAIN_LOSS_ATOL)
    assert np.mean(t_losses[-5:]) < np.mean(t_losses[:5]) - 0.5, "the run must actually learn"
    for name in t_params:
        if not tolerances.is_inert(name):
            assert_close(f_params[name], t_params[name], rtol=0,
                         atol=TRAIN_PARAM_ATOL, err_msg=name)
