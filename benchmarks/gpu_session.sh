#!/usr/bin/env bash
# The GPU checks of benchmarks/RESULTS.md in one call, for a lent GPU machine with torch preinstalled and no
# network: run from the repository root. Logs go to $OUT (or ./gpu_logs). Each step has its own time limit so
# one slow step cannot eat the others; a step that fails or times out is reported and the next one runs.
#   bash benchmarks/gpu_session.sh [STEP ...]      # steps: env tests one sweep compile augment whole
#     default: env tests one sweep compile. `whole` (up to 540 s; it prints its device and versions) takes
#     a lent machine's call of its own: bash benchmarks/gpu_session.sh whole
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS="${OUT:-gpu_logs}"
mkdir -p "$LOGS"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env tests one sweep compile)

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | grep -E "device:|data path|prefix cache|precision|img/s|speedup|stage:|total:|passed|failed|error|Error" 
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
}

for s in "${STEPS[@]}"; do
  case $s in
    env) step env 60 bash -c 'nvidia-smi; lscpu | grep -E "Model name|^CPU\(s\)"; lscpu | grep -o -E "avx2|avx512f|avx512_bf16|amx_bf16" | sort -u | tr "\n" " "; echo;
            python3 -c "import torch, timm, torchvision; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"timm\", timm.__version__, \"torchvision\", torchvision.__version__, torch.cuda.get_device_name())"' ;;
    tests) step tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider ;;
    one) step one 150 python3 benchmarks/train_speed.py --data /tmp/soup_bench_vitb ;;
    sweep) step sweep 420 python3 benchmarks/train_speed.py --sweep 8 --data /tmp/soup_bench_vitb ;;
    compile) step compile 200 python3 benchmarks/train_speed.py --sweep 8 --compile --data /tmp/soup_bench_vitb ;;
    augment) step augment 200 python3 benchmarks/train_speed.py --augment randaugment --data /tmp/soup_bench_vitb ;;
    # The whole study at the reference recipe's shape (ViT-B/14, 224 px, freeze 0.75, bf16, 8 ingredients, 500
    # classes, 10 epochs): soup's train/cook --greedy/eval --ensemble/submit vs the seed-style loop, which
    # trains 2 of the 8 for real (its cost is linear; the rest is estimated, and the output says so).
    whole) step whole 540 python3 benchmarks/whole_study.py --seed-ingredients 2 --data /tmp/soup_study_vitb \
             --json "$LOGS/whole_study.json" ;;
    *) echo "unknown step $s" ;;
  esac
done
