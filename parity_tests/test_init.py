"""Both frameworks implement flax_gpt.core.config's init: N(0, 0.02) Linear weights, zero biases,
N(0, 1) embeddings, LayerNorm ones/zeros. Their statistics must match (the values, of course,
do not)."""

import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt.core.config import EMBED_INIT_STD, LINEAR_INIT_STD, GPTConfig
from tests.conftest import assert_close, assert_same
from torch_reference import model as torch_model

STD_RTOL = 0.05  # sampling error of a std over >= 4096 draws is under 2%
MEAN_RTOL = 0.05  # |mean| below 5% of the std: 4096 draws put it within ~1.6%


def test_init_statistics_match():
    config = GPTConfig(vocab_size=128, seq_len=8, d_model=64, n_heads=4, n_layers=2)
    torch.manual_seed(0)
    t = torch_model.canonical(torch_model.GPT(config))
    f = flax_model.canonical(flax_model.GPT(config, rngs=nnx.Rngs(0)))
    assert t.keys() == f.keys()
    for name in t:
        for tensors in (t, f):
            value = tensors[name]
            if "layer_norm" in name:
                expected = 1.0 if name.endswith("weight") else 0.0
                assert_same(value, expected, err_msg=name)
            elif name.endswith("bias"):
                assert_same(value, 0.0, err_msg=name)
            else:
                std = EMBED_INIT_STD if name == "embed.token.weight" else LINEAR_INIT_STD
                assert_close(value.std(), std, rtol=STD_RTOL, atol=0, err_msg=name)
                assert_close(value.mean(), 0.0, rtol=0, atol=std * MEAN_RTOL, err_msg=name)
