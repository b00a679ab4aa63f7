"""Both frameworks implement one documented init: N(0, 0.02) weights, zero biases,
LayerNorm ones/zeros. Their statistics must match (the values, of course, do not)."""

import numpy as np
import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt.config import GPTConfig
from torch_reference import model as torch_model

STD_RTOL = 0.05  # sampling error of a std over >= 4096 draws is under 2%
MEAN_ATOL = 0.02 * 0.05


def test_init_statistics_match():
    config = GPTConfig(vocab_size=128, seq_len=8, d_model=64, n_heads=4, n_layers=2)
    torch.manual_seed(0)
    t = torch_model.state_dict_to_canonical(torch_model.GPT(config))
    f = flax_model.canonical(flax_model.GPT(config, rngs=nnx.Rngs(0)))
    assert t.keys() == f.keys()
    for name in t:
        for tensors in (t, f):
            value = tensors[name]
            if "layer_norm" in name:
                expected = 1.0 if name.endswith("weight") else 0.0
                np.testing.assert_array_equal(value, expected, err_msg=name)
            elif name.endswith("bias"):
                np.testing.assert_array_equal(value, 0.0, err_msg=name)
            else:
                np.testing.assert_allclose(value.std(), flax_model.INIT_STD, rtol=STD_RTOL, err_msg=name)
                np.testing.assert_allclose(value.mean(), 0.0, atol=MEAN_ATOL, err_msg=name)
    assert torch_model.INIT_STD == flax_model.INIT_STD
