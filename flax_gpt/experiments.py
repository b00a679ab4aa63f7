"""The single-framework experiments behind `flax-gpt prepare | train | eval | generate`.

Each is a plain function that returns a result object; the CLI only parses arguments, calls
one of them and prints the result (`to_dict()` is what `--json` writes). The side-by-side
experiments (parity, compare, bench) live in flax_gpt.sidebyside.

    from flax_gpt import experiments
    from flax_gpt.core.config import GPTConfig
    from flax_gpt.core.hparams import TrainConfig

    experiments.prepare("data/shakespeare", text_files=["input.txt"])
    r = experiments.train("flax", GPTConfig.preset("small"), TrainConfig(steps=300),
                          data="data/shakespeare", out="runs/flax")
    experiments.evaluate("runs/flax").perplexity
    experiments.generate("runs/flax", prompt="the king", max_new_tokens=40).text
"""

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flax_gpt.core import loop, runfolder
from flax_gpt.core.data import BOS, EOS, TokenDataset
from flax_gpt.core.errors import CheckpointError, FlaxGPTError
from flax_gpt.core.streams import DatasetStream, SyntheticStream, check_stream

FRAMEWORKS = ("flax", "torch")


# ---- prepare -------------------------------------------------------------------------------

@dataclass
class PrepareResult:
    path: Path
    manifest: dict
    seconds: float
    bytes_on_disk: int

    def to_dict(self):
        return self.manifest


def prepare(out, *, text_files=None, corpus=None, min_freq=1, max_vocab=None, val_fraction=0.1,
            errors="strict", force=False):
    """Tokenize `text_files` (paths, read in order) or the public `corpus` into the dataset
    folder `out` (see flax_gpt.prepare.prepare)."""
    from flax_gpt import prepare as preparation

    start = time.perf_counter()
    if corpus:
        sources = [(corpus, preparation.fetch_corpus(corpus))]
    else:
        sources = [(Path(path).name, preparation.read_text_file(path)) for path in text_files]
    manifest = preparation.prepare(sources, out, min_freq=min_freq, max_vocab=max_vocab,
                                   val_fraction=val_fraction, errors=errors, force=force)
    out = Path(out)
    return PrepareResult(out, manifest, time.perf_counter() - start,
                         sum(f.stat().st_size for f in out.iterdir()))


def default_dataset():
    """tinyshakespeare, prepared once into the cache (downloaded on first use)."""
    from flax_gpt import prepare as preparation

    folder = preparation.cache_dir() / "datasets" / "tinyshakespeare"
    if not (folder / "manifest.json").is_file():
        print(f"preparing tinyshakespeare into {folder}", file=sys.stderr)
        preparation.prepare([("tinyshakespeare", preparation.fetch_corpus("tinyshakespeare"))],
                            folder, force=True)
    return folder


# ---- train ---------------------------------------------------------------------------------

def make_stream(config, tc, *, data=None, synthetic=False):
    """(model config, batch stream): uniform random tokens, or the dataset folder `data`
    (default: tinyshakespeare), whose vocabulary then sets the config's."""
    if synthetic:
        stream = SyntheticStream(config.vocab_size, tc.batch_size, config.seq_len, tc.seed)
    else:
        dataset = TokenDataset.load(data or default_dataset())
        config = config.replace(vocab_size=dataset.vocab_size)
        stream = DatasetStream(dataset, tc.batch_size, config.seq_len, tc.seed)
    check_stream(stream, config)
    return config, stream


def backend(framework, config, tc, tensors=None, device="cpu"):
    """The trainer of `framework` ("flax" or "torch") at `tc.precision`, from `tensors`
    (canonical) or its own seeded init."""
    if framework == "flax":
        from flax_gpt import precision
        from flax_gpt.train import FlaxBackend

        precision.apply(tc.precision)
        return FlaxBackend(config, tc, tensors)
    from torch_reference import precision
    from torch_reference.train import TorchBackend

    precision.apply(tc.precision)
    return TorchBackend(config, tc, tensors, device=device)


def tensorboard_writer(run):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CheckpointError("--tensorboard needs the tensorboard package: "
                              "pip install 'flax-gpt[tensorboard]'") from None
    return SummaryWriter(str(Path(run) / "tensorboard"))


@dataclass
class TrainResult:
    framework: str
    run: Path
    seconds: float
    history: list  # per-step records and evaluations, as in RUN/metrics.jsonl

    @property
    def steps(self):
        return [h for h in self.history if "loss" in h]

    @property
    def evals(self):
        return [h for h in self.history if "val_loss" in h]

    def to_dict(self):
        return {"framework": self.framework, "run": str(self.run), "seconds": self.seconds,
                "history": self.history}


def train(framework, config, tc, *, out, data=None, synthetic=False, resume=False, device="cpu",
          log_every=10, eval_every=100, eval_batches=20, checkpoint_every=0, keep=3,
          stop_at=None, tensorboard=False):
    """Train `config` with `tc` in `framework`, writing the run folder `out` (see
    flax_gpt.core.runfolder); on `data` (a dataset folder, default tinyshakespeare) or
    `synthetic` tokens. Ctrl-C saves a checkpoint and raises KeyboardInterrupt."""
    config, stream = make_stream(config, tc, data=data, synthetic=synthetic)
    trainer = backend(framework, config, tc, device=device)
    start = time.perf_counter()
    history = loop.train(trainer, stream, out, resume=resume, log_every=log_every,
                         eval_every=eval_every, eval_batches=eval_batches,
                         checkpoint_every=checkpoint_every, keep=keep, stop_at=stop_at,
                         writer=tensorboard_writer(out) if tensorboard else None)
    return TrainResult(framework, Path(out), time.perf_counter() - start, history)


# ---- eval and generate -------------------------------------------------------------------------

def run_model(run, precision=None, framework="flax"):
    """(model in eval mode, run record) of a run folder's latest weights, at `precision`
    (default: float64 for a float64 run, else highest), with its framework set to it: the
    Flax model, or with `framework` "torch" the PyTorch twin."""
    record = runfolder.read_record(run)
    precision = precision or ("float64" if record["train"].get("precision") == "float64" else "highest")
    if framework == "torch":
        import torch_reference
        from torch_reference import precision as precisions

        precisions.apply(precision)
        return torch_reference.load(Path(run) / runfolder.WEIGHTS, precision=precision), record
    import flax_gpt
    from flax_gpt import precision as precisions

    precisions.apply(precision)
    return flax_gpt.load(Path(run) / runfolder.WEIGHTS, precision=precision), record


def run_dataset(record, data=None):
    """The dataset folder `data`, else the one the run trained on."""
    if data:
        return TokenDataset.load(data)
    if record["data"].get("synthetic"):
        raise FlaxGPTError("this run trained on synthetic tokens: pass --data for text")
    return TokenDataset.load(record["data"]["path"])


@dataclass
class EvalResult:
    run: str
    split: str
    batches: int
    loss: float
    perplexity: float

    def to_dict(self):
        return dataclasses.asdict(self)


def evaluate(run, *, data=None, split="val", batch_size=16, precision=None):
    """Mean cross-entropy and perplexity of `run`'s latest weights over every batch of a split
    (Flax, eval mode, at `precision`: see run_model)."""
    from flax import nnx

    from flax_gpt.train import eval_loss

    model, record = run_model(run, precision)
    dataset = run_dataset(record, data)
    if dataset.vocab_size != model.config.vocab_size:
        raise FlaxGPTError(f"--data has {dataset.vocab_size} tokens, the model {model.config.vocab_size}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, ppl, n = loop.mean_loss(lambda x, y: float(eval_loss(graphdef, params, rest, x, y)),
                                  dataset.batches(split, batch_size, model.config.seq_len))
    return EvalResult(str(run), split, n, loss, ppl)


@dataclass
class GenerateResult:
    prompt: str
    ids: list  # the prompt's ids (after <bos>) and the new ones
    text: str
    unknown_words: list  # prompt words read as <unk>
    framework: str = "flax"
    generation: dict = None  # flax_gpt.core.generation.Generation.to_dict(): timings, stop, slides

    def to_dict(self):
        return dataclasses.asdict(self)


def generate(run, *, prompt="", data=None, max_new_tokens=100, temperature=1.0, top_k=0, seed=0,
             precision=None, framework="flax", top_p=1.0, stop=None, window_keep=None,
             cached=True, on_text=None):
    """Sample `max_new_tokens` after `prompt` from `run`'s latest weights (temperature 0:
    greedy) at `precision` (see run_model), with the Flax model or, with `framework`
    "torch", the PyTorch twin: the same seed gives the same text in both wherever their
    probabilities agree. `stop`: a word that ends the text once drawn (e.g. "<eos>");
    `window_keep`, `cached`: see flax_gpt.core.generation. `on_text(piece)` gets the
    prompt's text, then each new token's text as it is drawn."""
    if not temperature >= 0:
        raise FlaxGPTError(f"--temperature must be >= 0, got {temperature}")
    model, record = run_model(run, precision, framework)
    dataset = run_dataset(record, data)
    if stop is not None and stop not in dataset.stoi:
        raise FlaxGPTError(f"stop word {stop!r} is not in the vocabulary")
    if framework == "torch":
        from torch_reference.sample import generate as sample
    else:
        from flax_gpt.sample import generate as sample
    prompt_ids = [BOS, *dataset.encode(prompt)]
    stream = TextStream(dataset, on_text, prompt_ids) if on_text else None
    out = sample(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, stop_token=None if stop is None else dataset.stoi[stop],
                 window_keep=window_keep, cached=cached, on_token=stream)
    ids = out.ids[0]
    text = dataset.decode(ids[1:]).replace(" <eos> <bos> ", "\n").replace("<eos> <bos>", "\n")
    return GenerateResult(prompt, ids, text, dataset.unknown_words(prompt), framework, out.to_dict())


class TextStream:
    """generate's on_token for one row: `on_text(piece)` with the prompt's text, then each
    token's text as it comes: words after a space, <eos> as a line break, <bos> as nothing."""

    def __init__(self, dataset, on_text, prompt_ids):
        self.dataset, self.on_text, self.line_start = dataset, on_text, True
        for token in prompt_ids:
            self(0, [token])

    def __call__(self, step, tokens):
        token = tokens[0]
        if token == EOS:
            self.on_text("\n")
            self.line_start = True
        elif token != BOS and token is not None:
            self.on_text(("" if self.line_start else " ") + self.dataset.itos[token])
            self.line_start = False


