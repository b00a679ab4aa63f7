"""`flax-gpt decode-parity`: Flax and PyTorch generating from one set of weights, step by
step: the tokens each draws, and, while their texts are the same, how far apart their logits
are and how close each step's top two logits come.

In float64 the two agree to ~1e-12 and greedy decoding gives the same tokens for as long as
no two logits are within that of each other. In float32 they agree to ~1e-6, and greedy
tokens can part at the first step whose top two logits are closer than twice the two
frameworks' difference (a near tie): `first_near_tie` says where that is, and
`first_mismatch` where they actually part. With the same seed, sampling draws the same
uniforms in both (flax_gpt.core.generation), so sampled tokens agree too wherever the
probabilities agree.
"""

from dataclasses import asdict, dataclass

import numpy as np

import flax_gpt
import torch_reference
from flax_gpt.core import runfolder
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.sidebyside.pair import apply_precision, build_pair, environment

# Precisions both models run as loaded; bf16 would need PyTorch's autocast around every step.
PRECISIONS = ("float64", "highest", "default")


@dataclass
class GenerationComparison:
    """Both frameworks' generations of one request, step by step. Steps count from 0 (the
    token drawn from the prefill); the logits of steps up to `first_mismatch` come from the
    same texts and are compared."""

    flax: list  # each row's new tokens
    torch: list
    first_mismatch: int = None  # first step at which some row's tokens differ (None: never)
    first_near_tie: int = None  # first step with a row whose top two logits are within 2x the difference
    max_logits_diff: float = 0.0  # max |flax - torch| over the compared steps (NaN if any is)
    step_logits_diff: list = None  # per compared step, max over rows
    step_top2_gap: list = None  # per compared step, the smallest top-two gap over rows (PyTorch's logits)
    slides: int = 0

    @property
    def agree(self):
        """Same tokens, and no NaN among the compared logits (NaN is never agreement)."""
        return self.first_mismatch is None and not np.isnan(self.max_logits_diff)

    def to_dict(self):
        return {**asdict(self), "agree": self.agree}


def top2_gap(logits):
    """(B,) largest minus second largest logit of each row."""
    top = np.sort(np.asarray(logits, np.float64), axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


def compare_generation(fm, tm, prompt_ids, max_new_tokens, **options):
    """Generate with the Flax model `fm` and the PyTorch model `tm` (same weights and
    precision) with the same `options` (those of flax_gpt.generate) and compare them."""
    f = flax_gpt.generate(fm, prompt_ids, max_new_tokens, return_logits=True, **options)
    t = torch_reference.generate(tm, prompt_ids, max_new_tokens, return_logits=True, **options)
    return compare_outputs(f, t)


def compare_outputs(f, t):
    """The comparison of two generations (each with `tokens`, per-step `logits` and
    `slides`, as generate returns them with return_logits)."""
    out = GenerationComparison(f.tokens, t.tokens, step_logits_diff=[], step_top2_gap=[],
                               slides=f.slides)
    for step, (fl, tl) in enumerate(zip(f.logits, t.logits)):
        diff = np.abs(fl.astype(np.float64) - tl).max(axis=-1)  # (B,)
        gap = top2_gap(tl)
        out.step_logits_diff.append(float(diff.max()))
        out.step_top2_gap.append(float(gap.min()))
        if out.first_near_tie is None and np.any(gap <= 2 * diff):
            out.first_near_tie = step
        same = [a[step:step + 1] == b[step:step + 1] for a, b in zip(f.tokens, t.tokens)]
        if not all(same):
            out.first_mismatch = step
            break
    # np.max, not max(): a NaN at any step makes the maximum NaN (max() keeps a number seen
    # before it), and NaN fails every bound and `agree`
    out.max_logits_diff = float(np.max(out.step_logits_diff)) if out.step_logits_diff else 0.0
    if out.first_mismatch is None and f.tokens != t.tokens:  # one side stopped earlier
        out.first_mismatch = len(out.step_logits_diff)
    return out


@dataclass
class DecodeParityResult:
    """What `flax-gpt decode-parity` prints and `--json` writes."""

    run: str
    precision: str
    prompts: list  # each row's prompt text
    max_new_tokens: int
    options: dict
    comparison: GenerationComparison
    texts: dict  # framework -> each row's new text
    environment: dict

    def to_dict(self):
        return {"run": self.run, "precision": self.precision, "prompts": self.prompts,
                "max_new_tokens": self.max_new_tokens, "options": self.options,
                **self.comparison.to_dict(), "texts": self.texts, **self.environment}


def run(run_folder, prompts=("",), *, data=None, max_new_tokens=200, precision="float64", **options):
    """Load a run folder's latest weights into both frameworks at `precision` and compare
    their generations after each of `prompts` (text, after <bos>; a batch) with the options
    of flax_gpt.generate (see compare_generation). The vocabulary is the run's dataset, or
    the dataset folder `data`."""
    if precision not in PRECISIONS:
        raise FlaxGPTError(f"decode parity runs at {', '.join(PRECISIONS)}, not {precision!r}")
    record = runfolder.read_record(run_folder)
    dataset = runfolder.run_dataset(record, data)
    config = GPTConfig.from_dict(record["model"])
    tensors = runfolder.checkpoint_weights(run_folder, config)
    environment_record = apply_precision(precision)
    fm, tm = build_pair(config, tensors, precision)
    if dataset.vocab_size != fm.config.vocab_size:
        raise FlaxGPTError(f"--data has {dataset.vocab_size} tokens, the model {fm.config.vocab_size}")
    prompt_ids = [[dataset.start, *dataset.encode(p)] for p in prompts]
    comparison = compare_generation(fm, tm, prompt_ids, max_new_tokens, **options)
    texts = {name: [dataset.decode(t) for t in tokens]
             for name, tokens in (("flax", comparison.flax), ("torch", comparison.torch))}
    return DecodeParityResult(str(run_folder), precision, list(prompts), max_new_tokens, options,
                              comparison, texts, environment(environment_record))
