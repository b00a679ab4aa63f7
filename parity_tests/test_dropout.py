"""Dropout exists in both frameworks (default 0.0): active in training, off in eval."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt.sidebyside import pair, parity, tolerances
from flax_gpt.core.config import GPTConfig
from parity_tests.conftest import batch
from tests.conftest import assert_close
from torch_reference import model as torch_model

RATE = 0.25


@pytest.fixture(scope="module")
def dropout_pair():
    config = GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=1, dropout=RATE)
    return config, pair.build_pair(config, pair.random_weights(config))


def test_eval_mode_is_deterministic_and_equal(dropout_pair):
    config, (fm, tm) = dropout_pair
    x, y = batch(config, 2, config.seq_len)
    assert_close(parity.flax_outputs(fm, x, y)[1], parity.torch_outputs(tm, x, y)[1],
                 rtol=0, atol=tolerances.LOGITS_ATOL)


def test_train_mode_drops_at_the_rate(dropout_pair):
    config, _ = dropout_pair
    ids = np.random.default_rng(0).integers(0, 64, (64, 16))
    fm = flax_model.GPT(config, rngs=nnx.Rngs(0))
    fm.train()
    f_embed = np.asarray(fm.embed(jnp.asarray(ids)))
    tm = torch_model.GPT(config).train()
    with torch.no_grad():
        t_embed = tm.embed(torch.from_numpy(ids)).numpy()
    for embed in (f_embed, t_embed):
        assert abs((embed == 0).mean() - RATE) < 0.02
    fm.eval()
    tm.eval()
    assert (np.asarray(fm.embed(jnp.asarray(ids))) != 0).all()
