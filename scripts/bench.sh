#!/usr/bin/env bash
# Writes BENCHMARKS.md: (1) fine-tuning throughput of the engine's loop against a plain
# PyTorch loop over the same TorchScript model, data, batch size and thread count;
# (2) the defense grid (benches/defense_grid.py): lab-trained backdoored models x every
# defense over 3 seeds, with the AR/L1/L2 epoch plot; (3) the service benchmark.
# Run it on an otherwise idle machine: `make bench` (37–45 minutes on a 2-core AMD EPYC), or
# `make bench-quick` (scripts/bench.sh --quick: a grid subset, one seed, 2–5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${BENCH_OUT:-BENCHMARKS.md}
# The dev profile (our crate at opt-level 1, dependencies at 2) is what the suite and
# `make run` build; the tensor work happens in libtorch either way.
cargo build --example finetune_bench --bin bdscan
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Run a copy, so that rebuilding while a long bench runs cannot swap the binary under it.
mkdir -p "$tmp/bin/examples"
cp target/debug/bdscan "$tmp/bin/" && cp target/debug/examples/finetune_bench "$tmp/bin/examples/"
BIN=$tmp/bin

model=tests/fixtures/models/mnist_cnn_bn.pt
MAKE_TARGET="make bench"
[[ ${1:-} == --quick ]] && MAKE_TARGET="make bench-quick"
{
  echo "# Benchmarks"
  echo
  echo "Produced by \`$MAKE_TARGET\` (scripts/bench.sh) at commit $(git rev-parse --short HEAD) on $(date -u +%Y-%m-%d),"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), CPU only, libtorch from torch==2.13.0."
  echo
} > "$tmp/head.md"
{
  echo "## Fine-tuning loop throughput"
  echo
  echo "The engine's \`fine_tune\` loop (examples/finetune_bench.rs) against a plain PyTorch loop"
  echo "(benches/finetune_python.py): same TorchScript model ($model), first 4,096 fixture digits,"
  echo "batch 64, SGD momentum 0.9, 3 epochs after one warm-up epoch; best of 3 runs each."
  echo "bdscan feeds the images laid out channels-last (README, Inputs); the PyTorch loop feeds"
  echo "them as stored."
  echo "bdscan also keeps freed memory in the process (README, Inputs); the PyTorch loop runs"
  echo "on glibc's defaults."
  echo
  echo "| threads | bdscan samples/s | PyTorch samples/s | ratio |"
  echo "|---|---|---|---|"
} > "$tmp/throughput-head.md"

best() { sort -n | tail -1; }
rows=""
# `--quick`: the 10-minute subset of the defense grid only, written to BENCHMARKS-quick.md.
if [[ ${1:-} == --quick ]]; then
  parts=${BENCH_PARTS:-"grid"}; OUT=${BENCH_OUT:-BENCHMARKS-quick.md}; GRID_ARGS="--quick"; SUFFIX="-quick"
  GRID_CMD="make bench-quick"
else
  parts=${BENCH_PARTS:-"throughput grid service"}; GRID_ARGS=""; SUFFIX=""; GRID_CMD="make bench"
fi
[[ -n ${BENCH_SEEDS:-} ]] && GRID_ARGS+=" --seeds $BENCH_SEEDS"
[[ $parts == *throughput* ]] && for threads in 1 2; do
  rust=$(for i in 1 2 3; do $BIN/examples/finetune_bench $model 4096 64 $threads 3 | $PY -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])'; done | best)
  py=$(for i in 1 2 3; do $PY benches/finetune_python.py $model 4096 64 $threads 3 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])'; done | best)
  ratio=$($PY -c "print(f'{$rust/$py:.2f}x')")
  rows+="| $threads | $rust | $py | $ratio |"$'\n'
done

[[ $parts == *grid* ]] && {
  mkdir -p benches/results
  $PY benches/defense_grid.py --bin $BIN/bdscan --work "$tmp/grid" --out-md "$tmp/grid.md" \
    --out-json benches/results/grid$SUFFIX.json --svg benches/results/ar_vs_l1_l2$SUFFIX.svg \
    --svg-link benches/results/ar_vs_l1_l2$SUFFIX.svg $GRID_ARGS
}

{
  cat "$tmp/head.md"
  if [[ -n $rows ]]; then cat "$tmp/throughput-head.md"; printf '%s' "$rows"; echo; fi
  echo "## Defenses: attacks × architectures × defenses"
  echo
  echo "Command: \`$GRID_CMD\`. Every model is trained by \`bdscan lab\` (the attack lab) and"
  echo "every defense runs through \`bdscan scan --method ...\` with its paper's defaults."
  echo
  [[ -f $tmp/grid.md ]] && cat "$tmp/grid.md"
} > "$OUT"
if [[ $parts == *service* ]]; then
  echo >> "$OUT"
  scripts/service_bench.sh >> "$OUT"
fi
echo "wrote $OUT"
