"""Both frameworks against Hugging Face's own GPT-2 (`transformers.GPT2LMHeadModel`), through
the one adapter (flax_gpt/core/hf.py): the measurement behind parity_tests/test_hf.py and
the figures of docs/models.md.

A GPT-2 with every parameter randomised (biases and LayerNorm gains and biases too: GPT-2's
own init leaves those at 0 and 1, where a bug would hide) is imported from its state_dict.
`measure` then gives, per framework: in float64 the largest differences of the logits, the
hidden states and the loss, and each gradient's difference relative to its largest value;
greedy generation against HF's `generate`; in float32 at the highest matmul precision the
logits against HF's eager and sdpa attention.

    python -m parity_tests.against_hf --shape gpt2 --json benchmarks/results/hf_parity_cpu.json
"""

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import transformers

import flax_gpt.model as flax_model
import torch_reference.model as torch_model
from flax_gpt.core import hf
from flax_gpt.core.files import write_json
from flax_gpt.sample import generate as flax_generate
from flax_gpt.sidebyside import pair, parity, tolerances
from torch_reference.sample import generate as torch_generate

# HF's own loss (labels=ids) is float32 even for a float64 model: ForCausalLMLoss "upcasts"
# with logits.float(), which rounds float64 logits down to float32 (transformers
# loss/loss_utils.py). It is held to float32's rounding; the float64 loss and gradients are
# taken through the same cross-entropy on HF's float64 logits, without that cast.
HF_LOSS_RTOL = 4 * float(np.finfo(np.float32).eps)
FRAMEWORKS = ("flax", "torch")

SHAPES = {  # GPT2Config fields; the context the figures are measured at; the random scale
    "tiny": (dict(vocab_size=53, n_positions=64, n_embd=24, n_layer=3, n_head=3), 64, 0.2),
    # GPT-2 small itself (124M), at a context of 128 so that float64 fits a laptop's minutes,
    # random at GPT-2's own scale (0.2 at width 768 grew the residual stream to ~1e4)
    "gpt2": (dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12), 128, 0.02),
}


def hf_model(shape="tiny", dtype=torch.float64, attention="eager", **changes):
    """The randomised GPT-2 of `shape`, seeded: the same parameters every call, at `dtype`."""
    fields, _, scale = SHAPES[shape]
    end = fields["vocab_size"] - 1  # GPT-2's <|endoftext|> is its last id
    config = transformers.GPT2Config(**fields, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=end, eos_token_id=end, **changes)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_((1.0 if gain else 0.0) + scale * torch.randn(p.shape, generator=generator))
    return model.to(dtype).eval()


def hf_state(model):
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def imported(model):
    """(config, canonical tensors) of an HF model, through the adapter."""
    config = hf.config_from_hf(model.config.to_dict())
    return config, hf.tensors_from_hf(config, hf_state(model))


def ids_cases(config, context):
    """A context-long batch of two rows with ids 0 and vocab-1 in it, and a one-token row."""
    rng = np.random.default_rng(3)
    full = rng.integers(0, config.vocab_size, (2, context))
    full[0, :2], full[1, -2:] = 0, config.vocab_size - 1
    return {"full-context": full, "one-token": np.array([[config.vocab_size - 1]])}


@dataclass
class Outputs:
    """One implementation's float64 loss (None without labels), logits, hidden states in
    HF's order (the embedding, each layer's output but the last, then the final LayerNorm's)
    and canonical gradients (None without labels)."""

    loss: float | None
    logits: np.ndarray
    hidden: list
    grads: dict | None


def hf_outputs(model, ids, config):
    """HF's outputs, gradients in the canonical names and layouts of `config` through the
    adapter itself (a gradient has its parameter's layout). The loss is HF's shifted-label
    cross-entropy without its float32 cast (see HF_LOSS_RTOL), after HF's own loss is held to
    it. A one-token row has no label: its forward alone."""
    model.zero_grad(set_to_none=True)
    ids = torch.from_numpy(ids)
    if ids.shape[1] == 1:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        return Outputs(None, out.logits.numpy(), [h.numpy() for h in out.hidden_states], None)
    out = model(ids, labels=ids, output_hidden_states=True)
    logits = out.logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    if not abs(out.loss.item() - loss.item()) <= HF_LOSS_RTOL * abs(loss.item()):
        raise AssertionError(f"HF's own loss {out.loss.item()} is not its float64 cross-entropy "
                             f"{loss.item()} rounded to float32")
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    return Outputs(loss.item(), out.logits.detach().numpy(),
                   [h.detach().numpy() for h in out.hidden_states], hf.tensors_from_hf(config, grads))


def ours(framework, config, tensors, ids):
    """Our float64 outputs on SPEC's labels (the next token; the last position ignored), which
    are HF's shifted labels."""
    labels = np.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    if framework == "flax":
        out = parity.flax_outputs(flax_model.build(config, tensors, precision="float64"), ids, labels)
    else:
        out = parity.torch_outputs(torch_model.build(config, tensors, precision="float64"), ids,
                                   labels, "float64")
    loss, logits, hidden, grads = out
    return Outputs(loss, logits, [hidden["embed"], *hidden["layers"][:-1], hidden["final_norm"]],
                   grads)


def differences(mine, theirs):
    """{quantity: difference}: absolute for the logits, each hidden state and the loss; for
    each gradient relative to its largest |value| in HF's (the key bias's, 0 up to rounding
    since softmax ignores a shift of all of a query's scores, relative to the largest
    gradient). Without labels (HF's loss None) the forward alone. NaN stays NaN."""
    assert len(mine.hidden) == len(theirs.hidden)
    out = {"logits": float(np.max(np.abs(mine.logits - theirs.logits)))}
    for i, (h, g) in enumerate(zip(mine.hidden, theirs.hidden)):
        out[f"hidden state {i}"] = float(np.max(np.abs(h - g)))
    if theirs.loss is not None:
        assert theirs.grads.keys() <= mine.grads.keys()  # an untied head (a control) has pred.*
        out["loss"] = abs(mine.loss - theirs.loss)
        largest = max(float(np.max(np.abs(g))) for g in theirs.grads.values())
        for name, g in theirs.grads.items():
            scale = largest if tolerances.is_inert(name) else float(np.max(np.abs(g)))
            if scale == 0:
                raise AssertionError(f"HF's gradient of {name} is all zero: nothing to compare")
            out[f"gradient {name}"] = float(np.max(np.abs(mine.grads[name] - g))) / scale
    return out


def greedy(framework, config, tensors, hf64, prompt, new_tokens):
    """(ours, HF's) greedy continuations of `prompt` in float64."""
    ids = torch.tensor([prompt])
    # the mask given: HF would otherwise read a prompt id equal to pad_token_id as padding
    theirs = hf64.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, pad_token_id=0)[0, len(prompt):].tolist()
    build, generate = ((flax_model.build, flax_generate) if framework == "flax"
                       else (torch_model.build, torch_generate))
    return generate(build(config, tensors, precision="float64"), prompt, new_tokens,
                    temperature=0.0).tokens[0], theirs


def float32_logits(framework, config, tensors, ids):
    if framework == "flax":
        return np.asarray(flax_model.build(config, tensors)(ids))
    with torch.no_grad():
        return torch_model.build(config, tensors)(torch.from_numpy(ids)).numpy()


def measure(shape, new_tokens=50, log=print):
    """Every figure for `shape` (SHAPES), as a dict for a result file."""
    context = SHAPES[shape][1]
    model32 = hf_model(shape, torch.float32)
    config, tensors = imported(model32)
    cases = ids_cases(config, context)
    result = {"shape": shape, "config": config.to_dict(), "context": context,
              "random_scale": SHAPES[shape][2], "new_tokens": new_tokens, "float64": {},
              "float32": {}, "generation": {}, "largest": {}}
    pair.apply_precision("float64")
    hf64 = model32.to(torch.float64)  # the same parameters, widened exactly
    for case, ids in cases.items():
        log(f"float64, {case}: HF ...")
        theirs = hf_outputs(hf64, ids, config)
        result["largest"][case] = {"logits": float(np.max(np.abs(theirs.logits))),
                                   "hidden_states": max(float(np.max(np.abs(h))) for h in theirs.hidden)}
        for framework in FRAMEWORKS:
            log(f"float64, {case}: {framework} ...")
            diffs = differences(ours(framework, config, tensors, ids), theirs)
            result["float64"][f"{framework} {case}"] = summary(diffs)
    prompt = [0, 7 % config.vocab_size, config.vocab_size - 1, 3]
    for framework in FRAMEWORKS:
        log(f"greedy generation: {framework} ...")
        mine, theirs = greedy(framework, config, tensors, hf64, prompt, new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(theirs))
        result["generation"][framework] = {"tokens": len(theirs), "equal_until": same}
    pair.apply_precision("highest")
    for attention in ("eager", "sdpa"):
        model = hf_model(shape, torch.float32, attention)
        for framework in FRAMEWORKS:
            log(f"float32 highest against HF {attention}: {framework} ...")
            worst = 0.0
            for ids in cases.values():
                with torch.no_grad():
                    expected = model(torch.from_numpy(ids)).logits.numpy()
                worst = max(worst, float(np.max(np.abs(float32_logits(framework, config, tensors,
                                                                      ids) - expected))))
            result["float32"][f"{framework} vs {attention}"] = worst
    return result


def summary(diffs):
    """The worst of each kind of difference, and where."""
    grads = {k.removeprefix("gradient "): v for k, v in diffs.items() if k.startswith("gradient ")}
    hidden = [v for k, v in diffs.items() if k.startswith("hidden state")]
    out = {"logits": diffs["logits"], "hidden_states": max(hidden)}
    if grads:
        worst = max(grads, key=lambda n: np.nan_to_num(grads[n], nan=np.inf))
        out.update(loss=diffs["loss"], gradient_rel=grads[worst], gradient_worst=worst)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m parity_tests.against_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="gpt2")
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--json", required=True, help="the result file to write")
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = measure(args.shape, args.new_tokens, log=lambda m: print(m, file=sys.stderr, flush=True))
    result.update(pair.environment({}), seconds=time.perf_counter() - start,
                  transformers=transformers.__version__)
    write_json(args.json, result)
    print(f"wrote {args.json} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
