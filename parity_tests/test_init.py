"""Both frameworks implement flax_gpt.core.config.init_stds: normal weights and embeddings
(the article's scheme or GPT-2's, whose residual projections are scaled by 1/sqrt(2 n_layers)),
zero biases, LayerNorm ones/zeros. Their statistics must match (the values, of course, do
not)."""

import pytest
import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt.core.config import GPT2, RESIDUAL_PROJECTIONS, GPTConfig, init_stds
from tests.conftest import assert_close, assert_same
from torch_reference import model as torch_model

STD_RTOL = 0.05  # sampling error of a std over >= 4096 draws is under 2%
MEAN_RTOL = 0.05  # |mean| below 5% of the std: 4096 draws put it within ~1.6%
ARTICLE = GPTConfig(vocab_size=128, seq_len=64, d_model=64, n_heads=4, n_layers=2)


@pytest.mark.parametrize("config", [ARTICLE, ARTICLE.replace(**GPT2)], ids=["article", "gpt2"])
def test_init_statistics_match(config):
    torch.manual_seed(0)
    t = torch_model.canonical(torch_model.GPT(config))
    f = flax_model.canonical(flax_model.GPT(config, rngs=nnx.Rngs(0)))
    assert t.keys() == f.keys()
    stds = init_stds(config)
    for name in t:
        for tensors in (t, f):
            value = tensors[name]
            if "norm" in name:
                expected = 1.0 if name.endswith("weight") else 0.0
                assert_same(value, expected, err_msg=name)
            elif name.endswith("bias"):
                assert_same(value, 0.0, err_msg=name)
            else:
                std = (stds.embed if name.startswith("embed.") else
                       stds.residual if name.removesuffix(".weight").endswith(RESIDUAL_PROJECTIONS)
                       else stds.linear)
                assert_close(value.std(), std, rtol=STD_RTOL, atol=0, err_msg=name)
                assert_close(value.mean(), 0.0, rtol=0, atol=std * MEAN_RTOL, err_msg=name)


def test_gpt2_init_scales_the_residual_projections():
    """The scheme itself, so that a mistake shared by both models cannot pass above."""
    stds = init_stds(ARTICLE.replace(**GPT2, n_layers=8))
    assert (stds.embed, stds.linear) == (0.02, 0.02)
    assert_close(stds.residual, 0.02 / 4, rtol=1e-15, atol=0)
