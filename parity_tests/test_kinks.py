"""ReLU kinks: a pre-activation at 0 makes the gradient jump; kink_free_labels removes it.

A unit of layer 0 is pushed exactly onto the kink at one position; moving it a hair to
either side then changes PyTorch's own gradients by far more than GRAD_RTOL, unless the
labels that position reaches are ignored, as the parity suite does.
"""

import numpy as np
import torch

from flax_gpt.sidebyside import pair, parity, tolerances
from flax_gpt.core.data import IGNORE_INDEX
from flax_gpt.sidebyside.tolerances import GRAD_RTOL, KINK_ATOL
from parity_tests.conftest import CONFIGS, batch, tensors_for

ROW, POSITION, UNIT = 1, 5, 7
NUDGE = KINK_ATOL / 10  # inside the window, on either side of 0


def model_with_kink(offset):
    """The tiny torch model with layer 0's fc1 unit UNIT at exactly `offset` for (ROW, POSITION)."""
    config = CONFIGS["tiny"]
    x, y = batch(config, 3, config.seq_len, seed=4)
    _, tm = pair.build_pair(config, tensors_for("tiny"))
    h = parity.relu_inputs(tm, x)[0, ROW, POSITION, UNIT]
    with torch.no_grad():
        tm.decoder.layers[0].ffn.fc1.bias[UNIT] -= float(h) - offset
    return tm, x, y


def gradients(tm, x, y):
    return parity.torch_outputs(tm, x, y)[3]


def test_kink_masks_its_row_from_that_position_on():
    tm, x, y = model_with_kink(0.0)
    masked, kinks = parity.kink_free_labels(tm, x, y)
    assert kinks >= 1
    assert np.all(masked[ROW, POSITION:] == IGNORE_INDEX)
    np.testing.assert_array_equal(masked[ROW, :POSITION], y[ROW, :POSITION])
    kept = masked != IGNORE_INDEX
    np.testing.assert_array_equal(masked[kept], y[kept])


def test_masked_gradients_do_not_see_the_kink():
    below, x, y = model_with_kink(-NUDGE)
    above, _, _ = model_with_kink(+NUDGE)
    masked, _ = parity.kink_free_labels(below, x, y)
    assert np.array_equal(masked, parity.kink_free_labels(above, x, y)[0])
    jumps = {}
    for name, labels in (("raw", y), ("masked", masked)):
        g_below, g_above = gradients(below, x, labels), gradients(above, x, labels)
        jumps[name] = max(tolerances.max_abs_rel(g_below[n], g_above[n])[1]
                          for n in g_below if not tolerances.is_inert(n))
    assert jumps["raw"] > 100 * GRAD_RTOL, "the kink must show in the raw gradients"
    assert jumps["masked"] < GRAD_RTOL, jumps
