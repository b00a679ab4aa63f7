"""Text generation, framework-free: the window rule, the sampling settings and the one
generation loop both frameworks run (flax_gpt.sample and torch_reference.sample supply the
math as a *decoder*, as flax_gpt.core.loop takes a training backend).

**The window.** The model sees at most `seq_len` tokens, at positions 0, 1, ... of its
sinusoidal table. While a row's text is at most `seq_len` tokens long, the window is the
whole text. When one more token would not fit, the window slides: it becomes the last
`keep` tokens (the newest included), re-encoded from position 0, and grows again from there.
So the window of a text of n tokens is its last `window_length(n)` tokens, a function of n
alone, and the same whether the text came as a prompt or was generated token by token. The
uncached reference of any step is the full forward of that window, read at its last
position; the cached decoder computes exactly that: a key/value cache of `seq_len` rows per
layer, filled by a prefill of the window, extended by one-token decode steps, and rebuilt
by a prefill of the last `keep` tokens when it is full. `keep` = `seq_len` re-encodes the
last `seq_len` tokens at every step once the text is long (the classic sliding window).

**Sampling.** The randomness is one uniform draw in [0, 1) per row per step from
`numpy.random.default_rng(seed)`, drawn whether or not a row still runs, and each framework
turns its probabilities into a token by the same inverse CDF: tokens sorted likeliest first
(ties by id), the top `top_k` kept, then the shortest prefix holding `top_p` of their mass,
renormalised; the token is the first whose cumulative probability exceeds the draw. The
same seed therefore gives the same tokens in both frameworks wherever their probabilities
agree. Temperature 0 is greedy (the first of the largest logits).
"""

import time
from dataclasses import dataclass

import numpy as np

from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.hparams import check_seed


class GenerationError(FlaxGPTError, ValueError):
    """A generation request that cannot run: bad prompt ids, sampling settings or window."""


# Below this, logits / temperature can overflow to inf and the softmax to NaN: use 0 (greedy).
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn from the logits: temperature 0 is greedy; `top_k` 0 keeps every
    token; `top_p` 1 keeps the whole mass."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE)):
            raise GenerationError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                                  f"got {self.temperature}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self):
        return self.temperature == 0

    def kept(self, vocab_size):
        """How many of the sorted tokens top-k keeps: `top_k`, or all when 0 or larger."""
        return min(self.top_k, vocab_size) if self.top_k else vocab_size


def check_window_keep(keep, seq_len):
    """The tokens kept when the window slides: `keep`, default seq_len // 2 (at least 1);
    refused outside 1..seq_len."""
    keep = max(1, seq_len // 2) if keep is None else keep
    if not isinstance(keep, (int, np.integer)) or isinstance(keep, bool) or not 1 <= keep <= seq_len:
        raise GenerationError(f"window_keep must be an integer in 1..seq_len ({seq_len}), got {keep!r}")
    return int(keep)


def window_length(n, seq_len, keep):
    """How many of a text's last tokens the model sees when the text has n tokens: n up to
    seq_len; past it, keep at each slide and one more per token until seq_len again, so the
    lengths from n = seq_len + 1 on cycle keep, keep + 1, ..., seq_len."""
    if n <= seq_len:
        return n
    return keep + (n - seq_len - 1) % (seq_len - keep + 1)


def window(ids, seq_len, keep):
    """The tokens of `ids` the model sees (see window_length)."""
    return list(ids[len(ids) - window_length(len(ids), seq_len, keep):])


def pad(rows, width):
    """int32 (len(rows), width): each row on the left, zeros after (right padding)."""
    out = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return out


def prefill_width(longest, seq_len):
    """The width a prefill pads to: the next power of two, at most seq_len, so that a jitted
    prefill compiles for a few widths only."""
    return min(seq_len, 1 << (int(longest) - 1).bit_length())


def prompt_rows(prompt_ids, vocab_size):
    """A prompt (ids) or a batch of prompts (a sequence of id sequences, ragged) as a list of
    rows of ints, each checked to be non-empty and inside the vocabulary."""
    prompt_ids = list(prompt_ids)
    if prompt_ids and all(np.ndim(p) == 0 for p in prompt_ids):
        prompt_ids = [prompt_ids]
    if not prompt_ids:
        raise GenerationError("no prompt: pass ids, or a list of id lists for a batch")
    rows = []
    for b, row in enumerate(prompt_ids):
        row = [int(t) for t in np.asarray(row).reshape(-1)]
        if not row:
            raise GenerationError(f"prompt {b} is empty: each row needs at least one token (e.g. <bos>)")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {b} has ids outside the vocabulary 0..{vocab_size - 1}: {bad[:5]}")
        rows.append(row)
    return rows


@dataclass
class Generation:
    """What `run` returns. Rows are in prompt order."""

    prompts: list  # each row's prompt ids
    tokens: list  # each row's new ids, ending with the stop token where the row stopped
    stopped: list  # True where the row ended on the stop token
    steps: int  # generation steps taken (the longest row's new tokens)
    slides: int  # steps at which some row's window slid (cached) or would have (uncached)
    first_token_s: float  # prefill and the first token, seconds (time to first token); None
    #                       where the whole generation ran as one call (no token came earlier)
    decode_s: float  # every later step, seconds (first_token_s None: the whole generation)
    logits: list = None  # with return_logits: per step, (B, V) numpy, what each token was drawn from

    @property
    def ids(self):
        """Each row's prompt followed by its new ids."""
        return [p + t for p, t in zip(self.prompts, self.tokens)]

    def to_dict(self):
        return {"prompts": self.prompts, "tokens": self.tokens, "stopped": self.stopped,
                "steps": self.steps, "slides": self.slides, "first_token_s": self.first_token_s,
                "decode_s": self.decode_s}


class Rows:
    """Each row's new tokens as the steps arrive: a row takes tokens until it draws the stop
    token; `on_token(step, tokens)` sees each step, None for rows that stopped before it."""

    def __init__(self, batch_size, stop_token, on_token):
        self.tokens, self.done = [[] for _ in range(batch_size)], np.zeros(batch_size, bool)
        self.stop_token, self.on_token, self.steps = stop_token, on_token, 0

    def add(self, tokens):
        emitted = [None if d else int(t) for d, t in zip(self.done, tokens)]
        for row, token in zip(self.tokens, emitted):
            if token is not None:
                row.append(token)
        if self.on_token:
            self.on_token(self.steps, emitted)
        if self.stop_token is not None:
            self.done |= np.asarray(tokens) == self.stop_token
        self.steps += 1


# A streamed loop returns to the host about this often (seconds), so that tokens show as they
# come while a request still costs few dispatches.
STREAM_INTERVAL_S = 0.1
STREAM_CHUNK_MAX = 64


def run(decoder, prompt_ids, max_new_tokens, *, seq_len, vocab_size, seed=0, stop_token=None,
        window_keep=None, on_token=None, cached=True, return_logits=False):
    """Generate up to `max_new_tokens` tokens after each prompt with `decoder` (see
    flax_gpt.sample.FlaxDecoder; its sampling settings are its own), all rows in one batch.

    `on_token(step, tokens)` is called as each step's tokens arrive: `tokens` has one entry
    per row, None for rows that stopped earlier. A row stops after drawing `stop_token`; the
    run ends when every row has stopped or has `max_new_tokens` tokens. With `cached` False,
    every step is the full forward of each row's window (the uncached reference). A decoder
    with `loop` True runs the cached steps itself (flax_gpt.sample.Loop): all in one call,
    or, with `on_token`, in calls of about STREAM_INTERVAL_S each.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if stop_token is not None and not 0 <= stop_token < vocab_size:
        raise GenerationError(f"stop_token {stop_token} is outside the vocabulary 0..{vocab_size - 1}")
    check_seed(seed)  # numpy's generator would take some bad seeds and fail on others
    keep = check_window_keep(window_keep, seq_len)
    prompts = prompt_rows(prompt_ids, vocab_size)
    B = len(prompts)
    # us[i]: step i's draws; drawing them at once gives the numbers drawn one step at a time
    us = np.random.default_rng(seed).random((max_new_tokens, B))
    rows = Rows(B, stop_token, on_token)
    if cached and getattr(decoder, "loop", False):
        first_token_s, decode_s, slides, logits = _on_the_device(decoder, prompts, us, rows, seq_len,
                                                                 keep, stop_token, return_logits)
    else:
        first_token_s, decode_s, slides, logits = _step_by_step(decoder, prompts, us, rows, seq_len,
                                                                keep, cached, return_logits)
    return Generation(prompts, rows.tokens, [bool(d) for d in rows.done], rows.steps, slides,
                      first_token_s, decode_s, logits)


def _step_by_step(decoder, prompts, us, rows, seq_len, keep, cached, return_logits):
    """`run`'s loop on the host: one decoder call per step. Returns (first_token_s, decode_s,
    slides, logits)."""
    texts = [list(p) for p in prompts]  # everything each row's model has seen or drawn
    logits_log = [] if return_logits else None

    def uncached_step(u):
        windows = [window(t, seq_len, keep) for t in texts]
        lengths = np.array([len(w) for w in windows], np.int32)
        return decoder.forward(pad(windows, seq_len), lengths, u)

    start = time.perf_counter()
    if cached:
        windows = [window(t, seq_len, keep) for t in texts]
        positions = np.array([len(w) for w in windows], np.int32)  # where each next token goes
        tokens, logits = decoder.prefill(pad(windows, prefill_width(positions.max(), seq_len)),
                                         positions, us[0])
    else:
        tokens, logits = uncached_step(us[0])
    first_token_s = time.perf_counter() - start
    slides = 0
    for step in range(len(us)):
        if return_logits:
            logits_log.append(decoder.numpy(logits))
        for text, token in zip(texts, tokens):
            text.append(int(token))
        rows.add(tokens)
        if step + 1 == len(us) or rows.done.all():
            break
        u = us[step + 1]
        if not cached:
            slides += any(len(t) > seq_len and window_length(len(t), seq_len, keep) == keep
                          for t in texts)
            tokens, logits = uncached_step(u)
            continue
        full = positions == seq_len  # no room for the token just drawn: slide
        if full.any():
            slides += 1
            kept = pad([t[-keep:] if f else [] for t, f in zip(texts, full)], keep)
            tokens, logits = decoder.slide(tokens, np.minimum(positions, seq_len - 1), kept, full, u)
            positions = np.where(full, keep, positions + 1).astype(np.int32)
        else:
            tokens, logits = decoder.decode(tokens, positions, u)
            positions = positions + 1
    return first_token_s, time.perf_counter() - start - first_token_s, slides, logits_log


def _on_the_device(decoder, prompts, us, rows, seq_len, keep, stop_token, return_logits):
    """`run`'s cached loop on the device (decoder.start / resume): one call for the whole
    generation, or, with an on_token to feed, a first call for the first token and then
    calls sized to take about STREAM_INTERVAL_S. Returns what _step_by_step does."""
    windows = [window(p, seq_len, keep) for p in prompts]
    positions = np.array([len(w) for w in windows], np.int32)
    start = time.perf_counter()
    streamed = rows.on_token is not None
    drawn = decoder.start(pad(windows, prefill_width(positions.max(), seq_len)), positions,
                          pad(windows, seq_len), us, keep, stop_token,
                          1 if streamed else len(us), return_logits)
    first_token_s = time.perf_counter() - start if streamed else None
    called = start
    while True:
        for tokens in drawn:
            rows.add(tokens)
        if rows.steps == len(us) or rows.done.all():
            break
        per_token = (time.perf_counter() - called) / len(drawn)  # the last call's, compile included
        chunk = int(np.clip(STREAM_INTERVAL_S / max(per_token, 1e-9), 1, STREAM_CHUNK_MAX))
        called = time.perf_counter()
        drawn = decoder.resume(min(len(us), rows.steps + chunk))
    slides, logits = decoder.loop_results()
    total = time.perf_counter() - start
    return first_token_s, total - (first_token_s or 0), slides, None if logits is None else list(logits)


def generate(decoder_class, model, prompt_ids, max_new_tokens, *, temperature, top_k, top_p,
             **options):
    """flax_gpt.generate and torch_reference.generate: `model` (either framework's GPT) put
    in eval mode, its `decoder_class` built with these sampling settings, and `run`."""
    model.eval()
    decoder = decoder_class(model, Sampling(temperature, top_k, top_p))
    return run(decoder, prompt_ids, max_new_tokens, seq_len=model.config.seq_len,
               vocab_size=model.config.vocab_size, **options)
