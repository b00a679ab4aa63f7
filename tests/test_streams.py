"""The synthetic stream's held-out batches (numpy refuses negative seeds)."""

import numpy as np

from flax_gpt.core.streams import SyntheticStream


def test_synthetic_eval_batches_exist_and_are_not_training_batches():
    stream = SyntheticStream(64, 4, 16, seed=0)
    held_out = stream.eval_batches(3)
    assert len(held_out) == 3 and held_out[0][0].shape == (4, 16)
    training = [stream.batch(k)[0] for k in range(3)]
    assert not any(np.array_equal(x, t) for x, _ in held_out for t in training)
    assert np.array_equal(stream.eval_batches(1)[0][0], held_out[0][0])  # the same every time
