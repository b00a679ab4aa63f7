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
from flax_gpt.core.data import BOS, TokenDataset
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

def run_model(run):
    """(Flax model in eval mode, run record) of a run folder's latest weights."""
    import flax_gpt

    record = runfolder.read_record(run)
    return flax_gpt.load(Path(run) / runfolder.WEIGHTS), record


def run_dataset(record, config, data=None):
    """The dataset folder `data`, else the one the run trained on; refused unless its
    vocabulary is the model's."""
    if data:
        dataset = TokenDataset.load(data)
    elif record["data"].get("synthetic"):
        raise FlaxGPTError(f"this run trained on synthetic tokens, which have no text: pass "
                           f"--data with a dataset of {config.vocab_size} tokens")
    else:
        dataset = TokenDataset.load(record["data"]["path"])
    if dataset.vocab_size != config.vocab_size:
        raise FlaxGPTError(f"the dataset {dataset.path} has {dataset.vocab_size} tokens, the "
                           f"model {config.vocab_size}")
    return dataset


def run_batches(record, config, data, split, batch_size):
    """Every batch of `split` of the dataset `data` or the run's own. A run on synthetic
    tokens, without `data`, reads the first SyntheticStream.EVAL_BATCHES batches of that
    split of its own stream (the seed it trained with): with the run's batch size, the
    validation batches its training evaluated on with --eval-batches 0."""
    if not data and record["data"].get("synthetic"):
        stream = SyntheticStream(config.vocab_size, batch_size, config.seq_len,
                                 record["train"]["seed"])
        return stream.eval_batches(0, split)
    return run_dataset(record, config, data).batches(split, batch_size, config.seq_len)


@dataclass
class EvalResult:
    run: str
    split: str
    batches: int
    loss: float
    perplexity: float

    def to_dict(self):
        return dataclasses.asdict(self)


def evaluate(run, *, data=None, split="val", batch_size=16):
    """Mean cross-entropy and perplexity of `run`'s latest weights over every batch of a split
    (Flax, float32 at the highest matmul precision, eval mode: no dropout). A synthetic run
    without `data` is evaluated on its own stream's batches (see run_batches)."""
    from flax_gpt import precision

    precision.apply("highest")
    from flax import nnx

    from flax_gpt.train import eval_loss

    model, record = run_model(run)
    batches = run_batches(record, model.config, data, split, batch_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, ppl, n = loop.mean_loss(lambda x, y: float(eval_loss(graphdef, params, rest, x, y)),
                                  batches)
    return EvalResult(str(run), split, n, loss, ppl)


@dataclass
class GenerateResult:
    prompt: str
    ids: list  # the prompt's ids (after <bos>) and the new ones
    text: str
    unknown_words: list  # prompt words read as <unk>

    def to_dict(self):
        return dataclasses.asdict(self)


def generate(run, *, prompt="", data=None, max_new_tokens=100, temperature=1.0, top_k=0, seed=0):
    """Sample `max_new_tokens` after `prompt` from `run`'s latest weights (temperature 0:
    greedy). The same seed gives the same text."""
    from flax_gpt.sample import generate as sample

    if not temperature >= 0:
        raise FlaxGPTError(f"--temperature must be >= 0, got {temperature}")
    model, record = run_model(run)
    dataset = run_dataset(record, model.config, data)
    ids = sample(model, [BOS, *dataset.encode(prompt)], max_new_tokens, temperature=temperature,
                 top_k=top_k, seed=seed)
    text = dataset.decode(ids[1:]).replace(" <eos> <bos> ", "\n").replace("<eos> <bos>", "\n")
    return GenerateResult(prompt, ids, text, dataset.unknown_words(prompt))


