#!/usr/bin/env bash
# The GPU check: build attention.cu, run every GPU test, time the kernel, train with it, run the study.
#
#     bash tests/gpu_check.sh [OUT]      # OUT: a new or empty folder, default runs/gpu-check
#
# Written for one machine with one CUDA GPU and 16 CPU cores (an H200), to finish in 8 minutes. Each step
# has its own timeout, logs to OUT/<step>.log and records its exit code and seconds; a failed step does not
# stop the ones after it, but the script then exits 1. OUT/summary.txt holds the steps and the numbers.
# Every run folder and the base-model cache go under OUT, so each run's results.json is kept with the logs;
# the checkpoints (~10 GB over all runs) are deleted at the end unless KEEP_CHECKPOINTS=1 is set.
# Without CUDA every step starts and fails within seconds, each with a line that says why.
#
# Budget of the 8 minutes. Nothing here was timed on a GPU yet: the expected times are estimates, and the
# timeouts, about 1.5 times them where the budget allows, add up to 475 s in the order the steps run.
#   step           timeout  expected
#   cuda              15 s      5 s   is there a GPU; versions for the log
#   build             90 s     60 s   attention.cu from cold: nvcc on one file; later processes load it
#   bench             30 s     15 s   alone on the GPU, because its numbers are timings
#   replay-kernel,    85 s     60 s   three --preset small runs side by side, 4400 steps each with the base:
#   replay-sdpa,                      the two timed runs see the same load, so their step-time ratio is fair,
#   ewc                               and ewc caches the pretrained base (fp32) that the study then reuses
#   tests, study     255 s    250 s   side by side: pytest's GPU tests (a torch.compile run among them) and
#                                     the study, 18 runs of 2400 task steps, 8 at a time on the one GPU
# The study is the unknown (~45k steps of a few ms of GPU time each) and gets what is left. If it is cut
# off, its finished runs keep their results.json, which the same study command with the same --out reuses.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/runs/gpu-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -n "$(ls -A "$OUT")" ]; then  # train.py and the study resume what they find: the timings would be wrong
  echo "error: $OUT is not empty; give a new folder (or remove this one)" >&2
  exit 2
fi
cd "$ROOT"
export OUT
export TQDM_DISABLE=1  # no progress bars in the logs

step() {  # step NAME TIMEOUT FUNCTION: run FUNCTION with a timeout, into OUT/NAME.log; record rc and time
  local name=$1 limit=$2 start=$SECONDS rc
  echo "$(date +%T) $name: started (timeout $limit s)"
  STEP_LOG="$OUT/$name.log" timeout -k 10 "$limit" bash -c "$3" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$name: cut off by its timeout of $limit s" >> "$OUT/$name.log"
  fi
  printf '%s %d %d %d\n' "$name" "$rc" $((SECONDS - start)) "$limit" >> "$OUT/steps.txt"
  echo "$(date +%T) $name: exit $rc after $((SECONDS - start)) s | $(tail -n 1 "$OUT/$name.log")"
}

cuda() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "nvcc: $(command -v nvcc || echo 'not on PATH')"
  python -c 'import sys, torch
from torch.utils import cpp_extension
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, ninja {cpp_extension.is_ninja_available()}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device (torch.cuda.is_available() is False): every GPU step below fails")
print(f"{torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")'
}

build() {
  rm -rf build/attention  # from cold, so that the time printed is the build's
  python -c 'import sys, time, model
start = time.time()
kernels = model.load_cuda_attention()
if kernels is None:
    sys.exit("attention.cu: not built (the warning above says why)")
print(f"attention.cu: built and loaded in {time.time() - start:.1f} s")'
}

gpu_tests() {  # STEP_LOG: this step's log, so far
  python -m pytest tests/ -k gpu -rs || return
  if grep -q SKIPPED "$STEP_LOG"; then
    echo "GPU tests were skipped (listed above): every one must run here"
    return 1
  fi
}

bench() {
  python tests/bench_attention.py || return
  grep -q "kernel at least as fast" "$STEP_LOG" || { echo "no timings: the bench did not run"; return 1; }
}

# --device cuda, not auto: without a GPU, train.py then stops at once instead of training on the CPU
replay_kernel() {
  python train.py --strategy replay --preset small --bf16 --device cuda \
    --run-dir "$OUT/replay-kernel" --cache-dir "$OUT/cache"
}

replay_sdpa() {
  python train.py --strategy replay --preset small --bf16 --attn sdpa --device cuda \
    --run-dir "$OUT/replay-sdpa" --cache-dir "$OUT/cache"
}

ewc() {  # the importance pass runs vmap(grad(...)) through the kernel (head size 32 on --preset small)
  python train.py --strategy ewc --preset small --device cuda --run-dir "$OUT/ewc" --cache-dir "$OUT/cache"
}

study() {  # every strategy from both bases, one seed
  python study.py --seeds 1 --jobs 8 --bases pretrained,multitask --out "$OUT/study" \
    -- --preset small --device cuda --cache-dir "$OUT/cache"
}

export -f cuda build gpu_tests bench replay_kernel replay_sdpa ewc study

echo "gpu_check: logs and summary in $OUT"
start=$SECONDS
step cuda 15 cuda
step build 90 build
rm -f build/attention/lock  # a build killed by its timeout leaves it, and later loads would wait on it
step bench 30 bench
step replay-kernel 85 replay_kernel & step replay-sdpa 85 replay_sdpa & step ewc 85 ewc & wait
step tests 255 gpu_tests & step study 255 study & wait

python - "$OUT" $((SECONDS - start)) "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  > "$OUT/summary.txt" <<'EOF'
"""Summarise the check from its logs and run folders: the steps, the issue's bars, then the numbers."""
import json
import re
import sys
from pathlib import Path

out, wall, commit = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def log(name):
    path = out / f"{name}.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def last_match(pattern, text, missing):
    return (re.findall(pattern, text, re.MULTILINE) or [missing])[-1]


def results(folder):
    try:
        return json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None


def step_ms(r):  # training time per step over the task stages (the base stage is not in timings)
    steps = r["config"]["train"]["steps"] * len(r["timings"])
    return 1000 * sum(t["train_seconds"] for t in r["timings"]) / steps


steps = {name: (int(rc), int(seconds), limit) for name, rc, seconds, limit in
         (line.split() for line in (out / "steps.txt").read_text().splitlines())}
print(f"nanoCIT GPU check at commit {commit}, {wall} s in all\n{log('cuda').strip()}")
print(f"\n{'step':<14} {'exit':>4} {'seconds':>8} {'timeout':>8}")
for name, (rc, seconds, limit) in steps.items():
    print(f"{name:<14} {rc:>4} {seconds:>8} {limit:>8}")
print(f"failed: {', '.join(name for name, (rc, _, _) in steps.items() if rc) or 'none'}")

runs = {name: results(out / name) for name in ("replay-kernel", "replay-sdpa", "ewc")}
replay_walls = ", ".join(f"{name} {r['wall_seconds']:.0f} s" for name, r in runs.items()
                         if r and name.startswith("replay"))
study_rc, study_seconds, _ = steps.get("study", ("-", "-", "-"))
print("\nthe issue's bars:")
print("  GPU tests, none skipped: " + last_match(r"^=+ (.*) =+$", log("tests"), "no pytest summary line"))
print("  " + last_match(r"^fp32 forward\+backward.*$", log("bench"), "bench: no verdict"))
print(f"  replay --preset small in <= 60 s: {replay_walls or 'no run finished'} (--bf16, beside ewc)")
print(f"  study in <= 300 s: {study_seconds} s, exit {study_rc}")

print("\n" + last_match(r"^attention\.cu: .*$", log("build"), "build: no result"))
table = log("bench").splitlines()
first = next((i for i, line in enumerate(table) if "| causal," in line), None)
print("\n".join(table[first:first + 10]) if first is not None else "bench: no table", end="\n\n")

for name, r in runs.items():
    if r is None:
        print(f"{name}: no results.json")
        continue
    m = r["metrics"]
    print(f"{name:<14} wall {r['wall_seconds']:5.0f} s  {step_ms(r):6.2f} ms/step  AA {m['AA']:5.1f}  "
          f"BWT {m['BWT']:+6.1f}")
if runs["replay-kernel"] and runs["replay-sdpa"]:
    print(f"step time, kernel / SDPA (replay --bf16, side by side): "
          f"{step_ms(runs['replay-kernel']) / step_ms(runs['replay-sdpa']):.2f}")

study = [r for r in map(results, (p.parent for p in (out / "study").glob("**/results.json"))) if r]
print(f"\nstudy: {len(study)} runs with results; "
      + last_match(r"^study: \d+ of \d+ runs finished.*$", log("study"), "its log has no final line"))
for r in sorted(study, key=lambda r: (r["config"]["train"]["base"], r["config"]["train"]["strategy"])):
    train = r["config"]["train"]
    if train["strategy"] in ("naive", "replay"):
        print(f"  {train['base']:<10} {train['strategy']:<7} AA {r['metrics']['AA']:5.1f}  "
              f"BWT {r['metrics']['BWT']:+6.1f}  wall {r['wall_seconds']:4.0f} s")
if study:
    walls = sorted(r["wall_seconds"] for r in study)
    print(f"  run wall times: {walls[0]:.0f} s to {walls[-1]:.0f} s, median {walls[len(walls) // 2]:.0f} s")
EOF
if [ "${KEEP_CHECKPOINTS:-0}" != 1 ]; then
  find "$OUT" -name '*.pt' -delete
fi
cat "$OUT/summary.txt"
status=0
while read -r name rc seconds limit; do
  [ "$rc" -eq 0 ] || status=1
done < "$OUT/steps.txt"
exit $status
