#!/usr/bin/env bash
# The CUDA path on a machine with an NVIDIA GPU, in one pass (a few minutes on an H100):
#   1. the CLI scan on cuda:0 (`bdscan demo --device cuda:0`: lab-trained BadNets CNN),
#      then the same model and bundles scanned on the CPU, for results and time;
#      then two scans on cuda:0 that run every purification twice (the dip retry and its
#      scratch archive, loaded back on the GPU);
#   2. the service's worker on a cuda:0 slot (`serve --devices cuda:0`, SQLite, one
#      multipart scan over loopback HTTP, its report fetched);
#   3. fine-tuning throughput of the engine's loop against plain PyTorch, on cuda:0 and
#      on the CPU;
#   4. with GPU_PARTS=grid instead (its own run: it takes longer), the quick defense grid
#      (benches/defense_grid.py --quick) with every scan on cuda:0.
#
#   scripts/gpu-check.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds `bdscan` and `finetune_bench`, built against the same libtorch version as
# the machine's `python3` has (its torch/lib and nvidia/*/lib go on LD_LIBRARY_PATH), which
# is also the PyTorch that loads the purified model and runs the reference loop.
set -uo pipefail
BIN=$(realpath "$1"); OUT=$(realpath "$2")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
# Times in ms from `date +%s%N` (`bc` is not on every image). GPU_DEVICE (default cuda:0)
# names the device under test; GPU_DEVICE=cpu checks this script itself on a CPU machine.
GPU=${GPU_DEVICE:-cuda:0}

nvidia-smi -L 2>&1 | tee -a "$OUT/summary.txt"
site=$($PY -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
log "python3 torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')"
libs="$site/torch/lib"
for d in "$site"/nvidia/*/lib; do [[ -d $d ]] && libs+=":$d"; done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# tch reads libtorch's tensors through its own headers: a libtorch of another version
# at run time gives wrong sizes (seen: 2.13 binaries on 2.11 libraries), so stop there.
built=$("$BIN/bdscan" --version 2>&1 | sed -n 's/.*(libtorch \(.*\))$/\1/p')
have=$($PY -c 'import torch; print(torch.__version__)')
if [[ -z $built || ${built%%+*} != "${have%%+*}" ]]; then
  log "bdscan was built for libtorch '$built' but $PY has $have: build it against that one (README, GPU)"
  exit 1
fi
"$BIN/bdscan" --version >"$OUT/load.txt" 2>&1
log "$(cat "$OUT/load.txt")"

work=$(mktemp -d)
if [[ ${GPU_PARTS:-} == grid ]]; then
  log "4. quick defense grid, scans on $GPU, 4 at a time"
  start=$(date +%s%N)
  $PY benches/defense_grid.py --bin "$BIN/bdscan" --quick --device "$GPU" --jobs 4 --work "$work/grid" \
    --out-md "$OUT/grid.md" --out-json "$OUT/grid.json" --svg "$OUT/grid.svg" >"$OUT/grid.log" 2>&1
  log "grid exit $? in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  rm -rf "$work"
  exit 0
fi
log "1. demo on $GPU"
start=$(date +%s%N)
timeout 300 "$BIN/bdscan" demo --device $GPU --work-dir "$work/demo" >"$OUT/demo-cuda.txt" 2>&1
log "exit $? in $(( ($(date +%s%N) - start) / 1000000 )) ms; $(tail -n 15 "$OUT/demo-cuda.txt")"
dir=$work/demo
if [[ -f $dir/backdoored.pt ]]; then
  target=0  # the demo's BadNets target
  for dev in $GPU cpu; do
    start=$(date +%s%N)
    timeout 600 "$BIN/bdscan" scan --model "$dir/backdoored.pt" --clean "$dir/clean.safetensors" \
      --test "$dir/test.safetensors" --poison "$dir/poison.safetensors" --target-label "$target" \
      --device "$dev" --seed 0 --out "$work/p-$dev.pt" --report "$OUT/report-${dev/:/}.json" \
      >"$OUT/scan-${dev/:/}.txt" 2>&1
    code=$?
    log "scan on $dev: exit $code in $(( ($(date +%s%N) - start) / 1000000 )) ms; $($PY -c "
import json; r = json.load(open('$OUT/report-${dev/:/}.json'))
b, a = r['metrics']['before'], r['metrics']['after']
print('acc %.4f -> %.4f, asr %.4f -> %.4f, der %s, timings_ms %s' % (b['clean_acc'], a['clean_acc'], b['asr'], a['asr'], r['der'], r['timings_ms']))" 2>&1)"
  done
  # The artifact must load in PyTorch unchanged, on the GPU too.
  log "purified model in PyTorch: $($PY -c "
import torch; m = torch.jit.load('$work/p-$GPU.pt', map_location='$GPU')
print('loads on', next(m.parameters()).device)" 2>&1 | tail -1)"
  # The dip retry sets a purified model aside in a scratch archive and may load it back on
  # the scan's device. A retry threshold below zero makes every purification run twice:
  # at 0.05 the half-rate attempt usually wins; at 1e-6 both end alike and the first is
  # loaded back from its archive.
  for lr in 0.05 1e-6; do
    printf '{"purify_epochs": 1, "purify_lr": %s, "recovery_epochs": 1, "purify_retry_drop": -1}' $lr >"$work/retry.json"
    start=$(date +%s%N)
    timeout 300 "$BIN/bdscan" scan --model "$dir/backdoored.pt" --clean "$dir/clean.safetensors" \
      --test "$dir/test.safetensors" --poison "$dir/poison.safetensors" --target-label "$target" \
      --device $GPU --seed 0 --config "$work/retry.json" --out "$work/retry-$lr.pt" \
      --report "$OUT/report-retry-$lr.json" >"$OUT/scan-retry-$lr.txt" 2>&1
    log "retry scan at lr $lr on $GPU: exit $? in $(( ($(date +%s%N) - start) / 1000000 )) ms; $($PY -c "
import json; r = json.load(open('$OUT/report-retry-$lr.json'))
print('asr after', r['metrics']['after']['asr'], 'acc after', r['metrics']['after']['clean_acc'], [w for w in r['warnings'] if 'tried again' in w])" 2>&1)"
    log "its purified model in PyTorch: $($PY -c "
import torch; m = torch.jit.load('$work/retry-$lr.pt', map_location='$GPU')
print('loads on', next(m.parameters()).device)" 2>&1 | tail -1)"
  done
else
  log "demo left no model in $dir: $(ls "$dir" 2>&1)"
fi

log "2. serve with one $GPU slot"
port=18080
"$BIN/bdscan" serve --listen 127.0.0.1:$port --data-dir "$work/srv" --devices $GPU >"$OUT/serve.txt" 2>&1 &
server=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:$port/readyz >/dev/null && break; sleep 0.2; done
if [[ -f $dir/backdoored.pt ]]; then
  start=$(date +%s%N)
  curl -s -F model=@"$dir/backdoored.pt" -F clean=@"$dir/clean.safetensors" -F test=@"$dir/test.safetensors" \
    -F poison=@"$dir/poison.safetensors" -F target_label="$target" -F "config={\"device\":\"$GPU\",\"seed\":0}" \
    "http://127.0.0.1:$port/v1/scans?wait=600" >"$OUT/job.json"
  log "job answered in $(( ($(date +%s%N) - start) / 1000000 )) ms: $($PY -c "
import json; j = json.load(open('$OUT/job.json'))
print(j.get('state'), j.get('device'), j.get('error'), j.get('timings_ms') or j.get('timings'))" 2>&1)"
  id=$($PY -c "import json; print(json.load(open('$OUT/job.json'))['id'])" 2>/dev/null)
  curl -s "http://127.0.0.1:$port/v1/jobs/$id/report" >"$OUT/job-report.json"
  log "job report: $($PY -c "
import json; r = json.load(open('$OUT/job-report.json'))
print('device', r['config']['device'], 'asr after', r['metrics']['after']['asr'], 'der', r['der'])" 2>&1)"
fi
kill $server; wait $server 2>/dev/null

log "3. fine-tuning throughput (mnist_cnn_bn, 4,096 digits, batch 64, 3 epochs; best of 3)"
model=tests/fixtures/models/mnist_cnn_bn.pt
for dev in $GPU cpu; do
  for threads in 1 16; do
    [[ $dev == "$GPU" && $threads == 16 ]] && continue
    rust=$(for i in 1 2 3; do "$BIN/finetune_bench" $model 4096 64 $threads 3 $dev 2>>"$OUT/throughput.err" | $PY -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])'; done | sort -n | tail -1)
    py=$(for i in 1 2 3; do $PY benches/finetune_python.py $model 4096 64 $threads 3 $dev 2>>"$OUT/throughput.err" | $PY -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])'; done | sort -n | tail -1)
    log "$dev threads $threads: bdscan $rust samples/s, PyTorch $py samples/s"
  done
done
rm -rf "$work"
