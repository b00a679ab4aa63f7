"""Where training batches come from: a prepared dataset or uniform random tokens, each
addressed by global micro-batch index, so that the batch of step s is a pure function of
(seed, s) and a resumed run replays an unbroken one.
"""

import json

import numpy as np

from flax_gpt.core.data import IGNORE_INDEX, make_batch
from flax_gpt.core.errors import DatasetError
from flax_gpt.core.files import sha256_bytes


EVAL_SEED_TAG = 1  # a third seed word: held-out synthetic batches, never a training batch


def synthetic_batch(vocab_size, batch_size, seq_len, seed, *, ignored_row=False):
    """Uniform random ids `(batch_size, seq_len)` with SPEC.md labels, from numpy seed `seed`
    (an int or a sequence of ints). With `ignored_row`, the last row's labels are all -100
    when batch_size > 1 (a fully ignored row must not change the mean)."""
    rng = np.random.default_rng(seed)
    x, y = make_batch(rng.integers(0, vocab_size, (batch_size, seq_len)))
    if ignored_row and batch_size > 1:
        y[-1] = IGNORE_INDEX
    return x, y


class DatasetStream:
    """Batches of a prepared dataset addressed by global micro-batch index: reshuffled each
    epoch from (seed, epoch), so index k always gives the same batch."""

    def __init__(self, dataset, batch_size, seq_len, seed):
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.per_epoch = dataset.num_batches("train", batch_size, seq_len)
        self.reference = {"path": str(dataset.path), "manifest_sha256": manifest_sha256(dataset)}
        self.vocab_size = dataset.vocab_size

    def batch(self, k):
        epoch, index = divmod(k, self.per_epoch)
        return next(self.dataset.batches("train", self.batch_size, self.seq_len, shuffle=True,
                                         seed=self.seed, epoch=epoch, start=index))

    def eval_batches(self, n):
        """Up to n validation batches in order (all of them when n is 0)."""
        batches = self.dataset.batches("val", self.batch_size, self.seq_len)
        return [b for i, b in zip(range(n or 10**9), batches)]


class SyntheticStream:
    """Uniform random tokens: for benchmarks and machines without a prepared dataset."""

    def __init__(self, vocab_size, batch_size, seq_len, seed):
        self.vocab_size, self.batch_size, self.seq_len, self.seed = vocab_size, batch_size, seq_len, seed
        self.reference = {"synthetic": True, "vocab_size": vocab_size}

    def batch(self, k):
        return synthetic_batch(self.vocab_size, self.batch_size, self.seq_len, [self.seed, k])

    def eval_batches(self, n):
        """Up to n held-out batches (8 when n is 0), seeded apart from every training batch
        (numpy seeds are non-negative: the index -1 - i this used to pass was refused)."""
        return [synthetic_batch(self.vocab_size, self.batch_size, self.seq_len,
                                [self.seed, i, EVAL_SEED_TAG]) for i in range(n or 8)]


def manifest_sha256(dataset):
    return sha256_bytes(json.dumps(dataset.manifest, sort_keys=True).encode())


def step_batch(stream, step, grad_accum):
    """int32 (grad_accum, B, T) inputs and labels of optimizer step `step`."""
    parts = [stream.batch(step * grad_accum + i) for i in range(grad_accum)]
    return np.stack([x for x, _ in parts]), np.stack([y for _, y in parts])


def check_stream(stream, config):
    if stream.vocab_size != config.vocab_size:
        raise DatasetError(f"the data has a vocabulary of {stream.vocab_size} but the model "
                           f"{config.vocab_size}")
    if stream.seq_len > config.seq_len:
        raise DatasetError(f"batches of {stream.seq_len} tokens exceed the model's seq_len "
                           f"{config.seq_len}")
    if isinstance(stream, DatasetStream):  # both splits now, not at the first evaluation
        for split in ("train", "val"):
            stream.dataset.check_batches(split, stream.batch_size, stream.seq_len)
