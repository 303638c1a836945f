"""Is train.py's loop as fast as a bare one, how busy does it keep the CPU, and what do evaluation and memory
cost?

    OMP_NUM_THREADS=1 python tools/bench_train.py            # about three minutes on the 2-core CPU
    OMP_NUM_THREADS=1 python tools/bench_train.py --no-rss   # skip the short subprocess run that measures RSS
    OMP_NUM_THREADS=1 python tools/bench_train.py --study runs/study   # and a study's per-run breakdown

Everything is measured in this one run, side by side, on the same model and the same batches: train.py's
train_steps against a bare forward/backward/AdamW loop (alternating rounds, median of each), FLOPs counted by
torch's FlopCounterMode against a float32 matmul peak measured here, one evaluation of every task against a
whole run's training, and the bytes of a replay row, EWC's importances and anchors, and a run's peak RSS.
Then the levers for a cheaper step, before and after, side by side (kept: those that change no result, and
two threads for a run alone, a deliberate change of the last bits; the study keeps one thread a run),
what --threads 0 could resolve to, each on a quiet machine and beside a busy core (--threads-only: just
that, about five minutes), the cost of a fresh Python's imports, and with --study
where a study's runs spent their time.
"""
import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["TQDM_DISABLE"] = "1"  # train_steps' progress bar would scroll over the table (train.py reads it)
import data  # noqa: E402
import llava  # noqa: E402
import strategies  # noqa: E402
import runner
import train  # noqa: E402
from model import PRESETS, VLM, ModelConfig  # noqa: E402


# train.py's main in a fresh Python, then its peak resident memory (VmHWM, Linux): a forked child's own
# getrusage would count the memory of this benchmark, which it shares until exec
PEAK_RSS = """import runpy, sys
sys.argv[0] = "train.py"
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])"""


def matmul_peak(n=512, repeat=20):
    """GFLOP/s of an n x n float32 matmul, the best of `repeat`: the most this CPU does with these threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def setup(preset, batch_size):
    """A model of `preset` after a few steps, its training rows and a TrainConfig as train.py would build
    them."""
    tok = llava.train_tokenizer(data.ALL_TASKS, 0)
    mcfg = ModelConfig(**{**PRESETS[preset], "vocab_size": tok.get_vocab_size()})
    cfg = runner.TrainConfig(batch_size=batch_size)
    rows = llava.make_split(data.TASKS["attribute"], "train", 512, 0, tok, mcfg.image_size,
                           mcfg.max_text_len)[0]
    model = VLM(mcfg, seed=0)
    model.vision.requires_grad_(False)  # as in task tuning
    return tok, mcfg, cfg, rows, model


def bare_loop(model, batches):
    """The least a step can do: forward, backward, AdamW step, on batches made in advance."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for batch in batches:
        _, loss = model(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def compare_loops(model, rows, cfg, steps, rounds=5):
    """Seconds per step of train.py's loop and of the bare loop, alternating rounds -> (median loop, median
    bare)."""
    gen = torch.Generator().manual_seed(0)
    batches = [llava.to_batch(rows, torch.randint(len(rows), (cfg.batch_size,), generator=gen), "cpu")
               for _ in range(steps)]
    loop, bare, cpu = [], [], torch.device("cpu")
    for _ in range(rounds + 1):  # the first round warms up both
        t0 = time.perf_counter()
        train.train_steps(model, rows, strategies.Strategy(None), steps, 1e-4, cfg, gen, cpu, "loop")
        t1 = time.perf_counter()
        bare_loop(model, batches)
        loop.append((t1 - t0) / steps)
        bare.append((time.perf_counter() - t1) / steps)
    return statistics.median(loop[1:]), statistics.median(bare[1:]), batches[0]


def step_flops(model, batch, seen=None):
    """FLOPs of one forward + backward, counted by torch (with `seen`, the vision tower's output given)."""
    counter = FlopCounterMode(display=False)
    with counter:
        _, loss = model(*batch, seen=seen)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def slow_vision(model, images, seen, device):
    """llava.vision_seen without its cache: every step puts the whole batch through the frozen tower."""
    return model.vision(llava.pixels(images).to(device))


@contextlib.contextmanager
def patched(*patches):
    """(object, attribute, value) for each patch: set for the with-block, then put back."""
    old = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in old:
            setattr(obj, attr, value)


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


LEVERS = {  # name -> (kept?, the lever switched on around train.py's loop, given its TrainConfig)
    "before: no vision cache": (False, lambda cfg: patched((llava, "encode_images", lambda *args: {}),
                                                           (llava, "vision_seen", slow_vision))),
    "vision cache (llava.vision_seen)": (True, lambda cfg: patched()),
    "+ torch.compile (--compile)": (False, lambda cfg: patched((cfg, "compile", True))),
    "+ AdamW foreach": (False, lambda cfg: patched((torch.optim, "AdamW", functools.partial(
        torch.optim.AdamW, foreach=True)))),
    "+ 2 threads (a run alone)": (True, lambda cfg: threads(2)),
}


def compare_levers(model, rows, cfg, steps, levers=LEVERS, rounds=5):
    """Seconds per step of train.py's loop with each lever of `levers`, alternating rounds (the first warms
    up and compiles) -> {name: median seconds per step}."""
    times, cpu = {name: [] for name in levers}, torch.device("cpu")
    for r in range(rounds + 1):
        for name, (_, lever) in levers.items():
            gen = torch.Generator().manual_seed(r)
            with lever(cfg):
                t0 = time.perf_counter()
                train.train_steps(model, rows, strategies.Strategy(None), steps, 1e-4, cfg, gen, cpu, name)
                if r:
                    times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


# What --threads 0 could resolve to: (extra environment, threads). OpenMP's wait policy is read when torch
# loads, so each candidate runs in a Python of its own (STEP_TIMER). The rule, fixed before measuring: the
# default is the candidate whose worst slowdown, over a quiet machine and one with a busy core, against the
# best candidate in that case, is smallest.
THREAD_CANDIDATES = {"1 thread": ({}, 1), "2 threads": ({}, 2),
                     "2 threads, short spin": ({"GOMP_SPINCOUNT": "10000"}, 2),
                     "2 threads, passive wait": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2)}
STEP_TIMER = """import statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
import bench_train, strategies, train
torch.set_num_threads(int(sys.argv[2]))
steps = int(sys.argv[3])
_, _, cfg, rows, model = bench_train.setup("tiny", 32)
times = []
for r in range(4):  # the first round warms up
    gen, t0 = torch.Generator().manual_seed(r), time.perf_counter()
    train.train_steps(model, rows, strategies.Strategy(None), steps, 1e-4, cfg, gen, torch.device("cpu"), "t")
    times.append((time.perf_counter() - t0) / steps)
print(statistics.median(times[1:]))"""


def thread_candidates(steps, repeat=3):
    """Each of THREAD_CANDIDATES in a fresh Python, on a quiet machine and beside a process that keeps one
    core busy (a browser, a second run), alternating -> {case: {candidate: median seconds per step}}."""
    results = {}
    for case in ("quiet", "one busy core"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if case != "quiet" else None
        times = {name: [] for name in THREAD_CANDIDATES}
        try:
            for _ in range(repeat):
                for name, (env, n) in THREAD_CANDIDATES.items():
                    cmd = [sys.executable, "-c", STEP_TIMER, str(ROOT / "tools"), str(n), str(steps)]
                    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "TQDM_DISABLE": "1"},
                                         capture_output=True, text=True, check=True).stdout
                    times[name].append(float(out.split()[-1]))
        finally:
            if busy:
                busy.kill()
                busy.wait()
        results[case] = {name: statistics.median(t) for name, t in times.items()}
    return results


def print_thread_candidates(steps):
    results = thread_candidates(steps)
    print(f"\n--threads 0, candidates (ms a step, median of 3 fresh Pythons, {steps} steps x 3 rounds each):")
    print(f"  {'candidate':<26}" + "".join(f"{case:>16}{'vs best':>9}" for case in results) + f"{'worst':>8}")
    worst = {}
    for name in THREAD_CANDIDATES:
        ratios = [case[name] / min(case.values()) for case in results.values()]
        worst[name] = max(ratios)
        print(f"  {name:<26}" + "".join(f"{1000 * case[name]:>16.1f}{r:>8.2f}x" for case, r in
                                        zip(results.values(), ratios)) + f"{worst[name]:>7.2f}x")
    print(f"  the rule (smallest worst slowdown) picks: {min(worst, key=worst.get)}")


def study_breakdown(folder):
    """Mean seconds of a study's runs in each part (train.py's results.json 'breakdown'), by strategy."""
    parts = {}
    for path in sorted(Path(folder).glob("runs/**/results.json")):
        results = json.loads(path.read_text())
        if "breakdown" in results:
            parts.setdefault(results["config"]["train"]["strategy"], []).append(results["breakdown"])
    return {s: {k: statistics.mean(b[k] for b in bs) for k in bs[0]} | {"runs": len(bs)}
            for s, bs in parts.items()}


def import_seconds(repeat=3):
    """Seconds for a fresh Python to import train.py (torch and all): what each of a study's runs pays
    first."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import train"], cwd=ROOT, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def where_time_goes(model, rows, cfg, repeat=30):
    """Milliseconds of each part of a step: making the batch, forward, backward, optimizer."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    parts = {"batch": [], "forward": [], "backward": [], "optimizer": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        batch = llava.to_batch(rows.subset(torch.randint(len(rows), (cfg.batch_size,), generator=gen)),
                              range(cfg.batch_size), "cpu")
        t1 = time.perf_counter()
        _, loss = model(*batch)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k].append(dt)
    return {k: 1000 * statistics.median(v) for k, v in parts.items()}


def eval_share(model, tok, mcfg, cfg, step_seconds):
    """One evaluation of every task (as train.py runs after each task) -> (seconds, share of a default
    run)."""
    tests = [llava.make_split(t, "test", cfg.n_test, 0, tok, mcfg.image_size, mcfg.max_text_len)[0]
             for t in data.TASKS.values()]
    strategy = strategies.Strategy(None)
    train.evaluate(model, strategy, tests[:1], tok, torch.device("cpu"), cfg)  # warm-up
    t0 = time.perf_counter()
    train.evaluate(model, strategy, tests, tok, torch.device("cpu"), cfg)
    once = time.perf_counter() - t0
    n_tasks = len(data.TASKS)
    # the base row, then after each task
    evals, training = (n_tasks + 1) * once, n_tasks * cfg.steps * step_seconds
    return once, evals / (evals + training)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="steps per timed round")
    ap.add_argument("--no-rss", action="store_true", help="skip the subprocess run that measures peak RSS")
    ap.add_argument("--study", default="", help="a study folder (python study.py --out): its runs' breakdown")
    ap.add_argument("--threads-only", action="store_true", help="only time what --threads 0 could pick")
    args = ap.parse_args()
    if args.threads_only:
        print_thread_candidates(args.steps)
        return
    peak = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); float32 matmul peak "
          f"{peak:.1f} GFLOP/s (512 x 512, best of 20)\n")
    print(f"{'config':<26}{'loop ms':>9}{'bare ms':>9}{'loop/bare':>10}{'samples/s':>11}{'GFLOP/s':>9}"
          f"{'MFU':>7}")
    for preset, batch_size in (("tiny", 32), ("tiny", 128), ("small", 32)):
        tok, mcfg, cfg, rows, model = setup(preset, batch_size)
        steps = args.steps if preset == "tiny" else args.steps // 4
        loop, bare, batch = compare_loops(model, rows, cfg, steps)
        gflops = step_flops(model, batch) / loop / 1e9
        default = preset == "tiny" and batch_size == 32
        label = f"{preset}, batch {batch_size}" + (" (default)" if default else "")
        print(f"{label:<26}{1000 * loop:>9.1f}"
              f"{1000 * bare:>9.1f}{bare / loop:>10.2f}{batch_size / loop:>11.0f}{gflops:>9.1f}"
              f"{gflops / peak:>7.0%}")
        if default:
            parts, (once, share) = where_time_goes(model, rows, cfg), eval_share(model, tok, mcfg, cfg, loop)
            default_rows, default_model = rows, model
    print("\nwhere a default step's time goes (ms, median of 30): "
          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print(f"evaluation of all {len(data.TASKS)} tasks ({runner.TrainConfig().n_test} rows each): "
          f"{once:.1f} s; "
          f"run for the base row and after each task, it is {share:.1%} of a default run's training and "
          "evaluation")
    rows, model = default_rows, default_model

    print(f"\nlevers, train.py's loop at the default size ({args.steps} steps a round, alternating rounds, "
          "median of 5; MFU on the FLOPs each one does):")
    cfg = runner.TrainConfig()
    levers = compare_levers(model, rows, cfg, args.steps)
    batch = llava.to_batch(rows, range(cfg.batch_size), "cpu")
    before = levers["before: no vision cache"]
    with torch.no_grad():
        seen = model.vision(batch[0])
    for name, seconds in levers.items():
        flops = step_flops(model, batch, None if name.startswith("before") else seen)
        print(f"  {name:<34}{1000 * seconds:>7.1f} ms{before / seconds:>7.2f}x"
              f"{flops / seconds / 1e9 / peak:>6.0%}"
              f"  {'kept' if LEVERS[name][0] else 'not kept'}")
    print_thread_candidates(args.steps)
    print("\na fresh Python importing train.py (torch and all), as each study run does: "
          f"{import_seconds():.1f} s")
    if args.study:
        print(f"\n{args.study}: mean seconds of a run in each part (from results.json), by strategy")
        for s, parts in study_breakdown(args.study).items():
            print(f"  {s:<12}" + "  ".join(f"{k} {v:.0f}" for k, v in parts.items()))

    row_bytes = strategies.nbytes([rows.images[0], rows.tokens[0], rows.prompt_len[0]])
    ewc = strategies.build("ewc", strategies.StrategyConfig())
    ewc.after_task(model, 0, rows.subset(range(64)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\nreplay: {row_bytes:,} bytes per row (uint8 pixels, int16 tokens); the default 200-row buffer "
          f"{200 * row_bytes / 2 ** 20:.2f} MB")
    print(f"ewc: importances + anchors {ewc.extra_bytes() / 2 ** 20:.2f} MB for {trainable:,} trainable "
          "parameters "
          f"({ewc.extra_bytes() / 4 / trainable:.2f} floats each)")
    if not args.no_rss:  # the default run's data and model, 10 steps a task: memory does not grow with steps
        flags = ["--strategy", "replay", "--steps", "10", "--base-steps", "10", "--device", "cpu"]
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *flags, "--run-dir", f"{tmp}/run",
                                   "--cache-dir", f"{tmp}/cache"], cwd=ROOT, capture_output=True, text=True)
        rss = int(proc.stdout.split()[-1]) / 1024 if proc.returncode == 0 else float("nan")
        print(f"peak RSS of `python train.py {' '.join(flags)}`: {rss:.0f} MB")


if __name__ == "__main__":
    main()
