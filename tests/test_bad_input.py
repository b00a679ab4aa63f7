"""Bad input across every subcommand, as a new user types it: each is refused with exit 2 and
one line on stderr that says what is wrong (no traceback), before any work, leaving nothing
behind that blocks a retry. The run folder used here is written by a framework-free backend
(tests.conftest.FakeBackend), so no case compiles anything.

The cases run one after another in one process (tests.conftest.run_cli_many: a process per
case spent minutes on imports alone), each in its own copy of the workspace; a few run as
processes of their own too, so that whatever only a fresh process prints (a warning at
import, at exit) is seen.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flax_gpt.core import hf, loop, runfolder, weights
from flax_gpt.core.config import GPT2, GPTConfig
from flax_gpt.core.data import TokenDataset
from flax_gpt.core.hparams import TrainConfig
from flax_gpt.core.streams import DatasetStream
from tests.conftest import FakeBackend, run_cli, run_cli_many, text
from tests.datasets import implementation, prepare_dataset


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Datasets, a run folder and weights files, good and bad, copied into each case."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "text.txt").write_text(text(400, 0))
    (ws / "other.txt").write_text(text(300, 1))
    prepare_dataset([("text.txt", (ws / "text.txt").read_bytes())], ws / "ds")
    prepare_dataset([("tiny.txt", b"one two\nthree\n")], ws / "dstiny", val_fraction=0.5)
    bad = shutil.copytree(ws / "ds", ws / "dsbadvocab")  # a vocabulary that is not UTF-8
    vocab = (bad / "vocab.txt").read_bytes().replace(b"\nthe\n", b"\nth\xff\n", 1)
    (bad / "vocab.txt").write_bytes(vocab)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["vocab"]["sha256"] = hashlib.sha256(vocab).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))

    dataset = TokenDataset.load(ws / "ds")
    config = GPTConfig.preset("tiny", vocab_size=dataset.vocab_size)
    tc = TrainConfig(steps=2, batch_size=4)
    loop.train(FakeBackend(config, tc), DatasetStream(dataset, 4, config.seq_len, 0), ws / "run",
               progress="off")
    shutil.copytree(ws / "run", ws / "runempty")
    (ws / "runempty" / runfolder.CONFIG).write_text("{}")

    config_, tensors = weights.load(ws / "run" / runfolder.WEIGHTS)
    nan = {**tensors, "pred.bias": np.full_like(tensors["pred.bias"], np.nan)}
    save_file(nan, str(ws / "nan.safetensors"), metadata={"config": config_.to_json()})
    weights.save(ws / "seq100k.safetensors", config_.replace(seq_len=100_000), tensors)
    header = b"[1, 2, 3]"  # a header that is JSON, but a list
    (ws / "list.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    gpt2 = GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=2, **GPT2)
    rng = np.random.default_rng(0)
    hf.write_folder(ws / "hf", gpt2, {name: rng.normal(size=shape).astype(np.float32)
                                      for name, shape in weights.canonical_shapes(gpt2).items()})
    weights.save(ws / "gpt2.safetensors", gpt2, hf.tensors_from_hf(gpt2, load_file(ws / "hf" / hf.SAFETENSORS_FILE)))
    return ws


def hf_tensors(change):
    """A setup: the Hugging Face folder's tensors edited by `change` (a dict, in place)."""
    def setup(w):
        state = load_file(w / "hf" / hf.SAFETENSORS_FILE)
        change(state)
        save_file(state, str(w / "hf" / hf.SAFETENSORS_FILE), metadata={"format": "pt"})
    return setup


def _drop_key(path, key):
    fields = json.loads(path.read_text())
    del fields[key]
    path.write_text(json.dumps(fields))


def hf_config(**changes):
    def setup(w):
        path = w / "hf" / hf.CONFIG_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return setup


T = ["--preset", "tiny", "--synthetic", "--steps", "2", "--batch-size", "2", "--eval-every", "0"]
RUN = ["--preset", "tiny", "--data", "{w}/ds", "--steps", "2", "--batch-size", "4", "--eval-every", "0"]
NEW = ["--out", "{w}/new"]


def use_weights(name):
    return lambda w: shutil.copy(w / name, w / "run" / runfolder.WEIGHTS)


def reprepare(w):
    prepare_dataset([("other.txt", (w / "other.txt").read_bytes())], w / "ds", force=True)


PREP = ["--implementation", implementation()]  # the stack's own, so that the option is judged

# (id, arguments ({w}: the workspace), a fragment of the one stderr line, setup or None)
CASES = [
    ("prepare-out-is-a-file", ["prepare", *PREP, "--text-file", "{w}/text.txt", "--out",
                               "{w}/text.txt", "--force"], "is a file", None),
    ("prepare-min-freq-leaves-no-word", ["prepare", *PREP, "--text-file", "{w}/text.txt", *NEW,
                                         "--min-freq", "100000"], "leaves no word", None),
    ("prepare-not-an-int", ["prepare", *PREP, "--text-file", "{w}/text.txt", *NEW,
                            "--min-freq", "x"], "invalid int value", None),
    ("parity-lr-nan", ["parity", "--lr", "nan", "--train-steps", "2"], "lr must be a finite", None),
    ("parity-seed-negative", ["parity", "--seed", "-1"], "seed must be >= 0", None),
    ("parity-batch-size-0", ["parity", "--batch-size", "0"], "must be at least 1", None),
    ("parity-weights-with-d-model", ["parity", "--weights", "{w}/run/weights.safetensors",
                                     "--d-model", "64"], "--d-model cannot be used with --weights",
     None),
    ("parity-weights-with-preset", ["parity", "--weights", "{w}/run/weights.safetensors",
                                    "--preset", "small"], "--preset cannot be used with --weights",
     None),
    ("parity-vocab-size-with-data", ["parity", "--data", "{w}/ds", "--vocab-size", "100"],
     "--vocab-size cannot be used with a dataset", None),
    ("parity-weights-nan", ["parity", "--weights", "{w}/nan.safetensors"], "NaN or Inf", None),
    ("parity-weights-header-list", ["parity", "--weights", "{w}/list.safetensors"],
     "not a readable safetensors file", None),
    ("parity-weights-seq-len-100k", ["parity", "--weights", "{w}/seq100k.safetensors"],
     "attention scores alone", None),
    ("parity-seq-len-100k", ["parity", "--seq-len", "100000"], "attention scores alone", None),
    ("parity-json-is-a-folder", ["parity", "--json", "{w}/ds"], "is a folder", None),
    ("train-lr-nan", ["train", *T, *NEW, "--lr", "nan"], "lr must be a finite number", None),
    ("train-lr-inf", ["train", *T, *NEW, "--lr", "inf"], "lr must be a finite number", None),
    ("train-lr-not-a-number", ["train", *T, *NEW, "--lr", "fast"], "invalid float value", None),
    ("train-grad-clip-nan", ["train", *T, *NEW, "--grad-clip", "nan"], "grad_clip must be a finite",
     None),
    ("train-min-lr-ratio-negative", ["train", *T, *NEW, "--min-lr-ratio", "-1"],
     "min_lr_ratio must be >= 0 and <= 1", None),
    ("train-weight-decay-negative", ["train", *T, *NEW, "--weight-decay", "-5"],
     "weight_decay must be >= 0", None),
    ("train-eval-batches-negative", ["train", *T, *NEW, "--eval-batches", "-1"],
     "eval_batches must be >= 0", None),
    ("train-eval-every-negative", ["train", *T, *NEW, "--eval-every", "-1"],
     "eval_every must be >= 0", None),
    ("train-checkpoint-every-negative", ["train", *T, *NEW, "--checkpoint-every", "-1"],
     "checkpoint_every must be >= 0", None),
    ("train-seed-negative", ["train", *T, *NEW, "--seed", "-1"], "seed must be >= 0", None),
    ("train-stop-at-past-steps", ["train", *T, *NEW, "--stop-at", "5"], "stop_at must be", None),
    ("train-dropout-nan", ["train", *T, *NEW, "--dropout", "nan"], "dropout must be a finite", None),
    ("parity-with-dropout", ["parity", "--preset", "tiny", "--dropout", "0.1"],
     "parity compares with dropout 0", None),
    ("parity-weights-and-untie", ["parity", "--weights", "{w}/gpt2.safetensors", "--no-tie-embeddings"],
     "--tie-embeddings cannot be used with --weights", None),
    ("train-seq-len-100k", ["train", *T, *NEW, "--seq-len", "100000"], "attention scores alone",
     None),
    ("train-vocab-size-with-data", ["train", *RUN, *NEW, "--vocab-size", "100"],
     "--vocab-size cannot be used with a dataset", None),
    ("train-device-with-flax", ["train", *T, *NEW, "--device", "cuda"],
     "--device sets the PyTorch trainer's device", None),
    ("train-torch-device-bogus", ["train", "--framework", "torch", *T, *NEW, "--device", "bogus"],
     "not a PyTorch device", None),
    ("train-val-split-too-small", ["train", "--preset", "tiny", "--data", "{w}/ds", "--steps", "2",
                                   "--batch-size", "32", *NEW], "the val split has", None),
    ("train-data-vocab-not-utf8", ["train", "--preset", "tiny", "--data", "{w}/dsbadvocab", *NEW],
     "is not valid UTF-8", None),
    ("train-out-is-a-file", ["train", *T, "--out", "{w}/text.txt"], "is a file", None),
    ("train-data-is-a-file", ["train", "--preset", "tiny", "--data", "{w}/text.txt", *NEW],
     "is a file, not a dataset folder", None),
    ("train-missing-out", ["train", "--preset", "tiny"], "the following arguments are required",
     None),
    ("train-resume-other-steps", ["train", *RUN, "--steps", "4", "--out", "{w}/run", "--resume"],
     "started with --steps 2, not 4", None),
    ("train-resume-config-empty", ["train", *RUN, "--out", "{w}/runempty", "--resume"],
     "has no 'framework' entry", None),
    ("compare-lr-nan", ["compare", *T, *NEW, "--lr", "nan"], "lr must be a finite number", None),
    ("compare-out-is-a-file", ["compare", *T, "--out", "{w}/text.txt"], "already exists", None),
    ("compare-eval-batches-negative", ["compare", *T, *NEW, "--eval-batches", "-1"],
     "eval_batches must be >= 0", None),
    ("eval-config-empty", ["eval", "--run", "{w}/runempty"], "has no 'framework' entry", None),
    ("eval-data-vocab-not-utf8", ["eval", "--run", "{w}/run", "--data", "{w}/dsbadvocab"],
     "is not valid UTF-8", None),
    ("eval-data-other-vocabulary", ["eval", "--run", "{w}/run", "--data", "{w}/dstiny"],
     "another vocabulary", None),
    ("eval-batch-too-big", ["eval", "--run", "{w}/run", "--batch-size", "100000"],
     "fewer than batch_size", None),
    ("eval-weights-nan", ["eval", "--run", "{w}/run"], "NaN or Inf", use_weights("nan.safetensors")),
    ("eval-data-prepared-again", ["eval", "--run", "{w}/run"], "has changed since", reprepare),
    ("generate-top-k-negative", ["generate", "--run", "{w}/run", "--top-k", "-1"],
     "top_k must be >= 0", None),
    ("generate-temperature-nan", ["generate", "--run", "{w}/run", "--temperature", "nan"],
     "temperature must be a finite", None),
    ("generate-temperature-inf", ["generate", "--run", "{w}/run", "--temperature", "inf"],
     "temperature must be a finite", None),
    ("generate-seed-negative", ["generate", "--run", "{w}/run", "--seed", "-1"], "seed must be",
     None),
    ("generate-config-empty", ["generate", "--run", "{w}/runempty"], "has no 'framework' entry",
     None),
    ("generate-data-other-vocabulary", ["generate", "--run", "{w}/run", "--data", "{w}/dstiny"],
     "another vocabulary", None),
    ("generate-weights-of-another-config", ["generate", "--run", "{w}/run"],
     "holds a model of config", use_weights("seq100k.safetensors")),
    ("generate-data-prepared-again", ["generate", "--run", "{w}/run"], "has changed since",
     reprepare),
    ("bench-variants-empty", ["bench", "--preset", "tiny", "--variants", "", "--json", "{w}/b.json",
                              "--plot", "{w}/b.png"], "no variant to run", None),
    ("bench-skip-all", ["bench", "--variants", "flax-jit-fp32", "--skip", "flax-jit-fp32"],
     "no variant to run", None),
    ("bench-warmup-negative", ["bench", "--preset", "tiny", "--warmup", "-1"], "warmup must be >= 0",
     None),
    ("bench-seq-len-100k", ["bench", "--preset", "tiny", "--seq-len", "100000"],
     "attention scores alone", None),
    ("bench-json-is-a-folder", ["bench", "--preset", "tiny", "--json", "{w}/ds"], "is a folder",
     None),
    ("bench-batch-size-not-a-number", ["bench", "--batch-size", "abc"],
     "--batch-size: expected a whole number, got 'abc'", None),
    ("bench-mesh-of-other-devices", ["bench", "--preset", "tiny", "--mesh", "fsdp=8"],
     "needs 8 devices, and there are 1", None),
    ("train-coordinator-without-port", ["train", *T, *NEW, "--mesh", "data=1", "--coordinator",
                                        "localhost"], "--coordinator takes HOST:PORT", None),
    ("train-num-processes-zero", ["train", *T, *NEW, "--mesh", "data=1", "--num-processes", "0"],
     "--num-processes must be at least 1", None),
    ("train-process-id-out-of-range", ["train", *T, *NEW, "--mesh", "data=1", "--num-processes",
                                       "2", "--process-id", "2"], "give 0 to 1", None),
    ("train-processes-need-mesh", ["train", *T, *NEW, "--coordinator", "127.0.0.1:1234",
                                   "--num-processes", "2", "--process-id", "0"],
     "need --mesh over the devices of all the processes", None),
    ("train-processes-are-flax", ["train", *T, *NEW, "--framework", "torch", "--distributed"],
     "join a multi-process JAX job, for the Flax trainer", None),
    ("compare-fsdp-on-one-rank", ["compare", *T, *NEW, "--fsdp"],
     "--fsdp shards over several ranks", None),
    ("bench-decode-device-bogus", ["bench-decode", "--preset", "tiny", "--device", "bogus"],
     "not a PyTorch device", None),
    ("bench-decode-json-is-a-folder", ["bench-decode", "--preset", "tiny", "--json", "{w}/ds"],
     "is a folder", None),
    ("bench-decode-plot-is-a-folder", ["bench-decode", "--preset", "tiny", "--plot", "{w}/ds"],
     "is a folder", None),
    ("bench-decode-seq-len", ["bench-decode", "--preset", "tiny", "--seq-len", "4"],
     "choose the lengths with --contexts", None),
    ("bench-decode-cannot-fit", ["bench-decode", "--preset", "gpt2-124m", "--batch-sizes", "100000"],
     "use smaller --contexts, --new-tokens or --batch-sizes", None),
    ("decode-parity-json-is-a-folder", ["decode-parity", "--run", "{w}/run", "--json", "{w}/ds"],
     "is a folder", None),
    # offline here: without huggingface_hub it says to install it, with it the download fails
    ("import-hf-no-such-folder", ["import-hf", "{w}/nope", "--out", "{w}/x.safetensors"],
     "is no folder here", None),
    ("import-hf-a-file", ["import-hf", "{w}/text.txt", "--out", "{w}/x.safetensors"],
     "is a file: pass the folder save_pretrained wrote", None),
    ("import-hf-no-weights", ["import-hf", "{w}/ds", "--out", "{w}/x.safetensors"],
     "has no config.json", None),
    ("import-hf-unknown-tensor", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "unknown checkpoint tensor 'h.0.attn.rotary'",
     hf_tensors(lambda s: s.update({"transformer.h.0.attn.rotary": np.zeros(3, np.float32)}))),
    ("import-hf-missing-tensor", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "the checkpoint has no 'h.1.mlp.c_fc.bias'",
     hf_tensors(lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))),
    ("import-hf-misshapen-tensor", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "'h.0.mlp.c_proj.weight' has shape [32, 128]",
     hf_tensors(lambda s: s.update({"transformer.h.0.mlp.c_proj.weight":
                                    s["transformer.h.0.mlp.c_proj.weight"].T.copy()}))),
    ("import-hf-reorder-and-upcast", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "sets reorder_and_upcast_attn=True", hf_config(reorder_and_upcast_attn=True)),
    ("import-hf-inverse-layer-idx", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "sets scale_attn_by_inverse_layer_idx=True", hf_config(scale_attn_by_inverse_layer_idx=True)),
    ("import-hf-erf-gelu", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "activation_function 'gelu' is not one", hf_config(activation_function="gelu")),
    ("import-hf-not-gpt2", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "model_type 'llama'", hf_config(model_type="llama")),
    ("import-hf-out-is-a-folder", ["import-hf", "{w}/hf", "--out", "{w}/ds"], "is a folder", None),
    ("import-hf-config-a-list", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "config.json holds a JSON list", lambda w: (w / "hf" / hf.CONFIG_FILE).write_text("[1]")),
    ("import-hf-eps-null", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "layer_norm_epsilon must be a number, got None", hf_config(layer_norm_epsilon=None)),
    ("import-hf-tie-a-string", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "tie_word_embeddings must be true or false, got 'false'", hf_config(tie_word_embeddings="false")),
    ("import-hf-unequal-dropouts", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "dropouts differ", hf_config(attn_pdrop=0.2)),
    ("import-hf-no-n-layer", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "lacks 'n_layer'", lambda w: hf_config()(w) or _drop_key(w / "hf" / hf.CONFIG_FILE, "n_layer")),
    ("import-hf-integer-tensor", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "tensor 'transformer.wte.weight' is I64, not floating point",
     hf_tensors(lambda s: s.update({"transformer.wte.weight": s["transformer.wte.weight"].astype(np.int64)}))),
    ("import-hf-tied-head-differs", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "lm_head.weight differs from wte.weight",
     hf_tensors(lambda s: s.update({"lm_head.weight": s["transformer.wte.weight"] + 1}))),
    ("import-hf-corrupt", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "not a readable safetensors file", lambda w: (w / "hf" / hf.SAFETENSORS_FILE).write_bytes(b"\x10\0\0\0\0\0\0\0{")),
    ("import-hf-index-not-a-map", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "cannot read", lambda w: (w / "hf" / hf.SAFETENSORS_INDEX).write_text('{"weight_map": [1]}')),
    ("import-hf-config-only", ["import-hf", "{w}/hf", "--out", "{w}/x.safetensors"],
     "has no model.safetensors", lambda w: (w / "hf" / hf.SAFETENSORS_FILE).unlink()),
    ("export-hf-article-model", ["export-hf", "{w}/run", "--out", "{w}/out"],
     "GPT-2 has pre-norm blocks and learned positions", None),
    ("export-hf-exists", ["export-hf", "{w}/gpt2.safetensors", "--out", "{w}/ds"],
     "exists: choose another --out, or pass --force", None),
    ("export-hf-force-on-a-dataset", ["export-hf", "{w}/gpt2.safetensors", "--out", "{w}/ds", "--force"],
     "is not a Hugging Face export", None),
    ("export-hf-force-on-its-source", ["export-hf", "{w}/run", "--out", "{w}", "--force"],
     "holds the weights being exported", None),
    ("export-hf-out-a-file", ["export-hf", "{w}/gpt2.safetensors", "--out", "{w}/text.txt", "--force"],
     "is a file", None),
]
IN_OWN_PROCESS = ["prepare-not-an-int", "train-lr-nan", "parity-weights-nan", "generate-top-k-negative"]


def files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.name != runfolder.LOCK}


def snapshot(w):
    return {p: (w / p).read_bytes() for p in files(w) if (w / p).is_file()}


def copy_workspace(workspace, w, setup):
    """A case's own copy, with what it holds before the command."""
    shutil.copytree(workspace, w)
    for run in ("run", "runempty"):  # the copy's own dataset (the record holds a resolved path)
        record = json.loads((w / run / runfolder.CONFIG).read_text())
        if "data" in record:
            record["data"]["path"] = str(w / "ds")
            (w / run / runfolder.CONFIG).write_text(json.dumps(record))
    if setup:
        setup(w)
    return snapshot(w)


def problems(result, message, before, after):
    """What is wrong with one refusal (empty: nothing)."""
    lines = result.stderr.strip().splitlines()
    found = []
    if result.returncode != 2:
        found.append(f"exit {result.returncode}")
    if len(lines) != 1 or "Traceback" in result.stderr:
        found.append(f"{len(lines)} lines on stderr")
    elif message not in lines[0]:
        found.append(f"says {lines[0]!r}")
    if after != before:
        found.append("changed or left files")
    return found


def test_every_bad_input_is_one_line_and_leaves_nothing(workspace, tmp_path):
    assert len({c[0] for c in CASES}) == len(CASES)
    befores = [copy_workspace(workspace, tmp_path / name, setup) for name, _, _, setup in CASES]
    results = run_cli_many(*[[a.replace("{w}", str(tmp_path / name)) for a in args]
                             for name, args, _, _ in CASES])
    failed = {}
    for (name, _, message, _), before, result in zip(CASES, befores, results):
        found = problems(result, message, before, snapshot(tmp_path / name))
        if found:
            failed[name] = (found, result.stderr[-500:])
    assert not failed, failed


@pytest.mark.parametrize("name", IN_OWN_PROCESS)
def test_bad_input_in_a_process_of_its_own(workspace, tmp_path, name):
    _, args, message, setup = next(c for c in CASES if c[0] == name)
    w = tmp_path / "w"
    before = copy_workspace(workspace, w, setup)
    result = run_cli(*[a.replace("{w}", str(w)) for a in args])
    assert not problems(result, message, before, snapshot(w)), result.stdout + result.stderr
