"""The GPU check's summary, from one call's work folder: each step's time against its timeout, the bars the
check exists for, and the numbers a README's GPU section takes.

    python3 tools/gpu_summary.py runs/gpu-check/call1 1 SECONDS   # tools/gpu_check.sh runs it
"""
import json
import re
import sys
from pathlib import Path


def log(work, name):
    path = work / f"{name}.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def last_match(pattern, text, missing):
    return (re.findall(pattern, text, re.MULTILINE) or [missing])[-1]


def results(folder):
    try:
        return json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None


def step_ms(r):
    """Milliseconds a training step, over the task stages (the base stage is not in the timings)."""
    steps = r["config"]["train"]["steps"] * len(r["timings"])
    return 1000 * sum(t["train_seconds"] for t in r["timings"]) / steps


def call_1(work):
    print("\n" + last_match(r"^attention\.cu: .*$", log(work, "build"), "build: no result"))
    print("GPU tests: " + last_match(r"^=+ (.*) =+$", log(work, "tests"), "no pytest summary line"))
    bench = log(work, "bench").splitlines()
    first = next((i for i, line in enumerate(bench) if "| causal," in line), None)
    print("\n".join(bench[first:]) if first is not None else "bench: no table")


def call_2(work):
    runs = {attn: results(work / f"replay-{attn}") for attn in ("auto", "cuda", "manual")}
    print("\nreplay --preset small, one thread, side by side on the GPU:")
    for attn, r in runs.items():
        if r is None:
            last = (log(work, f"replay-{attn}").strip().splitlines() or ["(empty log)"])[-1]
            print(f"  {attn:<7} no results.json: {last}")
            continue
        m = r["metrics"]
        print(f"  {attn:<7} {step_ms(r):6.2f} ms/step  wall {r['wall_seconds']:5.0f} s  AA {m['AA']:5.1f}  "
              f"BWT {m['BWT']:+6.1f}")
    if runs["auto"] and runs["cuda"]:
        print(f"  step time, kernel / auto: {step_ms(runs['cuda']) / step_ms(runs['auto']):.2f} (auto: "
              "SDPA unless attention.KERNEL_FASTER names the shape)")
    study = [r for r in map(results, (p.parent for p in (work / "study").glob("runs/**/results.json"))) if r]
    print(f"\nstudy: {len(study)} runs with results; "
          + last_match(r"^study: .*$", log(work, "study"), "its log has no 'study:' line"))
    bwt = {}
    for r in sorted(study, key=lambda r: (r["config"]["train"]["base"], r["config"]["train"]["strategy"])):
        train = r["config"]["train"]
        bwt[train["base"], train["strategy"]] = r["metrics"]["BWT"]
        print(f"  {train['base']:<10} {train['strategy']:<12} AA {r['metrics']['AA']:5.1f}  "
              f"BWT {r['metrics']['BWT']:+6.1f}  wall {r['wall_seconds']:4.0f} s")
    for base in ("pretrained", "multitask"):
        naive, replay = bwt.get((base, "naive")), bwt.get((base, "replay"))
        if naive is not None and replay is not None:
            print(f"  bar, {base}: naive BWT {naive:+.1f} <= -30: {'yes' if naive <= -30 else 'NO'}; replay "
                  f"{replay:+.1f} at most half of it: {'yes' if abs(replay) <= abs(naive) / 2 else 'NO'}")


def main(work, call, wall):
    work = Path(work)
    steps = [line.split() for line in (work / "steps.txt").read_text().splitlines()]
    print(f"nanoCIT GPU check, call {call}: {wall} s in all\n" + log(work, "env").strip())
    print(f"\n{'step':<8} {'exit':>4} {'seconds':>8} {'timeout':>8}")
    for name, rc, seconds, limit in steps:
        print(f"{name:<8} {rc:>4} {seconds:>8} {limit:>8}" + ("  (skipped)" if rc == "99" else ""))
    print(f"failed: {', '.join(name for name, rc, _, _ in steps if rc != '0') or 'none'}")
    if len(steps) > 1:  # past the env step
        call_1(work) if call == "1" else call_2(work)


if __name__ == "__main__":
    main(*sys.argv[1:4])
