"""The paper's study: every strategy from both bases, seeds and task orders; its table, findings and charts.

    python study.py                      # every strategy (and replay+tir) x both bases x 3 seeds x 2 orders
    python study.py --seeds 2 --strategies naive,replay,ewc --orders paper -- --steps 200   # -- to train.py

Each run is one train.py process with one thread; a run folder already holding results.json from the same
configuration is reused, so a killed study resumes. The report (study.md, study.json, pictures) goes to
--out (runs/study). The findings checked are those of He et al. (arXiv 2311.16206), each with its verdict
on every seed and whether it survives the other task order; finding 6 ranks naive's interference against
TIR's task similarity (Spearman, with a seeded permutation test). Forgetting is split into format and content.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

import runner
import strategies
from data import atomic_write
import eval as ev
from eval import LEARNT, format_table, markdown_table  # LEARNT: in finding 6
from pictures import bar_chart, heatmap, human_bytes, scatter, tile

BASES = ("pretrained", "multitask")  # alignment only, and that base tuned jointly on the held-in tasks
RESERVED = ("--strategy", "--base", "--seed", "--run-dir", "--tasks", "--base-only",
            "--first-task-from")  # the study sets these for each run
UNCOMPARED = ("vocab_size", "run_dir", "cache_dir",
              "first_task_from")  # set at run time, or paths: not what a run computes
# the table's (column, format); None: bytes, the same each seed
COLUMNS = [("AA", "{:.1f}"), ("learnt", "{:.1f}"), ("not learnt", "{:.1f}"), ("BWT", "{:+.1f}"),
           ("BWT learnt", "{:+.1f}"), ("forgetting", "{:.1f}"), ("FWT", "{:+.1f}"),
           ("FWT_random", "{:+.1f}"), ("format drop", "{:.1f}"), ("task ID", "{:.1f}"),
           ("oracle AA", "{:.1f}"), ("gain", "{:+.1f}"), ("extra memory", None), ("extra time", "{:+.0f} s")]



def task_pairs(A, similarity):
    """Naive's interference where it tells something -> {i: (similarity of task i+1 to i, the drop in task i
    while task i+1 trains relative to A[i][i])} for each task i learnt (A[i][i] >= LEARNT). Later drops are
    mostly tied zeros (naive has forgotten by then), and an unlearnt task has nothing to lose."""
    return {i: (similarity[i + 1][i], (A[i][i] - A[i + 1][i]) / A[i][i])
            for i in range(len(A) - 1) if A[i][i] >= LEARNT}


def interference(runs, seed=None):
    """Each adjacent task pair's (similarity, relative drop), averaged over bases and seeds (or on one seed):
    points that are independent of each other, one per task pair -> [(similarity, drop)]."""
    cells = {}  # task index i -> [(similarity, drop)] over bases and seeds
    for (base, s, sd), r in runs.items():
        if s == "naive" and (base, "tir", sd) in runs and seed in (None, sd):
            for i, pair in task_pairs(r["matrix"], runs[base, "tir", sd]["task_similarity"]).items():
                cells.setdefault(i, []).append(pair)
    return [tuple(map(statistics.fmean, zip(*cells[i]))) for i in sorted(cells)]


def run_numbers(r, naive):
    """One run's results.json -> what the study reports; gain and extra time are over naive's run, if any."""
    seconds = sum(t["train_seconds"] for t in r["timings"])
    numbers = {k: r["metrics"].get(k) for k in ("AA", "BWT", "forgetting", "FWT", "FWT_random")}
    A = r["matrix"]
    numbers.update({"learnt": ev.mean_learnt(A), "BWT learnt": ev.learnt_bwt(A),
                    "not learnt": sum(A[i][i] < LEARNT for i in range(len(A)))})
    numbers.update({"task ID": r.get("task_id_accuracy"), "extra memory": r["extra_bytes"],
                    "matrix": r["matrix"], "similarity": r.get("task_similarity"),
                    "format": r.get("format_matrix"), "content": r.get("content_matrix"),
                    "space shares": r.get("space_shares"), "oracle AA": mean_or_none(r.get("oracle_row"))})
    if "format_matrix" in r:
        numbers["format drop"] = ev.format_drop(r["matrix"], r["format_matrix"], r["content_matrix"])
    if naive and naive is not r:
        numbers["gain"] = r["metrics"]["AA"] - naive["metrics"]["AA"]
        numbers["extra time"] = seconds - sum(t["train_seconds"] for t in naive["timings"])
    return numbers


def mean_or_none(values):
    values = [v for v in values or () if v is not None]
    return statistics.fmean(values) if values else None


def summarize(runs):
    """{(base, strategy, seed): results} -> {(base, strategy): {number: [one value per seed, seed 0 first,
    whatever order the study's jobs finished in]}}."""
    summary = {}
    for (base, strategy, seed), r in sorted(runs.items(), key=lambda kv: kv[0][2]):
        for k, v in run_numbers(r, runs.get((base, "naive", seed))).items():
            if v is not None:
                summary.setdefault((base, strategy), {}).setdefault(k, []).append(v)
    return summary


def mean_matrix(matrices):
    """The cell-wise mean over seeds; a cell undefined (None) in every seed stays None."""
    return [[mean_or_none(cells) for cells in zip(*rows)] for rows in zip(*matrices)]


def cell(values, fmt):
    """Values over seeds -> '74.7', or '74.7 ± 2.1' for several seeds; '-' for none."""
    if not values:
        return "-"
    text = human_bytes(statistics.fmean(values)) if fmt is None else fmt.format(statistics.fmean(values))
    return text + f" ± {statistics.stdev(values):.1f}" if len(values) > 1 and fmt else text


def study_rows(summary, strategies, bases):
    """The study's table: one row per (strategy, base), header first; the columns some run has."""
    columns = [c for c in COLUMNS if any(c[0] in n for n in summary.values())]  # e.g. 'task ID' if one routes
    return [["strategy", "base"] + [name for name, _ in columns]] + [
        [s, b] + [cell(summary[b, s].get(name), fmt) for name, fmt in columns]
        for s in strategies for b in bases if (b, s) in summary]


def rho_text(rho):
    return "ρ undefined (too few pairs, or a constant side)" if math.isnan(rho) else f"ρ = {rho:+.2f}"


def minus(x, y):
    return None if x is None or y is None else x - y


def finding_numbers(runs, seed, bases):
    """One seed's runs -> per finding, {label: the number its verdict tests on that seed (None: not run)}."""
    def m(base, strategy, key):
        r = runs.get((base, strategy, seed))
        return r and r["metrics"][key]

    def gain(s, b):
        return minus(m(b, s, "AA"), m(b, "naive", "AA"))
    pairs, P, M = interference(runs, seed), "pretrained", "multitask"
    return [{f"naive BWT ({b})": m(b, "naive", "BWT") for b in bases},
            {"naive forgetting, pretrained - multitask": minus(m(P, "naive", "forgetting"),
                                                               m(M, "naive", "forgetting"))},
            {f"{s} gain ({b})": gain(s, b) for s in ("replay", "expansion") for b in bases},
            {f"{s} gain, multitask - pretrained": minus(gain(s, M), gain(s, P)) for s in ("ewc", "mas")},
            {f"tir - ewc AA ({b})": minus(m(b, "tir", "AA"), m(b, "ewc", "AA")) for b in bases},
            {"ρ": None if len(pairs) < 2 or math.isnan(r := ev.spearman(*zip(*pairs))) else r}]


CLAIMS = [  # each finding, and the test its numbers must pass on a seed for it to hold there
    ("1. Sequential (naive) tuning forgets: BWT < 0", lambda v: v < 0),
    ("2. The multitask base forgets less than the pretrained one (naive's forgetting)", lambda v: v > 0),
    ("3. Replay and expansion beat naive's AA from every base", lambda v: v > 0),
    ("4. Regularisation (EWC, MAS) gains more over naive from the multitask base than from the pretrained "
     "one", lambda v: v > 0),
    ("5. TIR's AA ≥ EWC's", lambda v: v >= 0),
    ("6. Similar tasks interfere less: Spearman ρ(similarity, naive's relative drop) < 0", lambda v: v < 0),
]


def verdict(per_seed):
    """holds on every seed: holds; fails on every seed: fails; else mixed (seeds not measured left out)."""
    measured = [h for h in per_seed if h is not None]
    return "not measured" if not measured else "holds" if all(measured) else "fails" if not any(
        measured) else "mixed"


def findings(runs, bases):
    """The paper's six findings on one task order's runs -> [dict(claim, verdict, per_seed, differences)]:
    per seed True, False or None (not measured); differences {label: [value per seed]} (paired by seed).
    Finding 6 holds only if its seed-averaged permutation test is significant too (p < 0.05)."""
    seeds = sorted({seed for _, _, seed in runs})
    numbers = [finding_numbers(runs, seed, bases) for seed in seeds]  # [seed][finding] -> {label: value}
    checks = []
    for k, (claim, test) in enumerate(CLAIMS):
        per_seed = [None if None in n[k].values() else all(map(test, n[k].values())) for n in numbers]
        differences = {label: [n[k][label] for n in numbers if n[k][label] is not None]
                       for label in numbers[0][k]}
        checks.append(dict(claim=claim, verdict=verdict(per_seed), per_seed=per_seed,
                           differences=differences))
    pairs = interference(runs)
    rho = ev.spearman(*zip(*pairs)) if len(pairs) > 1 else math.nan
    p = ev.permutation_p(*zip(*pairs)) if len(pairs) > 1 else math.nan
    checks[5].update(rho=None if math.isnan(rho) else rho, p=None if math.isnan(p) else p, n_pairs=len(pairs),
                     pairs=pairs)
    if checks[5]["verdict"] == "holds" and not p < 0.05:
        checks[5]["verdict"] = "not significant"
    return checks


def finding_text(check):
    """'per seed: holds, fails; naive BWT (pretrained) -40.0 ± 1.0, ...' (+ the test of finding 6)."""
    seeds = ", ".join({True: "holds", False: "fails", None: "-"}[h] for h in check["per_seed"])
    text = f"per seed: {seeds}; " + ", ".join(f"{label} {cell(v, '{:+.2f}' if label == 'ρ' else '{:+.1f}')}"
                                              for label, v in check["differences"].items())
    if "n_pairs" in check:
        rho, p = check["rho"], check["p"]
        text += (f"; seed-averaged {rho_text(math.nan if rho is None else rho)} over {check['n_pairs']} "
                 f"independent task pairs (i, i+1) with task i learnt (>= {LEARNT} %), one-sided permutation "
                 + ("p undefined" if p is None else f"p = {p:.3f}")
                 + (", not significant" if p is not None and p >= 0.05 else ""))
    return text


# the study's pictures, drawn by pictures.py


def study_pictures(summary, pairs, rho, tasks, strategies, bases):
    """The study's charts -> {file name: image}. pairs: finding 6's [(similarity, relative drop)]."""
    def metric(key):
        return {(s, b): numbers[key] for (b, s), numbers in summary.items()}

    def cost(key):  # naive is the origin of both axes, so it is left out
        return [(statistics.fmean(n[key]), statistics.fmean(n["gain"]), s, b)
                for (b, s), n in summary.items() if s != "naive" and "gain" in n]
    gain = "gain in AA over naive (points)"
    aa = bar_chart(metric("AA"), strategies, "final average accuracy", "AA (%)")
    bwt = bar_chart(metric("BWT"), strategies, "backward transfer (< 0: forgetting)", "BWT (points)")
    pictures = {"aa_bwt.png": tile([aa, bwt], 1)}
    if cost("extra time"):
        memory = scatter(cost("extra memory"), "does memory pay for itself?", "extra memory (log scale)",
                         gain, bytes_x=True)
        compute = scatter(cost("extra time"), "does compute pay for itself?", "extra training time (s)", gain)
        pictures["cost_benefit.png"] = tile([memory, compute], 2)
    for b in bases:
        for key, name, note in (("matrix", "matrices", "columns: task evaluated"),
                                ("format", "format", "format: % in the task's space"),
                                ("content", "content", "content: % right of those")):
            matrices = [heatmap(tasks, mean_matrix(summary[b, s][key]), f"{s}, {b} base", note=note)
                        for s in strategies if key in summary.get((b, s), {})]
            if matrices:
                pictures[f"{name}-{b}.png"] = tile(matrices, 3)
        if "similarity" in summary.get((b, "tir"), {}):
            percent = [[100 * v for v in row] for row in mean_matrix(summary[b, "tir"]["similarity"])]
            pictures[f"similarity-{b}.png"] = heatmap(tasks, percent, f"task similarity x 100, {b} base",
                                                      rows="{}", note="measured by TIR")
    if pairs:
        title = "Spearman " + rho_text(rho).replace("ρ", "rho")  # the bundled font has no ρ
        points = [(x, y, "", BASES[0]) for x, y in pairs]
        pictures["task_pairs.png"] = scatter(points, title, "similarity of task i+1 to task i",
                                             "naive: drop in task i while i+1 trains / A[i][i]", legend=False)
    return pictures


def format_section(summary, tasks, bases):
    """How much of naive's forgetting is format forgetting, and what a student sees."""
    lines = []
    for b in bases:
        n = summary.get((b, "naive"), {})
        if "format drop" in n:
            drop, fmt = [-v for v in n["BWT"]], n["format drop"]
            mean_drop = statistics.fmean(drop)
            share = 100 * statistics.fmean(fmt) / mean_drop if mean_drop else math.nan
            lines.append(f"- {b} base: naive's earlier tasks end {cell(drop, '{:.1f}')} points below where "
                         f"they were learnt (-BWT); format explains {cell(fmt, '{:.1f}')} points "
                         f"({share:.0f} %): answers of the wrong kind. The rest is content: the right kind, "
                         "wrongly.")
            lines += [f"  - {line}" for line in ev.format_story(tasks, mean_matrix(n["space shares"]))]
    return lines or ["No naive run holds format and content matrices."]


def learnt_section(runs, tasks, strategies, bases):
    """Is every task learnt? Naive's diagonal (each task right after its own training) for each base and seed,
    then each strategy's lowest diagonal entry and the tasks it leaves below LEARNT."""
    lines = ["| naive, base, seed | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for (b, s, seed), r in sorted(runs.items(), key=lambda kv: (bases.index(kv[0][0]), kv[0][2])):
        if s == "naive":
            diagonal = [f"{r['matrix'][i][i]:.1f}" for i in range(len(tasks))]
            lines.append(f"| {b}, {seed} | " + " | ".join(diagonal) + " |")
    lines += ["", f"| base | strategy | lowest diagonal entry | tasks below {LEARNT} (seed: task entry) |",
              "|---|---|---:|---|"]
    for b in bases:
        for s in strategies:
            mine = {seed: r["matrix"] for (base, name, seed), r in runs.items() if (base, name) == (b, s)}
            if mine:
                low = [f"{seed}: {tasks[i]} {A[i][i]:.1f}" for seed, A in sorted(mine.items())
                       for i in range(len(tasks)) if A[i][i] < LEARNT]
                lowest = min(A[i][i] for A in mine.values() for i in range(len(tasks)))
                lines.append(f"| {b} | {s} | {lowest:.1f} | {'; '.join(low) or 'none'} |")
    return lines


def study_markdown(tasks, rows, checks, pictures, notes, others=(), format_lines=(), learnt_lines=()):
    """study.md. others: [(order, its checks)] of the other task orders, each finding's verdict there."""
    lines = []
    for k, check in enumerate(checks):
        elsewhere = "".join(f"; {order} order: **{c[k]['verdict']}** ("
                            f"{'survives' if c[k]['verdict'] == check['verdict'] else 'does not survive'})"
                            for order, c in others)
        lines.append(f"- [{'x' if check['verdict'] == 'holds' else ' '}] {check['claim']}: "
                     f"**{check['verdict']}**{elsewhere} ({finding_text(check)})")
    six = checks[5]
    similarity = ("The study ran no tir (or no naive) run, or no task was learnt: no task-pair analysis."
                  if not six["n_pairs"] else
                  "Finding 6 uses naive's drop in task i while task i+1 trains, relative to A[i][i], only "
                  f"where task i was learnt (>= {LEARNT} %), against TIR's similarity of i+1 to i; each pair "
                  f"averaged over seeds and bases: {six['n_pairs']} independent pairs.")
    return "\n".join(
        ["# nanoCIT study", "", f"Tasks in order: {' -> '.join(tasks)}. " + " ".join(notes), "",
         markdown_table(rows),
         "AA, BWT, forgetting as in eval.py; *learnt*: the mean diagonal (each task right after its own "
         f"training); *not learnt*: tasks below {LEARNT} there, which BWT cannot see; *BWT learnt*: BWT over "
         "the learnt tasks alone; *FWT*: zero-shot accuracy over the base model's (so the two "
         "bases have different references); *FWT_random*: over a randomly initialised model's, the same "
         "reference for both; *format drop*: the points of -BWT that answers of the wrong kind explain; "
         "*task ID*: how often routing found the task; *oracle AA*: AA with each task's own expert (no "
         "routing errors); "
         "*gain*: AA minus naive's from the same base and seed; *extra memory*: what the strategy keeps "
         "beyond the model; *extra time*: training seconds beyond naive's. Several seeds: mean ± std.", "",
         "## The paper's findings", "",
         "A finding *holds* when it holds on every seed, *fails* when it fails on every seed, and is *mixed* "
         "otherwise; the numbers are the paired differences it tests, mean ± std over seeds.", ""]
        + lines + ["", "## Is every task learnt?", "",
                   f"A task never learnt (below {LEARNT} right after its own training) cannot be forgotten, "
                   "so a strategy that leaves one unlearnt can look stable without being so.", ""]
        + list(learnt_lines) + ["", "## Task similarity and forgetting", "", similarity, "",
                   "## Forgetting taken apart: format and content", ""] + list(format_lines)
        + ["", "## Pictures", ""] + [f"![{name}]({name})" for name in pictures]) + "\n"


def write_report(out, runs, strategies, bases, notes=(), others=None, about=None):
    """{(base, strategy, seed): finished results} of the first task order, and {order: such runs} of the
    others -> study.md, study.json, pictures in out -> table rows. about: how the study was made."""
    out, summary, tasks = Path(out), summarize(runs), next(iter(runs.values()))["tasks"]
    strategies = [s for s in strategies if any((b, s) in summary for b in bases)]
    bases = [b for b in bases if any((b, s) in summary for s in strategies)]
    checks, rows = findings(runs, bases), study_rows(summary, strategies, bases)
    other_checks = [(order, findings(r, bases)) for order, r in (others or {}).items() if r]
    six = checks[5]
    pictures = study_pictures(summary, six["pairs"], math.nan if six["rho"] is None else six["rho"], tasks,
                              strategies, bases)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in pictures.items():
        img.save(out / name)
    format_lines = format_section(summary, tasks, bases)
    learnt_lines = learnt_section(runs, tasks, strategies, bases)
    (out / "study.md").write_text(study_markdown(tasks, rows, checks, pictures, notes, other_checks,
                                                 format_lines, learnt_lines))
    report = dict(about=about, tasks=tasks,
                  summary={f"{b}/{s}": numbers for (b, s), numbers in summary.items()},
                  task_pairs=[dict(similarity=x, relative_drop=y) for x, y in six["pairs"]],
                  spearman=six["rho"], permutation_p=six["p"], findings=checks,
                  orders={order: c for order, c in other_checks})
    (out / "study.json").write_text(json.dumps(report, indent=1))
    return rows


# running the study: its plan, its jobs

def orders_of(args):
    """The task orders the study runs -> {folder name: train.py --tasks}: --tasks alone, else --orders."""
    if args.tasks:
        return {args.tasks if args.tasks in args.orders.split(",") else "tasks": args.tasks}
    return {order: order for order in args.orders.split(",")}


def study_plan(args, names, bases, extra):
    """Every run of the study -> {(order, base, strategy, seed): (train.py flags, run folder, config)}.
    Raises runner.CLIError on bad input, before anything is written."""
    for b in bases:
        if b not in BASES:
            raise runner.CLIError(f"unknown base {b!r}; choose from {', '.join(BASES)}")
    for name in ("seeds", "jobs"):
        if getattr(args, name) < 1:
            raise runner.CLIError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for flag in extra:
        if flag.split("=")[0] in RESERVED:
            raise runner.CLIError(f"{flag} after -- is set by the study for each run; "
                                 "use --strategies, --bases, --seeds, --orders or --tasks")
    plan = {}
    for order, tasks in orders_of(args).items():
        for seed in range(args.seeds):
            for base in bases:
                for s in names:
                    run_dir = Path(args.out) / "runs" / order / base / s / f"seed{seed}"
                    flags = ["--threads", "1", *extra, "--tasks", tasks, "--strategy", s, "--base", base,
                             "--seed", str(seed), "--run-dir", str(run_dir)]
                    cfg, mcfg, scfg = runner.parse(flags)  # checks strategy, tasks and flags after --
                    config = dict(train=asdict(cfg), model=asdict(mcfg), strategy=asdict(scfg))
                    plan[order, base, s, seed] = flags, run_dir, config
    return plan


def finished(run_dir, config):
    """The run's results if this configuration made its results.json, else None: a killed study resumes."""
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else None
    return results if results and not runner.config_diff(results["config"], config, UNCOMPARED) else None


def train_run(flags):
    """One train.py run in its own Python, one thread, no progress bars -> the finished process."""
    return subprocess.run([sys.executable, str(Path(__file__).with_name("train.py")), *flags], text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def base_job(args, bases, extra, seed):
    """train.py flags that train a seed's base (the multitask one holds the pretrained stage): all of that
    seed's runs reuse it, in every order, so it is trained once, not by each base's first run side by side."""
    tasks = next(iter(orders_of(args).values()))  # every order has the same tasks, so the same tokenizer
    return ["--threads", "1", *extra, "--tasks", tasks, "--base", "multitask" if "multitask" in bases else
            bases[0], "--seed", str(seed), "--base-only", "--run-dir", str(Path(args.out) / "runs" / "bases")]


def naive_first(spec):
    """Does strategy `spec` train its first task as naive does, so that it may start from naive's?"""
    return strategies.build(spec, strategies.StrategyConfig()).naive_first


def study(args, names, bases, extra):
    """Train every (order, base, strategy, seed) not already finished, args.jobs at a time, then write the
    report -> exit code. Each seed's base is trained first, by a job of its own; that seed's runs start when
    it is cached (not when every base is). A strategy that trains its first task as naive does starts from
    naive's (train.py --first-task-from): the same bits, a task less to train (a test checks it)."""
    t0, out = time.time(), Path(args.out)
    try:
        plan = study_plan(args, names, bases, extra)
    except runner.CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = {k: r for k, (_, run_dir, config) in plan.items() if (r := finished(run_dir, config))}
    todo, failed = [k for k in plan if k not in runs], []
    print(f"study: {len(plan)} runs, {len(runs)} reused, {len(todo)} to train with {args.jobs} jobs, "
          f"in {out}")
    bar = tqdm(total=len(plan), initial=len(runs), desc="study", unit="run")
    waiting = {}  # naive's run -> the runs that start from its first task, once it has finished

    def submit(key, naive=None):  # naive: the finished naive run whose first task this run takes
        more = ["--first-task-from", str(plan[naive][1])] if naive in runs else []
        jobs[pool.submit(train_run, plan[key][0] + more)] = key

    def release(seed):  # the seed's base is cached: its runs may start, some after naive's
        for key in [k for k in todo if k[3] == seed]:
            naive = (*key[:2], "naive", seed)
            if key == naive or not args.share_first_task or naive not in plan or not naive_first(key[2]):
                submit(key)
            elif naive in runs:
                submit(key, naive)
            else:
                waiting.setdefault(naive, []).append(key)
    with bar, ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(train_run, base_job(args, bases, extra, seed)): ("base", seed)
                for seed in sorted({k[3] for k in todo})}
        while jobs:
            for job in wait(jobs, return_when=FIRST_COMPLETED).done:
                key, proc = jobs.pop(job), job.result()
                if key[0] == "base" and proc.returncode == 0:  # cached now: the seed's runs may start
                    release(key[1])
                    bar.set_postfix_str(f"base of seed {key[1]}")
                    continue
                if key[0] == "base":  # every run of the seed would fail the same way: none is started
                    lost = [k for k in todo if k[3] == key[1]]
                    failed.append(f"the base of seed {key[1]} and its {len(lost)} runs")
                    why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                    tqdm.write(f"FAILED the base of seed {key[1]}, so its runs were not started: {why}",
                               file=sys.stderr)
                    bar.update(len(lost))
                    continue
                (order, b, s, seed) = key
                name = f"{b}/{s}/seed{seed}"
                if proc.returncode == 0:
                    runs[key] = json.loads((plan[key][1] / "results.json").read_text())
                else:
                    failed.append(f"{name} ({order} order)")
                    tqdm.write(f"FAILED {name} (exit {proc.returncode}) in the {order} order; its stderr "
                               "ends:\n  "
                               + "\n  ".join(proc.stderr.strip().splitlines()[-12:]), file=sys.stderr)
                for other in waiting.pop(key, []):  # from naive's first task, or (if it failed) on their own
                    submit(other, key)
                bar.set_postfix_str(name)
                bar.update()
    if runs:
        notes = ["Seed 0." if args.seeds == 1 else f"Seeds 0..{args.seeds - 1}.",
                 f"train.py flags: `{' '.join(extra) or '(defaults)'}`.",
                 f"Wall time {time.time() - t0:.0f} s "
                 f"({len(todo)} runs trained, {len(plan) - len(todo)} reused)."]
        if failed:
            notes.append(f"Failed: {', '.join(failed)}.")
        by_order = {order: {k[1:]: r for k, r in runs.items() if k[0] == order} for order in orders_of(args)}
        first_order, *others = [order for order, r in by_order.items() if r]
        rows = write_report(out, by_order[first_order], names, bases, notes,
                            {order: by_order[order] for order in others}, about(args, extra, t0, runs))
        print(format_table(rows) + f"\nwrote {out}/study.md, study.json and pictures")
    print(f"study: {len(runs)} of {len(plan)} runs finished, {len(plan) - len(runs)} failed, "
          f"wall time {time.time() - t0:.0f} s")
    return 1 if failed else 0


def about(args, extra, t0, runs):
    """How the study was made, for RESULTS.md: the command, the machine, the code and the wall time."""
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "write_results"
             and v is not None and not isinstance(v, bool)]
    flags += [f"--{'' if args.share_first_task else 'no-'}share-first-task"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    r = next(iter(runs.values()))
    return dict(command=" ".join(["python study.py", *flags] + (["--", *extra] if extra else [])),
                machine=f"{platform.machine()}, {os.cpu_count()} cores, {r.get('device')}, "
                f"torch {r.get('torch')}, Python {platform.python_version()}", commit=commit or "unknown",
                wall_seconds=round(time.time() - t0))


def write_results(folder, path):
    """RESULTS.md from a finished study folder: how it was made, then its study.md without the pictures,
    which stay in the folder -> exit code."""
    folder, path = Path(folder), Path(path)
    try:
        report, md = json.loads((folder / "study.json").read_text()), (folder / "study.md").read_text()
    except (OSError, ValueError):
        print(f"error: {folder} holds no finished study (study.json and study.md); run python study.py "
              f"--out {folder} first", file=sys.stderr)
        return 2
    made = report.get("about") or {}
    body = md.split("\n## Pictures")[0].split("\n", 1)[1].strip()  # without its title and its pictures
    text = "\n".join([
        "# nanoCIT results", "",
        f"Written by `python study.py --out {folder} --write-results {path}` from a finished study, never by "
        "hand. The study was made by", "", f"    {made.get('command', '(not recorded)')}", "",
        f"on {made.get('machine', '(not recorded)')}, at commit {made.get('commit', '(not recorded)')}, in "
        f"{made.get('wall_seconds', '?')} s of wall time. Its pictures are in {folder}.", "", body, ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(text))
    print(f"wrote {path} from {folder}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(
        description="Train every strategy from every base and write the paper's table, findings and figures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="flags after -- go to every train.py run:\n"
        "  python study.py --strategies naive,replay --tasks classify,count -- --steps 20 --base-steps 20\n"
        "a run folder already holding results.json from the same configuration is reused, so a killed study "
        "resumes")
    ap.add_argument("--strategies", default=",".join([*strategies.STRATEGIES, "replay+tir"]),
                    help="a comma list (default: all, and replay+tir)")
    ap.add_argument("--bases", default=",".join(BASES), help="a comma list of train.py --base values")
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds 0..N-1; cells are mean ± std, verdicts per seed")
    ap.add_argument("--jobs", type=int, default=2, help="train.py runs at once, one CPU thread each")
    ap.add_argument("--orders", default="paper",
                    help="task orders (data.ORDERS names): the first makes the table, the others test "
                    "it, e.g. paper,easy-first (twice the runs)")
    ap.add_argument("--tasks", help="one train.py --tasks for every run instead of --orders")
    ap.add_argument("--share-first-task", action=argparse.BooleanOptionalAction, default=True,
                    help="strategies that train their first task as naive does start from naive's "
                    "(the same bits)")
    ap.add_argument("--out", default="runs/study",
                    help="where the runs, study.md, study.json and pictures go")
    ap.add_argument("--write-results", metavar="FILE",
                    help="write FILE (RESULTS.md) from the finished study in --out, train nothing")
    args = ap.parse_args(argv)
    if args.write_results:
        return write_results(args.out, args.write_results)
    return study(args, args.strategies.split(","), args.bases.split(","), extra)


if __name__ == "__main__":
    sys.exit(main())
