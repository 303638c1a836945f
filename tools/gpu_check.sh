#!/usr/bin/env bash
# The GPU check, in two calls, for one machine with one CUDA GPU and no network (an H200, 16 cores, whose
# python3 already holds torch, numpy, pillow, tqdm, tokenizers, pytest and ninja):
#
#     bash tools/gpu_check.sh 1 DEST   # environment, build, GPU tests, bench: about 3 minutes
#     bash tools/gpu_check.sh 2 DEST   # replay --preset small on each attention path, the one-seed study
#
# With the device tool: run `bash tools/gpu_check.sh 1 $OUT` with timeout_s 420; read gpu-check-1.tar.gz;
# fix on the CPU what failed; then run `bash tools/gpu_check.sh 2 $OUT` with timeout_s 480. Each call leaves
# one archive, DEST/gpu-check-N.tar.gz: every log, steps.txt, summary.txt and the runs' results, without
# checkpoints. Work goes to runs/gpu-check/callN (a rerun of call 2 reuses the runs that finished; the
# study resumes), base models to runs/gpu-check/cache. PYTHON (default python3) picks the interpreter.
#
# Every step runs under its own timeout, logs to callN/<step>.log and prints one line: its exit code, its
# seconds, and the last line of its log. A failed build stops the steps that need the kernel. Without a GPU
# every step fails within seconds, each in one line (the whole call, on a 2-core CPU: under a minute).
# Without a GPU the call stops after the env step; DRY_RUN=1 runs every step anyway, to check just that.
#
# Timeouts, in seconds. No GPU has run this yet: each is about twice the time expected, where that is known
# from something measured, and the summary prints each step's time beside its timeout for the next sizing.
#   env       60  torch's import and the CUDA driver's start, measured over 15 s on a cold machine
#   build    240  nvcc on attention.cu: 57 s for `nvcc -c` on the 2-core CPU; ninja and the link on top
#   tests    300  pytest -k gpu, alone and verbose: 60 kernel checks, two short training runs and a
#                 torch.compile run (inductor's first compile: a minute or two)
#   bench    120  three paths x 2 dtypes x 3 lengths, then the presets' shapes, 13 timed calls each
#   paths    240  (call 2) replay --preset small with --attn auto, cuda and manual, side by side: each a
#                 base of 2000 steps and 8 tasks of 300 at batch 64, about 4400 launch-bound steps
#   study    420  (call 2) every strategy from both bases, one seed, 8 runs at a time on the one GPU
set -u

PY=${PYTHON:-python3}
CALL=${1:-}
DEST=${2:-}
if [ "$CALL" != 1 ] && [ "$CALL" != 2 ] || [ -z "$DEST" ]; then
  echo "usage: bash tools/gpu_check.sh 1|2 DEST   (DEST: where the archive gpu-check-N.tar.gz goes)" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd)
cd "$ROOT" || exit 2
TOP=${GPU_CHECK_WORK:-runs/gpu-check}  # tests/test_layout.py points it at a temporary folder
WORK=$TOP/call$CALL
CACHE=$TOP/cache
mkdir -p "$WORK" "$CACHE"
rm -f "$WORK/steps.txt"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 PY WORK CACHE
LOCK=build/attention/lock

step() {  # step NAME TIMEOUT FUNCTION: run it under the timeout into WORK/NAME.log; one line of outcome
  local name=$1 limit=$2 start=$SECONDS rc
  [ -f "$LOCK" ] && rm -f "$LOCK" && echo "$name: removed a stale $LOCK (a build killed earlier left it)"
  STEP_LOG="$WORK/$name.log" timeout -k 10 "$limit" bash -c "$3" > "$WORK/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$name: cut off by its timeout of $limit s" >> "$WORK/$name.log"
  fi
  printf '%s %d %d %d\n' "$name" "$rc" $((SECONDS - start)) "$limit" >> "$WORK/steps.txt"
  echo "$(date +%T) $name: exit $rc after $((SECONDS - start)) s of $limit | $(tail -n 1 "$WORK/$name.log")"
  return "$rc"
}

skip() {  # skip NAME WHY: a step not run, recorded as failed
  printf '%s %d %d %d\n' "$1" 99 0 0 >> "$WORK/steps.txt"
  echo "skipped: $2" > "$WORK/$1.log"
  echo "$(date +%T) $1: skipped: $2"
}

env_check() {
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true
  echo "nvcc: $(command -v nvcc || echo 'not on PATH') | $PY: $(command -v "$PY" || echo 'not found')"
  "$PY" -c 'import sys, time
t0 = time.time()
import torch
from torch.utils import cpp_extension
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), ninja {cpp_extension.is_ninja_available()}, "
      f"import {time.time() - t0:.1f} s")
if not torch.cuda.is_available():
    sys.exit("no CUDA device: torch.cuda.is_available() is False")
t0 = time.time()
torch.ones(1, device="cuda")
major, minor = torch.cuda.get_device_capability()
print(f"{torch.cuda.get_device_name()}, sm_{major}{minor}, driver start {time.time() - t0:.1f} s")
print(f"arch {major}.{minor}")'
}

build() {  # from cold, so that the time is the build's; one architecture, this GPU's
  rm -rf build/attention
  "$PY" -c 'import sys, time, attention
t0 = time.time()
if attention.load_cuda_attention() is None:
    sys.exit("attention.cu: not built (the warning above says why)")
print(f"attention.cu: built and loaded in {time.time() - t0:.1f} s")'
}

gpu_tests() {
  "$PY" -m pytest tests/ -k gpu -v -rs -p no:cacheprovider || return
  if grep -q SKIPPED "$STEP_LOG"; then
    echo "GPU tests were skipped (listed above): every one must run here"
    return 1
  fi
}

bench() {
  "$PY" tools/bench_attention.py || return
  grep -q "^KERNEL_FASTER" "$STEP_LOG" || { echo "no timings: the bench did not run"; return 1; }
}

replay_run() {  # replay_run ATTN: --preset small, one thread as the study's runs, so they share a base
  if [ -f "$WORK/replay-$1/results.json" ]; then echo "finished by an earlier call: kept"; return 0; fi
  "$PY" train.py --strategy replay --preset small --device cuda --threads 1 --attn "$1" \
    --run-dir "$WORK/replay-$1" --cache-dir "$CACHE"
}

paths() {  # side by side, so the step times see the same load; auto's base is the study's
  local pids=() rc=0
  for attn in auto cuda manual; do
    replay_run "$attn" > "$WORK/replay-$attn.log" 2>&1 & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for attn in auto cuda manual; do echo "replay-$attn: $(tail -n 1 "$WORK/replay-$attn.log")"; done
  return $rc
}

study() {  # every strategy from both bases, one seed; the study passes --threads 1 itself
  "$PY" study.py --seeds 1 --jobs 8 --bases pretrained,multitask --out "$WORK/study" \
    -- --preset small --device cuda --cache-dir "$CACHE"
}

export -f env_check build gpu_tests bench replay_run paths study

echo "gpu_check call $CALL: work in $WORK, the archive to $DEST/gpu-check-$CALL.tar.gz"
start=$SECONDS
if step env 60 env_check || [ "${DRY_RUN:-0}" = 1 ]; then
  ARCH=$(sed -n 's/^arch //p' "$WORK/env.log")
  export TORCH_CUDA_ARCH_LIST=$ARCH  # this GPU alone: an image's preset list can't slow or break the build
  echo "TORCH_CUDA_ARCH_LIST=$ARCH"
  if [ "$CALL" = 1 ]; then
    if step build 240 build; then
      step tests 300 gpu_tests
      step bench 120 bench
    else
      skip tests "the build failed"
      skip bench "the build failed"
    fi
  else
    step paths 240 paths
    step study 420 study
  fi
else
  echo "no usable GPU: the remaining steps are not run"
fi

"$PY" tools/gpu_summary.py "$WORK" "$CALL" $((SECONDS - start)) > "$WORK/summary.txt" 2>&1
cat "$WORK/summary.txt"
find "$WORK" -name '*.pt' -delete
tar -czf "$DEST/gpu-check-$CALL.tar.gz" -C "$TOP" "call$CALL"
echo "archive: $DEST/gpu-check-$CALL.tar.gz ($(du -h "$DEST/gpu-check-$CALL.tar.gz" | cut -f1))"
status=0
while read -r name rc seconds limit; do
  [ "$rc" -eq 0 ] || status=1
done < "$WORK/steps.txt"
exit $status
