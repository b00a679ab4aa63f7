#!/usr/bin/env bash
# The project's checks on one accelerator, in one command, from a plain checkout:
#
#   scripts/gpu_check.sh [--out DIR]            # on a GPU machine
#   scripts/gpu_check.sh --device cpu --out DIR # the smoke mode: the same commands, tiny shapes
#   scripts/gpu_check.sh --checks bench         # some of the checks: parity, compare, bench, decode
#
# It needs a Python with torch, jax and flax already installed (nothing is installed, nothing
# is downloaded, torchtext is not needed): the checkout is put on PYTHONPATH. It runs
#   1. parity at highest, default (TF32 on a GPU) and bf16, for `tiny` and `gpt2-124m`
#      (the smoke mode: `tiny` at highest only: the same command line), and float64 for `tiny`;
#      GPT-2 itself (`gpt2`) at highest and bf16 (on a GPU only);
#   2. fused attention against explicit, through parity at highest for both presets;
#   3. a short `compare` of the two trainers on synthetic tokens, judged against PyTorch's own
#      noise floor (`small`; smoke: `tiny`);
#   4. `bench --preset gpt2-124m` and `--preset gpt2` with every variant (smoke: `tiny`,
#      Flax jax.jit and PyTorch eager fp32: torch.compile compiles for minutes on a CPU,
#      and PyTorch bf16 ran for over 5 minutes on `tiny` on a CPU without native bf16);
#   5. `bench-decode --preset gpt2` with every variant, beside the measured memory bandwidth
#      (smoke: `tiny`, Flax's loop and PyTorch eager);
# and writes every JSON and PNG into DIR (default benchmarks/results/gpu_check), then prints a
# summary, one line per file. The exit status is 1 if any check failed, after all have run: a
# bench variant that crashed fails (one that cannot run here, e.g. without torch.compile, is
# skipped, with its reason).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
device=cuda
out="$repo/benchmarks/results/gpu_check"
checks=parity,compare,bench,decode
usage="pass --device cuda|cpu, --out DIR and --checks parity,compare,bench,decode"
while [ $# -gt 0 ]; do
  case "$1" in
    --device|--out|--checks)
      [ $# -ge 2 ] || { echo "gpu_check.sh: $1 needs a value: $usage" >&2; exit 2; }
      case "$1" in --device) device=$2 ;; --out) out=$2 ;; *) checks=$2 ;; esac
      shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1': $usage" >&2; exit 2 ;;
  esac
done
case "$device" in
  cuda|cpu) ;;
  *) echo "gpu_check.sh: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;;
esac
IFS=, read -ra chosen <<< "$checks"
[ ${#chosen[@]} -gt 0 ] || {
  echo "gpu_check.sh: --checks needs at least one of parity, compare, bench, decode" >&2; exit 2; }
for c in "${chosen[@]}"; do
  case "$c" in
    parity|compare|bench|decode) ;;
    *) echo "gpu_check.sh: --checks takes parity, compare, bench and decode, comma-separated; got '$c'" >&2
       exit 2 ;;
  esac
done
wanted() { [[ ",$checks," == *",$1,"* ]]; }
[ -n "$out" ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ "$device" = cpu ]; then
  export JAX_PLATFORMS=cpu  # JAX's device follows the PyTorch one
  presets=(tiny); precisions=(highest); gpt2_presets=(); compare_preset=tiny; train_steps=1
  compare_steps=2
  bench=(--preset tiny --batch-size 2 --warmup 1 --steps 1 --rounds 1
         --variants flax-jit-fp32,torch-eager-fp32)
  decode=(--preset tiny --batch-sizes 1 --contexts 4 --new-tokens 2 --rounds 1
          --variants flax-loop-fp32,torch-eager-fp32)
else
  python - <<'EOF' || exit 2
import sys

import jax
import torch

problems = [f"{name} sees no GPU" for name, ok in
            (("torch", torch.cuda.is_available()), ("jax", jax.default_backend() == "gpu")) if not ok]
if problems:
    sys.exit(f"gpu_check.sh: {' and '.join(problems)}: run with --device cpu for the smoke mode")
EOF
  presets=(tiny gpt2-124m); precisions=(highest default bf16); gpt2_presets=(gpt2)
  compare_preset=small; train_steps=50; big_steps=10
  compare_steps=200
  bench=(--preset gpt2-124m)
  decode=(--preset gpt2 --batch-sizes 1,8 --contexts 128 --new-tokens 64 --rounds 3)
fi

mkdir -p "$out" || exit 2
failed=()
check() {  # check NAME COMMAND...: run one flax-gpt command, keep going if it fails
  local name=$1; shift
  echo "== $name: flax-gpt $*"
  python -m flax_gpt "$@" || failed+=("$name")
}

if wanted parity; then
  for preset in "${presets[@]}"; do
    steps=$([ "$preset" = tiny ] && echo "$train_steps" || echo "$big_steps")
    for precision in "${precisions[@]}"; do
      check "parity-$preset-$precision" parity --preset "$preset" --precision "$precision" \
        --train-steps "$steps" --torch-device "$device" --json "$out/parity_${preset}_$precision.json"
    done
    check "parity-$preset-fused" parity --preset "$preset" --attention fused --precision highest \
      --train-steps "$steps" --torch-device "$device" --json "$out/parity_${preset}_fused.json"
  done
  for preset in "${gpt2_presets[@]}"; do
    for precision in highest bf16; do
      check "parity-$preset-$precision" parity --preset "$preset" --precision "$precision" \
        --train-steps "$big_steps" --torch-device "$device" --json "$out/parity_${preset}_$precision.json"
    done
  done
  check parity-tiny-float64 parity --preset tiny --precision float64 --train-steps "$train_steps" \
    --torch-device "$device" --json "$out/parity_tiny_float64.json"
fi
if wanted compare; then
  check "compare-$compare_preset" compare --preset "$compare_preset" --synthetic \
    --steps "$compare_steps" --eval-every 0 --noise-floor --device "$device" \
    --out "$out/compare_$compare_preset"
fi
if wanted bench; then  # exits 1 when a variant crashed
  check "bench-${bench[1]}" bench "${bench[@]}" --device "$device" \
    --json "$out/bench_${bench[1]}.json" --plot "$out/bench_${bench[1]}.png"
  for preset in "${gpt2_presets[@]}"; do
    check "bench-$preset" bench --preset "$preset" --device "$device" \
      --json "$out/bench_$preset.json" --plot "$out/bench_$preset.png"
  done
fi
if wanted decode; then
  check "bench-decode-${decode[1]}" bench-decode "${decode[@]}" --device "$device" \
    --json "$out/bench_decode_${decode[1]}.json" --plot "$out/bench_decode_${decode[1]}.png"
fi

python - "$out" <<'EOF' || failed+=(summary)
import json
import sys
from pathlib import Path

print(f"\nsummary ({sys.argv[1]}):")
for path in sorted(Path(sys.argv[1]).rglob("*.json")):
    d = json.loads(path.read_text())
    if "rows" in d:  # parity
        failed = [r["quantity"] for r in d["rows"] if r.get("passed") is False]
        line = "passed" if d["passed"] else f"FAILED: {', '.join(failed)}"
        print(f"  {path.name}: {d['precision']} on {d['jax_device']} / {d['torch_device']}: {line}")
    elif "results" in d:  # bench: a variant that could not run is skipped, one that raised crashed
        rates = ", ".join(f"{r['variant']} {'CRASHED' if r.get('crashed') else 'skipped'} "
                          f"({r['skipped']})" if "skipped" in r else
                          f"{r['variant']} {r['tokens_per_s']:,.0f} tok/s "
                          f"({'-' if r.get('mfu') is None else format(r['mfu'], '.0%')} MFU)"
                          for r in d["results"])
        print(f"  {path.name}: {rates}")
    elif "shapes" in d:  # bench-decode
        for shape in d["shapes"]:
            rates = ", ".join(f"{r['variant']} skipped ({r['skipped']})" if "skipped" in r else
                              f"{r['variant']} {r['decode_tokens_per_s']:,.0f} tok/s "
                              f"({r['bandwidth_fraction']:.0%} of bandwidth)" for r in shape["results"])
            print(f"  {path.name}: batch {shape['batch_size']}: {rates}")
    elif "frameworks" in d:  # compare
        verdict = {True: "within", False: "NOT within", None: "not judged"}[
            d.get("judgement", {}).get("passed")]
        print(f"  {path.relative_to(sys.argv[1])}: max |loss diff| {d['max_abs_loss_diff']:.2e} "
              f"over {d['steps']} steps, {verdict} the noise floor")
EOF
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
echo "every check passed"
