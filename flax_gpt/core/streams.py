"""Where training batches come from: a prepared dataset or uniform random tokens, each
addressed by global micro-batch index, so that the batch of step s is a pure function of
(seed, s) and a resumed run replays an unbroken one.
"""

import json

import numpy as np

from flax_gpt.core.data import IGNORE_INDEX, make_batch
from flax_gpt.core.errors import DatasetError
from flax_gpt.core.files import sha256_bytes


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
    """Uniform random tokens: for benchmarks and machines without a prepared dataset.

    Batch k of a split is drawn from numpy seed [seed, split, k] (train 0, val 1): the splits
    are drawn from different seeds, each part of them a non-negative integer, as numpy
    requires."""

    SPLITS = ("train", "val")
    EVAL_BATCHES = 8  # a synthetic split never ends: what "all of it" (n = 0) reads

    def __init__(self, vocab_size, batch_size, seq_len, seed):
        self.vocab_size, self.batch_size, self.seq_len, self.seed = vocab_size, batch_size, seq_len, seed
        self.reference = {"synthetic": True, "vocab_size": vocab_size}

    def batch(self, k, split="train"):
        return synthetic_batch(self.vocab_size, self.batch_size, self.seq_len,
                               [self.seed, self.SPLITS.index(split), k])

    def eval_batches(self, n, split="val"):
        """The first n batches of `split` (EVAL_BATCHES when n is 0)."""
        return [self.batch(k, split) for k in range(n or self.EVAL_BATCHES)]


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
