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

import codecs
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flax_gpt.core import loop, memory, runfolder
from flax_gpt.core.config import GPTConfig
from flax_gpt.core.data import BOS, EOS, IGNORE_INDEX, TokenDataset
from flax_gpt.core.errors import CheckpointError, DatasetError, FlaxGPTError
from flax_gpt.core.generation import Sampling, check_window_keep
from flax_gpt.core.hparams import check_sampling
from flax_gpt.core.sharding import MeshError, MeshShape
from flax_gpt.core.streams import DatasetStream, SyntheticStream, check_stream

FRAMEWORKS = ("flax", "torch")
MESH_IS_FLAX = "--mesh shards the Flax trainer; the PyTorch one runs data parallel with --nproc"
PROCESS_OPTIONS = "--coordinator, --num-processes and --process-id (or their JAX_* variables)"


# ---- prepare -------------------------------------------------------------------------------

@dataclass
class PrepareResult:
    path: Path
    manifest: dict
    seconds: float
    bytes_on_disk: int

    def to_dict(self):
        return self.manifest


def prepare(out, *, text_files=None, corpus=None, implementation="torchtext",
            tokenizer="basic_english", bpe_files=None, min_freq=None, max_vocab=None,
            val_fraction=0.1, errors="strict", force=False, warn=None):
    """Tokenize `text_files` (paths, read in order) or the public `corpus` into the dataset
    folder `out` with `tokenizer` by `implementation` (see flax_gpt.prepare.build). GPT-2's
    BPE files come from the folder `bpe_files`, else from the cache (downloaded once); `warn`
    (a callable) hears it when they are not GPT-2's own."""
    from flax_gpt import prepare as preparation

    start = time.perf_counter()
    preparation.check_options(tokenizer, min_freq, max_vocab, val_fraction)
    preparation.load_implementation(implementation)  # a missing torchtext is said before a download
    files, source = None, None
    if tokenizer == "gpt2":
        *files, source = preparation.gpt2_files(bpe_files)
    elif bpe_files:
        raise DatasetError("--bpe-files is GPT-2's tokenizer: pass it with --tokenizer gpt2")
    if corpus:
        sources = [(corpus, preparation.fetch_corpus(corpus))]
    else:
        sources = [(Path(path).name, preparation.read_text_file(path)) for path in text_files]
    manifest = preparation.prepare(sources, out, implementation=implementation,
                                   tokenizer=tokenizer, bpe_files=files, bpe_source=source,
                                   min_freq=min_freq, max_vocab=max_vocab,
                                   val_fraction=val_fraction, errors=errors, force=force)
    if warn and manifest.get("gpt2_files") is False:
        warn(f"{bpe_files} holds BPE files other than GPT-2's (their sha256 differ from "
             f"SPEC.md's): the ids will not match a GPT-2 checkpoint's")
    out = Path(out)
    return PrepareResult(out, manifest, time.perf_counter() - start,
                         sum(f.stat().st_size for f in out.iterdir()))


def default_dataset():
    """tinyshakespeare, prepared once into the cache (downloaded on first use).

    Prepared by the builtin implementation (the files torchtext writes), so that the commands
    that fall back on it (train, compare, parity without --data) run without torchtext too."""
    from flax_gpt import prepare as preparation

    folder = preparation.cache_dir() / "datasets" / "tinyshakespeare"
    if not (folder / "manifest.json").is_file():
        corpus = preparation.fetch_corpus(
            "tinyshakespeare",
            offline=f"copy tinyshakespeare.txt to {preparation.corpus_path('tinyshakespeare')}, "
                    f"or prepare any text with 'flax-gpt prepare --text-file PATH --out DIR' and "
                    f"pass --data DIR")
        print(f"preparing tinyshakespeare into {folder}", file=sys.stderr)
        preparation.prepare([("tinyshakespeare", corpus)], folder, force=True, implementation="builtin")
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


def backend(framework, config, tc, tensors=None, device=None, mesh=None):
    """The trainer of `framework` ("flax" or "torch") at `tc.precision`, from `tensors`
    (canonical) or its own seeded init; `device` is PyTorch's (default cpu); the Flax one
    sharded over `mesh` (a flax_gpt.core.sharding.MeshShape or its text,
    "data=2,fsdp=2,tensor=2") where given."""
    if framework == "flax":
        from flax_gpt import precision
        from flax_gpt.train import FlaxBackend

        precision.apply(tc.precision)
        if mesh is None:
            return FlaxBackend(config, tc, tensors)
        from flax_gpt.mesh import make_mesh

        return FlaxBackend(config, tc, tensors, mesh=make_mesh(mesh))
    if mesh is not None:
        raise MeshError(MESH_IS_FLAX)
    from torch_reference import precision
    from torch_reference.train import TorchBackend

    precision.apply(tc.precision)
    return TorchBackend(config, tc, tensors, device=torch_device(device))


def torch_device(name=None):
    """The PyTorch device `name` (default cpu), refused clearly when this machine lacks it."""
    import torch

    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise FlaxGPTError(f"--device {name!r} is not a PyTorch device: use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlaxGPTError(f"--device {name}: this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise FlaxGPTError(f"--device {name}: only cpu and cuda are supported")
    return str(device)


GPU_MEMORY = "the GPU's memory"
HOST_MEMORY = "this machine's physical memory"


def memory_limit(framework, device=None):
    """(bytes or None, where) of the memory `framework` computes in: GPU_MEMORY on a GPU,
    else HOST_MEMORY (frameworks sharing a place share its memory)."""
    if framework == "flax":
        import jax

        d = jax.devices()[0]
        if d.platform != "cpu":
            return (d.memory_stats() or {}).get("bytes_limit"), GPU_MEMORY
    elif torch_device(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory, GPU_MEMORY
    return memory.physical_memory(), HOST_MEMORY


def check_memory(config, batch_size, what, *, training, attention="explicit", places=(("flax", None),),
                 kv_cache=False, hint=memory.SMALLER, precision="highest", mesh=None):
    """Refuse `config` (ConfigError, one line) where it cannot fit: one model in each of
    `places` ((framework, torch device) pairs, or (framework, torch device, precision) for a
    model at a precision of its own; all resident at once), on `batch_size` rows
    (with decoding's key/value cache: `kv_cache`) at `precision`; `hint` says what to change.
    Before anything is built or compiled: otherwise the OOM killer ends the run, silently.
    `mesh` (a MeshShape or its text): the Flax model is sharded over it, and each device
    holds its share (memory.estimate); held to one device's memory on a GPU, and on the host
    as this process's devices of the mesh together, since they share its memory."""
    shape = MeshShape.parse(mesh) if isinstance(mesh, str) else mesh
    needs = {}
    for framework, device, *own in places:
        limit, where = memory_limit(framework, device)
        sharded = shape if framework == "flax" else None
        # flash kernels (fused attention on a GPU) never hold the T x T scores
        need = memory.estimate(config, batch_size, training=training, kv_cache=kv_cache,
                               scores=not (where == GPU_MEMORY and attention == "fused"),
                               precision=own[0] if own else precision, mesh=sharded)
        if sharded is not None and where == HOST_MEMORY:
            import jax

            need = need * max(1, sharded.size // jax.process_count())
        if where in needs:
            need, limit = needs[where][0] + need, min(filter(None, (limit, needs[where][1])),
                                                      default=None)
        needs[where] = (need, limit)
    for where, (need, limit) in needs.items():
        memory.check(need, f"{what} (batch {batch_size} x seq_len {config.seq_len}, d_model "
                           f"{config.d_model}, {config.n_layers} layers"
                           f"{f', mesh {shape}' if shape else ''})", limit=limit, where=where,
                     hint=hint)


def tensorboard_writer(run):
    return summary_writer()(str(Path(run) / runfolder.TENSORBOARD))


def summary_writer():
    """TensorBoard's SummaryWriter class; refused (CheckpointError) where it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CheckpointError("--tensorboard needs the tensorboard package: "
                              "pip install 'flax-gpt[tensorboard]'") from None
    return SummaryWriter


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


def train(framework, config, tc, *, out, data=None, synthetic=False, resume=False, device=None,
          log_every=10, eval_every=100, eval_batches=20, checkpoint_every=0, keep=3,
          stop_at=None, tensorboard=False, mesh=None, log=None, nproc=1, fsdp=False,
          processes=None, abort=None):
    """Train `config` with `tc` in `framework`, writing the run folder `out` (see
    flax_gpt.core.runfolder); on `data` (a dataset folder, default tinyshakespeare) or
    `synthetic` tokens. `device`: PyTorch's (torch only). SIGINT (Ctrl-C) or SIGTERM saves a
    checkpoint at the next step boundary and raises errors.Interrupted, on every process of
    a run on several at the same step (flax_gpt.core.loop.train).

    `mesh` ("data=2,fsdp=2,tensor=2"): shard the Flax trainer over a device mesh; its rules
    (flax_gpt.core.sharding.describe) go line by line to `log` before training starts.
    `nproc`: train PyTorch data parallel on that many processes (DDP; also when started by
    torchrun, see torch_reference.distributed); the history is rank 0's. `fsdp`: those
    ranks shard the model with FSDP2 instead.
    `processes` (a flax_gpt.core.sharding.Processes): this is one process of a multi-process
    JAX job over `mesh`, which spans the devices of all of them. Each process feeds its own
    devices' rows of every global batch and writes its own shards of each checkpoint;
    process 0 alone writes everything else and returns the history (the others return
    none). Should another process of the job die, `abort(text)` is called with one line
    naming it and the last checkpoint, and this process exits with mesh.LOST_EXIT."""
    if framework not in FRAMEWORKS:
        raise FlaxGPTError(f"unknown framework {framework!r}: choose one of {', '.join(FRAMEWORKS)}")
    if framework == "flax" and device is not None:
        raise FlaxGPTError("--device sets the PyTorch trainer's device; the Flax trainer runs on "
                           "JAX's default device (choose it with JAX_PLATFORMS=cpu or cuda)")
    if framework == "torch" and mesh is not None:
        raise MeshError(MESH_IS_FLAX)
    if framework == "flax" and nproc > 1:
        raise FlaxGPTError("--nproc runs the PyTorch trainer data parallel; the Flax trainer "
                           "spreads over devices with --mesh")
    if fsdp and framework != "torch":
        raise MeshError("--fsdp shards the PyTorch trainer over its ranks; the Flax trainer "
                        "shards with --mesh fsdp=N")
    if processes is not None and framework != "flax":
        raise FlaxGPTError(f"{PROCESS_OPTIONS} join a multi-process JAX job, for the Flax "
                           f"trainer; the PyTorch trainer runs on several processes with --nproc "
                           f"or under torchrun")
    if processes is not None and mesh is None:
        raise MeshError(f"{PROCESS_OPTIONS} need --mesh over the devices of all the processes "
                        f"(e.g. --mesh data=N, N their total device count)")
    loop.check_options(tc.steps, log_every=log_every, eval_every=eval_every,
                       eval_batches=eval_batches, checkpoint_every=checkpoint_every, keep=keep,
                       stop_at=stop_at)
    config, stream = make_stream(config, tc, data=data, synthetic=synthetic)
    record = runfolder.run_record(framework, config, tc, stream)
    ranks, other_rank = 1, False
    if framework == "torch":
        from torch_reference import distributed

        torchrun = distributed.under_torchrun()
        ranks = int(os.environ["WORLD_SIZE"]) if torchrun else nproc
        other_rank = torchrun and int(os.environ["RANK"]) != 0
        distributed.check(tc.batch_size, ranks, fsdp)
    if processes is None:  # a JAX job's processes check it together, once joined
        # rank 0 alone probes the lock: two probes at once would see each other's
        runfolder.check_start(out, record, resume=resume, stop_at=stop_at, locked=other_rank)
    if ranks > 1:
        device = torch_device(device)
        # each rank holds a whole model on its rows (FSDP less); on the CPU the ranks share the
        # host's memory
        check_memory(config, tc.batch_size // ranks, f"training {framework} on {ranks} ranks",
                     training=True, attention=tc.attention, precision=tc.precision,
                     places=[(framework, device)] * (1 if device.startswith("cuda") else ranks))
        start = time.perf_counter()
        history = distributed.train(
            None if distributed.under_torchrun() else nproc, config, tc, stream, out, device=device,
            writer_factory=tensorboard_writer if tensorboard else None, fsdp=fsdp, resume=resume,
            log_every=log_every, eval_every=eval_every, eval_batches=eval_batches,
            checkpoint_every=checkpoint_every, keep=keep, stop_at=stop_at)
        return TrainResult(framework, Path(out), time.perf_counter() - start, history)
    primary, stop, lifeline = True, None, contextlib.nullcontext()
    if processes is not None:
        from flax_gpt.mesh import JobStop, Lifeline, agree, join

        primary = join(processes) == 0
        say = abort or (lambda text: print(text, file=sys.stderr))
        lifeline = Lifeline(lambda index: say(
            f"process {index} of the JAX job is gone (killed or crashed: its own output says "
            f"why), so this one stops too; {runfolder.how_to_continue(out)}"))
        stop = JobStop()
    with lifeline:  # closed as the job ends or stops alike on every process
        if processes is not None:
            shape, problem = mesh, None
            try:  # what each process might refuse, before they agree to go on
                shape = MeshShape.parse(mesh) if isinstance(mesh, str) else mesh  # spelled alike
                # process 0 alone probes the lock: two probes at once would see each other's
                runfolder.check_start(out, record, resume=resume, stop_at=stop_at,
                                      locked=not primary)
                check_memory(config, tc.batch_size, f"training {framework}", training=True,
                             attention=tc.attention, places=[(framework, device)],
                             precision=tc.precision, mesh=shape)
                if tensorboard and primary:  # refused here, not later by process 0 alone
                    summary_writer()
            except FlaxGPTError as e:
                problem = e
            settings = json.dumps([record, str(shape), str(Path(out).resolve()), resume, stop_at,
                                   log_every, eval_every, eval_batches, checkpoint_every, keep])
            agree(settings, problem)  # and none writes in the folder before all checked it
        else:
            check_memory(config, tc.batch_size, f"training {framework}", training=True,
                         attention=tc.attention, places=[(framework, device)],
                         precision=tc.precision, mesh=mesh)
        trainer = backend(framework, config, tc, device=device, mesh=mesh)
        if mesh is not None and log and primary:
            for line in trainer.layout.lines:
                log(line)
        start = time.perf_counter()
        history = loop.train(trainer, stream, out, resume=resume, log_every=log_every,
                             eval_every=eval_every, eval_batches=eval_batches,
                             checkpoint_every=checkpoint_every, keep=keep, stop_at=stop_at,
                             writer=tensorboard_writer(out) if tensorboard and primary else None,
                             primary=primary, stop=stop)
        return TrainResult(framework, Path(out), time.perf_counter() - start,
                           history if primary else [])


# ---- eval and generate -------------------------------------------------------------------------

def run_model(run, record, batch_size, what, precision=None, framework="flax", tensors=None):
    """The model (eval mode) of a run folder's latest weights, which must be of the run's
    config (`record`), or of `tensors` (a weights file's), at `precision` (default: float64
    for a float64 run, else highest) with its framework set to it: the Flax model, or with
    `framework` "torch" the PyTorch twin; refused before it is built when `what` (evaluating,
    generating) on `batch_size` rows cannot fit in memory."""
    if framework == "torch":
        from torch_reference import precision as precisions
        from torch_reference.model import build
    else:
        from flax_gpt import precision as precisions
        from flax_gpt.model import build

    config = GPTConfig.from_dict(record["model"])
    precision = precision or ("float64" if record["train"].get("precision") == "float64" else "highest")
    check_memory(config, batch_size, what, training=False, places=((framework, None),),
                 kv_cache=what == "generating", precision=precision)
    precisions.apply(precision)
    if tensors is None:
        tensors = runfolder.checkpoint_weights(run, config)
    return build(config, tensors, precision=precision)


def model_source(source, data=None, bpe_files=None):
    """(record, dataset or None, tensors or None) of what eval and generate read: a run folder
    (its config.json; its weights are read later), or a canonical weights file such as
    import-hf writes, whose text comes from the dataset folder `data` or, for GPT-2's
    vocabulary, from GPT-2's BPE files (the folder `bpe_files`, else the cache)."""
    from flax_gpt.core import hf, weights

    path = Path(source)
    if bpe_files and (data or not path.is_file()):
        raise DatasetError(f"--bpe-files gives a weights file's text; "
                           f"{'--data' if data else 'a run folder'} has its own: leave it out")
    if not path.is_file():
        return runfolder.read_record(path), None, None
    config, tensors = weights.load(path)
    record = {"model": config.to_dict(), "train": {}, "data": {}}
    if data:
        dataset, named = TokenDataset.load(data), f"--data {data}"
    elif config.vocab_size == hf.GPT2_VOCAB:
        from flax_gpt import prepare as preparation
        from flax_gpt.core import bpe

        *files, named = preparation.gpt2_files(bpe_files)
        dataset = TokenDataset.of_bpe(bpe.BPE.from_bytes(*files, where=named))
    else:
        gpt2 = f" (--bpe-files is GPT-2's {hf.GPT2_VOCAB:,})" if bpe_files else ""
        raise DatasetError(f"{path} is a weights file, which has no text of its own: pass --data "
                           f"with a dataset of its {config.vocab_size} tokens{gpt2}")
    if dataset.vocab_size != config.vocab_size:
        raise DatasetError(f"{named} has a vocabulary of {dataset.vocab_size} tokens, the model in "
                           f"{path} {config.vocab_size}")
    return record, dataset, tensors


def run_batches(record, config, dataset, split, batch_size):
    """Every batch of `split` of `dataset` (see runfolder.run_dataset). A run on synthetic
    tokens, with no `dataset`, reads the first SyntheticStream.EVAL_BATCHES batches of that
    split of its own stream (the seed it trained with): with the run's batch size, the
    validation batches its training evaluated on with --eval-batches 0."""
    if dataset is None:
        stream = SyntheticStream(config.vocab_size, batch_size, config.seq_len,
                                 record["train"]["seed"])
        return stream.eval_batches(0, split)
    dataset.check_batches(split, batch_size, config.seq_len)
    return dataset.batches(split, batch_size, config.seq_len)


@dataclass
class EvalResult:
    """Mean cross-entropy (nats per token) and perplexity; on a GPT-2 dataset also per byte of
    the text the targets stand for (`<|endoftext|>` counts no bytes), comparable across
    tokenizers: nats and bits per byte, and the per-byte perplexity."""

    run: str
    split: str
    batches: int
    loss: float
    perplexity: float
    tokens: int = None
    bytes: int = None
    loss_per_byte: float = None
    bits_per_byte: float = None
    perplexity_per_byte: float = None

    def to_dict(self):
        return dataclasses.asdict(self)


def evaluate(run, *, data=None, split="val", batch_size=None, precision=None):
    """Mean cross-entropy and perplexity of `run`'s latest weights (or of a weights file, see
    model_source) over every batch of a split (Flax, eval mode: no dropout, at `precision`:
    see run_model), `batch_size` rows at a time (default: the run's; 8 for a weights file).
    A synthetic run without `data` is evaluated on its own stream's batches (see
    run_batches)."""
    from flax import nnx

    from flax_gpt.train import eval_loss

    if Path(run).is_file() and not data:
        raise DatasetError(f"{run} is a weights file: pass --data with a dataset to evaluate on")
    record, dataset, tensors = model_source(run, data)
    config = GPTConfig.from_dict(record["model"])
    batch_size = batch_size or record["train"].get("batch_size", 8)
    if dataset is None and not (record["data"].get("synthetic") and not data):
        dataset = runfolder.run_dataset(record, data)
    model = run_model(run, record, batch_size, "evaluating", precision, tensors=tensors)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lengths = dataset.bpe.byte_lengths() if dataset is not None and dataset.bpe else None
    counted = {"tokens": 0, "bytes": 0}

    def loss_of(x, y):
        if lengths is not None:  # the text the targets stand for, counted on the way
            targets = y[y != IGNORE_INDEX]
            counted["tokens"] += targets.size
            counted["bytes"] += int(lengths[targets].sum())
        return float(eval_loss(graphdef, params, rest, x, y))

    loss, ppl, n = loop.mean_loss(loss_of, run_batches(record, config, dataset, split, batch_size))
    result = EvalResult(str(run), split, n, loss, ppl)
    if lengths is not None:
        result.tokens, result.bytes = counted["tokens"], counted["bytes"]
        total = loss * result.tokens  # every batch has as many targets: the mean of means
        result.loss_per_byte = total / result.bytes
        result.bits_per_byte = result.loss_per_byte / math.log(2)
        result.perplexity_per_byte = math.exp(min(result.loss_per_byte, 700.0))
    return result


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
             cached=True, on_text=None, specials=False, bpe_files=None):
    """Sample `max_new_tokens` after `prompt` from `run`'s latest weights (or a weights file,
    see model_source; temperature 0: greedy) at `precision` (see run_model), with the Flax
    model or, with `framework` "torch", the PyTorch twin: the same seed gives the same text
    in both wherever their probabilities agree. `stop`: a token that ends the text once drawn
    (e.g. "<eos>", "<|endoftext|>"); `window_keep`, `cached`: see flax_gpt.core.generation.
    basic_english: the text ends a line at each `<eos>` and drops `<bos>`; `specials` shows
    every token as it is. GPT-2's BPE: the tokens' bytes joined, read as UTF-8.
    `on_text(piece)` gets the prompt's text, then each new token's text as it is drawn,
    rendered alike."""
    check_sampling(max_new_tokens, temperature, top_k, seed)
    Sampling(temperature, top_k, top_p)  # refused here, before the prompt is echoed
    for name, text in (("--prompt", prompt), ("--stop", stop)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise FlaxGPTError(f"{name} is not valid UTF-8 text (position {e.start}): pass it "
                               f"in UTF-8") from None
    record, dataset, tensors = model_source(run, data, bpe_files)
    dataset = dataset or runfolder.run_dataset(record, data)
    stop_token = None if stop is None else dataset.token_id(stop)
    check_window_keep(window_keep, record["model"]["seq_len"])
    model = run_model(run, record, 1, "generating", precision, framework, tensors=tensors)
    context = contextlib.nullcontext()
    if framework == "torch":
        from torch_reference.precision import autocast
        from torch_reference.sample import generate as sample

        context = autocast(precision or "highest")  # bf16: PyTorch's matmuls as Flax's
    else:
        from flax_gpt.sample import generate as sample
    prompt_ids = [dataset.start, *dataset.encode(prompt)]
    stream = TextStream(dataset, on_text, prompt_ids, specials) if on_text else None
    with context:
        out = sample(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, stop_token=stop_token, window_keep=window_keep,
                     cached=cached, on_token=stream)
    if stream:
        stream.finish()
    ids = out.ids[0]
    return GenerateResult(prompt, ids, dataset.render(ids[1:], specials=specials),
                          dataset.unknown_words(prompt), framework, out.to_dict())


class TextStream:
    """generate's on_token for one row: `on_text(piece)` with the prompt's text, then each
    token's text as it comes, as TokenDataset.render writes it: words after a space, <eos> as
    a line break, <bos> as nothing; with `specials`, every token as a word. GPT-2's BPE: the
    tokens' bytes through one incremental UTF-8 decoder, so that a character whose bytes are
    split across tokens is printed whole, once its last byte came."""

    def __init__(self, dataset, on_text, prompt_ids, specials=False):
        self.dataset, self.on_text, self.specials, self.line_start = dataset, on_text, specials, True
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in prompt_ids[1:]:  # after the start token that render leaves out too
            self(0, [token])

    def __call__(self, step, tokens):
        token = tokens[0]
        if token is None:
            return
        if self.dataset.bpe:
            piece = self.utf8.decode(self.dataset.bpe.token_bytes(token))
            if piece:
                self.on_text(piece)
        elif token == EOS and not self.specials:
            self.on_text("\n")
            self.line_start = True
        elif token != BOS or self.specials:
            self.on_text(("" if self.line_start else " ") + self.dataset.itos[token])
            self.line_start = False

    def finish(self):
        """The end of the text: bytes of a character that never completed, as U+FFFD (as
        the returned text has them)."""
        piece = self.utf8.decode(b"", final=True)
        if piece:
            self.on_text(piece)


# ---- Hugging Face checkpoints ----------------------------------------------------------------

@dataclass
class HFResult:
    """What import_hf / export_hf wrote: the canonical weights file or the Hugging Face folder,
    where the weights came from, and the model's config."""

    path: Path
    source: str
    config: GPTConfig
    parameters: int

    def to_dict(self):
        return {"path": str(self.path), "source": self.source, "config": self.config.to_dict(),
                "parameters": self.parameters}


def import_hf(src, out):
    """A GPT-2 checkpoint (`GPT2LMHeadModel`) as the canonical weights file `out`. `src`: a
    save_pretrained folder (model.safetensors, its shards, or pytorch_model.bin) or, where it
    names no folder, a Hugging Face hub name such as "gpt2" (downloaded once into the Hugging
    Face cache; needs huggingface_hub and network). flax_gpt.load(out) and
    torch_reference.load(out) then give the model in either framework."""
    from flax_gpt.core import hf, weights

    folder = _hf_folder(src)
    config = hf.config_from_hf(hf.read_config(folder))
    state = hf.read_safetensors(folder)
    if state is None:
        state = _read_bin(folder)
    tensors = hf.tensors_from_hf(config, state)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    weights.save(out, config, tensors)
    return HFResult(Path(out), str(src), config, sum(t.size for t in tensors.values()))


def _hf_folder(src):
    """The local folder of `src`: itself, or a hub name's snapshot in the Hugging Face cache."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise FlaxGPTError(f"{src} is a file: pass the folder save_pretrained wrote (config.json "
                           f"beside the weights) or a hub name such as gpt2")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FlaxGPTError(f"{src} is no folder here, and reading it as a hub name needs "
                           f"huggingface_hub: pip install huggingface_hub, or pass a "
                           f"save_pretrained folder") from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    try:
        local = Path(snapshot_download(str(src), allow_patterns=patterns))
        if not any(local.glob("*.safetensors")):  # an old checkpoint: pytorch_model.bin only
            local = Path(snapshot_download(str(src), allow_patterns=["config.json", "pytorch_model.bin"]))
    except Exception as e:  # huggingface_hub's errors (offline, unknown repo) share no base class
        raise FlaxGPTError(f"{src} is no folder here and could not be downloaded from the "
                           f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                           f"check the name and the network, or pass a save_pretrained "
                           f"folder") from None
    return local


def _read_bin(folder):
    """The state dict of `folder`'s pytorch_model.bin as numpy (torch.load, tensors only)."""
    import torch

    from flax_gpt.core import hf
    from flax_gpt.core.errors import WeightsError

    path = folder / hf.BIN_FILE
    if not path.is_file():
        raise WeightsError(f"{folder} has no {hf.SAFETENSORS_FILE}, {hf.SAFETENSORS_INDEX} or "
                           f"{hf.BIN_FILE}: pass a save_pretrained folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign pickle raises many kinds
        raise WeightsError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or hf.is_mask_buffer(name)):
            raise WeightsError(f"{path}: {name!r} is not a floating-point tensor: not a "
                               f"GPT2LMHeadModel state dict")
    # numpy has no bfloat16: half precisions widen to float32, exactly
    return {name: (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy()
            for name, t in state.items()}


def export_hf(source, out, *, force=False):
    """The canonical weights file `source` (or a run folder's latest weights) as a folder
    `transformers.GPT2LMHeadModel.from_pretrained(out)` loads; an existing `out` is replaced
    only with `force`."""
    from flax_gpt.core import hf, weights

    path, out = Path(source), Path(out)
    if path.is_dir():
        path = path / runfolder.WEIGHTS
    hf.check_export_target(out, force=force, source=path)  # before any work
    config, tensors = weights.load(path)
    hf.write_folder(out, config, tensors, force=force)
    return HFResult(Path(out), str(path), config, sum(t.size for t in tensors.values()))
