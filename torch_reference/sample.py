"""Generation with the PyTorch model: prefill and one-token decode over a key/value cache.
Mirrors flax_gpt/sample.py; flax_gpt.core.generation runs the loop and says what the window
and the sampling rule are.

    import torch_reference

    model = torch_reference.load("run/weights.safetensors")
    out = torch_reference.generate(model, [1, 57, 9], 40, temperature=0.8, top_p=0.9, seed=1)

`compile=True` runs each step through torch.compile (on a GPU, the decode step as a CUDA
graph); `cached=False` recomputes the whole window at every step (the uncached reference).
"""

import functools

import numpy as np
import torch

from flax_gpt.core import generation
from torch_reference.model import at_least_float32


def sample_tokens(logits, u, temperature, top_k, top_p):
    """Inverse-CDF sampling (flax_gpt.core.generation): logits (B, V), u (B,) uniforms in
    [0, 1), `top_k` tokens kept (1..V), `top_p` in (0, 1]. Returns int64 (B,)."""
    logits = logits.to(at_least_float32(logits.dtype)) / temperature
    order = torch.argsort(-logits, dim=-1, stable=True)  # (B, V): likeliest first, ties by id
    probs = torch.softmax(torch.gather(logits, -1, order), dim=-1)  # (B, V) sorted
    rank = torch.arange(logits.shape[-1], device=logits.device)
    probs = torch.where(rank < top_k, probs, 0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    before = torch.cumsum(probs, dim=-1) - probs  # the mass of the likelier tokens
    # (B, V): a prefix, never empty; top_p 1 keeps all (a float32 mass of 1 is reached early)
    kept = (rank < top_k) & ((before < top_p) | (top_p >= 1))
    probs = torch.where(kept, probs, 0)
    cdf = torch.cumsum(probs / probs.sum(dim=-1, keepdim=True), dim=-1)
    index = torch.minimum(torch.sum(cdf <= u[:, None].to(cdf.dtype), dim=-1),
                          torch.sum(kept, dim=-1) - 1)  # (B,): rounding never leaves the prefix
    return torch.gather(order, -1, index[:, None])[:, 0]


def pick(logits, u, knobs, greedy):
    """The next token of each row: the first largest logit, or sample_tokens with `knobs`
    (temperature, top_k, top_p)."""
    return torch.argmax(logits, dim=-1) if greedy else sample_tokens(logits, u, *knobs)


class TorchDecoder:
    """The PyTorch model as flax_gpt.core.generation's decoder: each method takes numpy
    inputs, runs the model without autograd, keeps the cache on the model's device and
    returns (tokens as numpy, logits on the device). With `compile`, each step function
    goes through torch.compile, and on a GPU the decode step is a CUDA graph
    (mode="reduce-overhead": one replay per token instead of a launch per kernel) over a
    static cache, allocated once and written in place, whose addresses the graph keeps."""

    def __init__(self, model, sampling, *, compile=False):
        self.model, self.greedy = model, sampling.greedy
        self.knobs = (sampling.temperature or 1.0, sampling.kept(model.config.vocab_size), sampling.top_p)
        self.device = next(model.parameters()).device
        self.dtype = at_least_float32(next(model.parameters()).dtype)
        self.cache = None
        self.graphs = compile and self.device.type == "cuda"
        self.prefill_step, self.decode_step, self.forward_step = self._prefill, self._decode, self._forward
        if compile:
            self.prefill_step, self.forward_step = torch.compile(self._prefill), torch.compile(self._forward)
            self.decode_step = torch.compile(self._decode, mode="reduce-overhead" if self.graphs else None)

    def _static(self, cache):
        """With CUDA graphs, `cache` copied into the static cache (allocated at the first
        prefill of each shape, its addresses marked static for torch.compile); else `cache`."""
        if not self.graphs:
            return cache
        if self.cache is None or self.cache[0].k.shape != cache[0].k.shape:
            self.cache = tuple(type(c)(*(t.clone() for t in c)) for c in cache)
            for t in (t for c in self.cache for t in c):
                torch._dynamo.mark_static_address(t)
        for static, new in zip(self.cache, cache):
            for s, n in zip(static, new):
                s.copy_(n)
        return self.cache

    def _prefill(self, ids, lengths, u):
        logits, cache = self.model.prefill(ids, lengths)
        return pick(logits, u, self.knobs, self.greedy), logits, cache

    def _decode(self, cache, tokens, positions, u):
        logits, cache = self.model.decode(tokens, cache, positions)
        return pick(logits, u, self.knobs, self.greedy), logits, cache

    def _merge(self, rows, fresh_logits, fresh, logits, cache, u):
        """Rows in `rows` take the logits and cache of a prefill (`fresh`), the others keep
        theirs; then each row's next token."""
        cache = tuple(type(old)(*(torch.where(rows[:, None, None, None], n, o) for n, o in zip(new, old)))
                      for new, old in zip(fresh, cache))
        logits = torch.where(rows[:, None], fresh_logits, logits)  # (B, V)
        return pick(logits, u, self.knobs, self.greedy), logits, cache

    def _forward(self, windows, lengths, u):
        logits = self.model(windows)  # (B, S, V)
        logits = logits[torch.arange(windows.shape[0], device=windows.device), lengths - 1]  # (B, V)
        return pick(logits, u, self.knobs, self.greedy), logits

    def _in(self, a, dtype=torch.long):
        return torch.as_tensor(np.asarray(a)).to(self.device, dtype)

    def prefill(self, ids, lengths, u):
        with torch.no_grad():
            tokens, logits, cache = self.prefill_step(self._in(ids), self._in(lengths), self._in(u, self.dtype))
        self.cache = self._static(cache)
        return tokens.cpu().numpy(), logits

    def decode(self, tokens, positions, u):
        with torch.no_grad():
            tokens, logits, self.cache = self.decode_step(self.cache, self._in(tokens),
                                                          self._in(positions), self._in(u, self.dtype))
        if self.graphs:  # the graph's outputs are overwritten by its next replay
            logits = logits.clone()
        return tokens.cpu().numpy(), logits

    def slide(self, tokens, positions, kept, rows, u):
        """A decode step in which the rows in `rows` re-encode their last tokens `kept`
        (B, keep) from position 0 instead: their cache and logits come from a prefill."""
        _, logits = self.decode(tokens, positions, u)
        with torch.no_grad():
            _, fresh_logits, fresh = self.prefill_step(self._in(kept), self._in(np.full(len(kept), kept.shape[1])),
                                                       self._in(u, self.dtype))
            tokens, logits, cache = self._merge(self._in(rows, torch.bool), fresh_logits, fresh,
                                                logits, self.cache, self._in(u, self.dtype))
        self.cache = self._static(cache)
        return tokens.cpu().numpy(), logits

    def forward(self, windows, lengths, u):
        with torch.no_grad():
            tokens, logits = self.forward_step(self._in(windows), self._in(lengths), self._in(u, self.dtype))
        return tokens.cpu().numpy(), logits

    @staticmethod
    def numpy(logits):
        """As numpy, bf16 (under autocast) widened to float32: numpy has no bfloat16."""
        return logits.detach().to(at_least_float32(logits.dtype)).cpu().numpy()


def generate(model, prompt_ids, max_new_tokens=100, *, temperature=1.0, top_k=0, top_p=1.0,
             seed=0, stop_token=None, window_keep=None, on_token=None, cached=True,
             return_logits=False, compile=False):
    """flax_gpt.generate's twin, with the same arguments (but `compile`, see TorchDecoder,
    for Flax's `loop`): generate after `prompt_ids` with the PyTorch `model` (put in eval
    mode). Returns a flax_gpt.core.generation.Generation."""
    return generation.generate(functools.partial(TorchDecoder, compile=compile), model, prompt_ids,
                               max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop_token=stop_token, window_keep=window_keep,
                               on_token=on_token, cached=cached, return_logits=return_logits)
