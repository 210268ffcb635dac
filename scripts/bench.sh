#!/usr/bin/env bash
# Writes BENCHMARKS.md: (1) fine-tuning throughput of the engine's loop against a plain
# PyTorch loop over the same TorchScript model, data, batch size and thread count;
# (2) the defense on the demo's BadNets MNIST models over several seeds, with the
# regularizer ablations. Run it on an otherwise idle machine: `make bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SEEDS=${BENCH_SEEDS:-"0 1 2 3 4"}
OUT=${BENCH_OUT:-BENCHMARKS.md}
# The dev profile (our crate at opt-level 1, dependencies at 2) is what the suite and
# `make run` build; the tensor work happens in libtorch either way.
cargo build --example finetune_bench --bin bdscan
BIN=target/debug
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

model=tests/fixtures/models/mnist_cnn_bn.pt
{
  echo "# Benchmarks"
  echo
  echo "Produced by \`make bench\` (scripts/bench.sh) at commit $(git rev-parse --short HEAD) on $(date -u +%Y-%m-%d),"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), CPU only, libtorch from torch==2.13.0."
  echo
  echo "## Fine-tuning loop throughput"
  echo
  echo "The engine's \`fine_tune\` loop (examples/finetune_bench.rs) against a plain PyTorch loop"
  echo "(benches/finetune_python.py): same TorchScript model ($model), first 4,096 fixture digits,"
  echo "batch 64, SGD momentum 0.9, 3 epochs after one warm-up epoch; best of 3 runs each."
  echo
  echo "| threads | bdscan samples/s | PyTorch samples/s | ratio |"
  echo "|---|---|---|---|"
} > "$tmp/head.md"

best() { sort -n | tail -1; }
rows=""
parts=${BENCH_PARTS:-"throughput defense"}
[[ $parts == *throughput* ]] && for threads in 1 2; do
  rust=$(for i in 1 2 3; do $BIN/examples/finetune_bench $model 4096 64 $threads 3 | $PY -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])'; done | best)
  py=$(for i in 1 2 3; do $PY benches/finetune_python.py $model 4096 64 $threads 3 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])'; done | best)
  ratio=$($PY -c "print(f'{$rust/$py:.2f}x')")
  rows+="| $threads | $rust | $py | $ratio |"$'\n'
done

defense_rows=""
run_demo() { # arch label config-json
  local arch=$1 label=$2 cfg=$3
  echo "$cfg" > "$tmp/cfg.json"
  for seed in $SEEDS; do
    $BIN/bdscan demo --arch "$arch" --threads "$(nproc)" --seed "$seed" --config "$tmp/cfg.json" --work-dir "$tmp/run" >/dev/null 2>&1
    $PY - "$tmp/run/report.json" "$arch" "$label" "$seed" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1])); b, a = r["metrics"]["before"], r["metrics"]["after"]
t = sum(r["timings_ms"].values()) / 1000
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{sys.argv[4]}\t{b['clean_acc']*100:.2f}\t{b['asr']*100:.2f}\t{a['clean_acc']*100:.2f}\t{a['asr']*100:.2f}\t{a['ra']*100:.2f}\t{r['der']:.4f}\t{t:.1f}")
PYEOF
  done
}
[[ $parts == *defense* ]] && {
  run_demo cnn-bn "AR (default)" '{}'
  run_demo cnn-bn "L1" '{"regularizer": "l1"}'
  run_demo cnn-bn "L2" '{"regularizer": "l2"}'
  run_demo cnn-bn "no penalty" '{"regularizer": "none"}'
  run_demo cnn-bn "AR, no distillation" '{"distill_weight": 0}'
  run_demo cnn-bn "AR, no augmentation" '{"augment_shift": 0}'
  run_demo cnn "AR (default)" '{}'
} > "$tmp/defense.tsv"

{
  cat "$tmp/head.md"
  printf '%s' "$rows"
  echo
  echo "## Defense on BadNets MNIST (bdscan demo)"
  echo
  echo "Each row: a BadNets model (3×3 patch, target 0, 10% poison) trained by the lab on 8,000 fixture"
  echo "digits with the given seed, scanned with 400 clean digits; accuracy on 1,600 test digits, ASR/RA"
  echo "on their triggered non-target digits. Only the clean bundle steers the scan. Mean ± std over seeds $SEEDS."
  echo
  echo "| model | variant | C-Acc before | ASR before | C-Acc after | ASR after | RA after | DER | wall s |"
  echo "|---|---|---|---|---|---|---|---|---|"
  $PY - "$tmp/defense.tsv" <<'PYEOF'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
groups = {}
for r in rows:
    groups.setdefault((r[0], r[1]), []).append([float(x) for x in r[3:]])
for (arch, label), vals in groups.items():
    cols = list(zip(*vals))
    cell = lambda c, d=2: f"{st.mean(c):.{d}f} ± {st.pstdev(c):.{d}f}"
    print(f"| {arch} | {label} | {cell(cols[0])} | {cell(cols[1])} | {cell(cols[2])} | {cell(cols[3])} | {cell(cols[4])} | {cell(cols[5], 4)} | {st.mean(cols[6]):.1f} |")
print()
print("Per seed (model, variant, seed, C-Acc before, ASR before, C-Acc after, ASR after, RA after, DER, wall s):")
print()
print("```")
for r in rows:
    print("  ".join(r))
print("```")
PYEOF
} > "$OUT"
if [[ $parts == *defense* && $parts == *throughput* ]] || [[ $parts == *service* ]]; then
  echo >> "$OUT"
  scripts/service_bench.sh >> "$OUT"
fi
echo "wrote $OUT"
