"""The paper's study: every strategy from both bases, seeds and task orders; its table, findings and charts.

    python study.py                      # every strategy (and replay+tir) x both bases x 3 seeds, paper order
    python study.py --seeds 2 --strategies naive,replay,ewc --orders paper -- --steps 200   # -- to train.py
    python study.py --pairs                # the task-pair experiment (finding 6), into runs/study/pairs

Each run is one train.py process with one thread; a run folder already holding results.json from the same
configuration is reused, so a killed study resumes. The report (study.md, study.json, pictures, written by
report.py) goes to --out (runs/study). The findings checked are those of He et al. (arXiv 2311.16206), each
with its verdict on every seed and whether it survives the other task order. Finding 6 takes the task-pair
experiment (--pairs: naive's forgetting of each task while each other trains after it, against TIR's
task similarity; Spearman, with Mantel's permutation test). Forgetting is split into format and content.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

import torch

import runner
import strategies
import eval as ev
from eval import LEARNT
from report import cell, format_section, format_table, heatmap, learnt_section, markdown_table, mean_matrix
from report import mean_or_none, scatter, study_markdown, study_pictures, tile, write_results

# --sweep: each method's strength and the values tried (powers of ten; docs/methods.md) on a seed the study
# never reports, from the pretrained base. TIR takes EWC's λ, so that the two differ only by the similarity.
SWEEPS = {"ewc": ("ewc_lambda", (1e2, 1e3, 1e4, 1e5, 1e6)),
          "mas": ("mas_lambda", (1e-4, 1e-3, 0.01, 0.1, 1.0)), "lwf": ("lwf_alpha", (0.1, 0.3, 1.0, 3.0))}
VALIDATION_SEED = 100
# the table's (column, format); None: bytes, the same each seed
COLUMNS = [("AA", "{:.1f}"), ("learnt", "{:.1f}"), ("not learnt", "{:.1f}"), ("BWT", "{:+.1f}"),
           ("BWT learnt", "{:+.1f}"), ("forgetting", "{:.1f}"), ("FWT", "{:+.1f}"),
           ("FWT_random", "{:+.1f}"), ("format drop", "{:.1f}"), ("task ID", "{:.1f}"),
           ("oracle AA", "{:.1f}"), ("gain", "{:+.1f}"), ("extra memory", None), ("extra time", "{:+.0f} s")]


def pair_grids(runs, tasks):
    """--pairs' runs {(order, base, label, seed): a train.py --pair-first run's results} -> {(base, seed):
    (drop, similarity)}, T x T lists, for each base and seed whose every task ran. drop[j][i]: task i's
    relative drop while task j trains after it, (A_ii - A_ji) / A_ii; None on the diagonal and where task i
    was not learnt (A_ii < LEARNT: nothing to lose). similarity: eval.task_similarity of the tasks' features,
    whatever it measures."""
    found, grids = {}, {}
    for (_, base, _, seed), r in runs.items():
        found.setdefault((base, seed), {})[r["first"]] = r
    for key, run in ((key, found[key]) for key in sorted(found) if set(found[key]) == set(tasks)):
        alone = {t: run[t]["alone"]["acc"] for t in tasks}  # each task right after its own training
        drop = [[None if a == b or alone[a] < LEARNT else (alone[a] - run[a]["after"][b]["first"]) / alone[a]
                 for a in tasks] for b in tasks]  # row: b, the task tuned second; column: a, the first
        features = [[torch.tensor(f) for f in run[t]["features"]] for t in tasks]
        similarity = ev.task_similarity(features, run[tasks[0]]["config"]["strategy"]["tir_temperature"])
        grids[key] = drop, similarity.tolist()
    return grids


def pair_mean(grids, seed=None, base=None):
    """Grids' cell-wise mean over bases and seeds (or one seed's, one base's) -> (drop, similarity, the
    [(similarity, drop)] of every cell where drop is defined); empty where no grid is chosen."""
    chosen = [grid for (b, s), grid in grids.items() if seed in (None, s) and base in (None, b)]
    drop, similarity = (mean_matrix(m) for m in zip(*chosen)) if chosen else ([], [])
    return drop, similarity, [(similarity[j][i], d) for j, row in enumerate(drop) for i, d in enumerate(row)
                              if d is not None]


def pair_test(grids, **chosen):
    """Finding 6 on pair_mean(grids, **chosen) -> (ρ, Mantel p of ρ < 0, p of ρ > 0, [(similarity, drop)]);
    None where undefined (no grid, too few pairs, a constant side)."""
    drop, similarity, points = pair_mean(grids, **chosen)
    if len(points) < 2 or math.isnan(rho := ev.spearman(*zip(*points))):
        return None, None, None, points
    other = [[None if d is None else -d for d in row] for row in drop]
    return rho, ev.mantel_p(similarity, drop), ev.mantel_p(similarity, other), points


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


def summarize(runs):
    """{(base, strategy, seed): results} -> {(base, strategy): {number: [one value per seed, seed 0 first,
    whatever order the study's jobs finished in]}}."""
    summary = {}
    for (base, strategy, seed), r in sorted(runs.items(), key=lambda kv: kv[0][2]):
        for k, v in run_numbers(r, runs.get((base, "naive", seed))).items():
            if v is not None:
                summary.setdefault((base, strategy), {}).setdefault(k, []).append(v)
    return summary


def study_rows(summary, strategies, bases):
    """The study's table: one row per (strategy, base), header first; the columns some run has."""
    columns = [c for c in COLUMNS if any(c[0] in n for n in summary.values())]  # e.g. 'task ID' if one routes
    return [["strategy", "base"] + [name for name, _ in columns]] + [
        [s, b] + [cell(summary[b, s].get(name), fmt) for name, fmt in columns]
        for s in strategies for b in bases if (b, s) in summary]


def minus(x, y):
    return None if x is None or y is None else x - y


def finding_numbers(runs, seed, bases, grids):
    """One seed's runs (and grids: --pairs') -> per finding, {label: the number its verdict tests on that
    seed (None: not run)}."""
    def m(base, strategy, key):
        r = runs.get((base, strategy, seed))
        return r and r["metrics"][key]

    def gain(s, b):
        return minus(m(b, s, "AA"), m(b, "naive", "AA"))
    points, P, M = pair_mean(grids, seed=seed)[2], "pretrained", "multitask"
    rho = ev.spearman(*zip(*points)) if len(points) > 1 else math.nan
    return [{f"naive BWT ({b})": m(b, "naive", "BWT") for b in bases},
            {"naive forgetting, pretrained - multitask": minus(m(P, "naive", "forgetting"),
                                                               m(M, "naive", "forgetting"))},
            {f"{s} gain ({b})": gain(s, b) for s in ("replay", "expansion") for b in bases},
            {f"{s} gain, multitask - pretrained": minus(gain(s, M), gain(s, P)) for s in ("ewc", "mas")},
            {f"tir - ewc AA ({b})": minus(m(b, "tir", "AA"), m(b, "ewc", "AA")) for b in bases},
            {"ρ": None if math.isnan(rho) else rho}]


CLAIMS = [  # each finding, and the sign its numbers must have for it to hold: +1 above 0, -1 below
    ("1. Sequential (naive) tuning forgets: BWT < 0", -1),
    ("2. The multitask base forgets less than the pretrained one (naive's forgetting)", +1),
    ("3. Replay and expansion beat naive's AA from every base", +1),
    ("4. Regularisation (EWC, MAS) gains more over naive from the multitask base than from the pretrained "
     "one", +1),
    ("5. TIR's AA > EWC's", +1),
    ("6. Similar tasks interfere less: Spearman ρ(similarity, naive's relative drop) < 0", -1),
]


def findings(runs, bases, grids=None):
    """The paper's six findings on one task order's runs (finding 6 on --pairs' grids) -> [dict(claim,
    verdict, per_seed, differences, tests, p_holds, p_fails, ...)]. Each number of a finding is a paired
    difference per seed (its `differences`); its test (eval.paired_test: mean, 95 % half-width, one-sided p)
    is taken in the claimed direction. A finding with several numbers holds only if each does, so its p is
    the largest (an intersection-union test), and it fails if any one is significantly the other way (the
    smallest opposite p, times how many). Finding 6's p is Mantel's test of ρ over the task pairs' mean
    grid. Holm's correction across the findings, then: holds, fails, or undecided. per_seed: does every
    number have the claimed sign on that seed (None: not measured), for reading only."""
    seeds, grids = sorted({seed for _, _, seed in runs}), grids or {}
    numbers = [finding_numbers(runs, seed, bases, grids) for seed in seeds]  # [seed][finding] -> {label: v}
    checks = []
    for k, (claim, sign) in enumerate(CLAIMS):
        per_seed = [None if None in n[k].values() else all(sign * v > 0 for v in n[k].values())
                    for n in numbers]
        differences = {label: [n[k][label] for n in numbers if n[k][label] is not None]
                       for label in numbers[0][k]}
        tests = {label: ev.paired_test([sign * v for v in vs]) for label, vs in differences.items() if vs}
        ps = [p for _, _, p in tests.values()]
        measured = bool(tests) and len(tests) == len(differences)
        tested = measured and None not in ps  # one seed gives no test
        checks.append(dict(claim=claim, per_seed=per_seed, differences=differences, measured=measured,
                           tests={label: [sign * m, h, p] for label, (m, h, p) in tests.items()},
                           p_holds=max(ps) if tested else None,
                           p_fails=min(1.0, len(ps) * min(1 - p for p in ps)) if tested else None))
    rho, p, p_other, pairs = pair_test(grids)
    checks[5].update(rho=rho, p=p, n_pairs=len(pairs), pairs=pairs, measured=p is not None, p_holds=p,
                     p_fails=p_other)
    holds, fails = (ev.holm([c[key] for c in checks]) for key in ("p_holds", "p_fails"))
    for check, p_hold, p_fail in zip(checks, holds, fails):
        verdict = ("not measured" if not check["measured"] else "undecided" if p_hold is None else
                   "holds" if p_hold < ev.ALPHA else "fails" if p_fail < ev.ALPHA else "undecided")
        check.update(p_holds_holm=p_hold, p_fails_holm=p_fail, verdict=verdict)
    return checks


def write_report(out, runs, strategies, bases, notes=(), others=None, about=None):
    """{(base, strategy, seed): finished results} of the first task order, and {order: such runs} of the
    others -> study.md, study.json, pictures in out -> table rows. about: how the study was made."""
    out, summary, tasks = Path(out), summarize(runs), next(iter(runs.values()))["tasks"]
    strategies = [s for s in strategies if any((b, s) in summary for b in bases)]
    bases = [b for b in bases if any((b, s) in summary for s in strategies)]
    path = out / "pairs" / "pairs.json"  # the task-pair experiment's grids, if it ran (study.py --pairs)
    grids = {(g["base"], g["seed"]): (g["drop"], g["similarity"])
             for g in (json.loads(path.read_text()) if path.is_file() else [])}
    checks, rows = findings(runs, bases, grids), study_rows(summary, strategies, bases)
    other_checks = [(order, findings(r, bases, grids)) for order, r in (others or {}).items() if r]
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
                  spearman=six["rho"], mantel_p=six["p"], findings=checks,
                  orders={order: c for order, c in other_checks})
    (out / "study.json").write_text(json.dumps(report, indent=1))
    return rows


def write_pairs(out, runs, tasks):
    """--pairs' runs -> in out: pairs.json (each base and seed's grids, which the study's finding 6 reads),
    pairs.md and per base pairs-<base>.png: its similarity and drop heatmaps side by side, mean over seeds."""
    grids, rows = pair_grids(runs, tasks), [["base", "ρ", "p (ρ < 0)", "pairs"]]
    bases = sorted({b for b, _ in grids})

    def percent(grid):
        return [[None if v is None else 100 * v for v in row] for row in grid]
    out.mkdir(parents=True, exist_ok=True)
    for base in [*bases, None]:  # None: both
        rho, p, _, points = pair_test(grids, base=base)
        rows.append([base or "both", "-" if rho is None else f"{rho:+.2f}", "-" if p is None else f"{p:.3f}",
                     str(len(points))])
        if base:
            drop, similarity, _ = pair_mean(grids, base=base)
            tile([heatmap(tasks, percent(similarity), f"similarity x 100, {base} base", rows="{}", note=""),
                  heatmap(tasks, percent(drop), f"relative drop (%), {base} base", rows="then {}",
                          note="columns: the task tuned first")], 2).save(out / f"pairs-{base}.png")
    (out / "pairs.json").write_text(json.dumps([dict(base=b, seed=s, drop=d, similarity=m)
                                                for (b, s), (d, m) in grids.items()], indent=1))
    (out / "pairs.md").write_text("\n".join([
        "## Task pairs: does a similar task make naive forget less?", "",
        f"For every ordered pair of the {len(tasks)} tasks, naive tunes task i from the base, then j from "
        f"i's weights (train.py --pair-first); the drop is (A_ii - A_ji) / A_ii where i was learnt (A_ii >= "
        f"{LEARNT}). Similarity: eval.task_similarity on the base, as TIR measures it. Spearman ρ over the "
        f"pairs of the grid's mean over {len({s for _, s in grids})} seeds, with Mantel's test (the tasks "
        "relabelled: the pairs of one task are not independent).", "", markdown_table(rows),
        *(f"![pairs-{b}.png](pairs-{b}.png)" for b in bases), ""]))
    print(format_table(rows) + f"\nwrote {out}/pairs.md, pairs.json and pictures")


SWEEP_RULE = (f"the best AA among the values that learn every task (each diagonal entry >= {LEARNT}); if "
              "none does, the fewest tasks not learnt, then the best AA")  # fixed before any sweep ran


def write_sweep(out, runs, methods, extra):
    """{strategy label: results} of a sweep -> sweep.md, sweep.json, sweep.png in out: the table, each
    method's value by SWEEP_RULE (unlearnt: where it leaves a task unlearnt), a stability-plasticity chart."""
    rows, chosen, panels, unlearnt = [["method", "setting", "AA", "learnt", "not learnt", "BWT"]], {}, [], []
    for m in methods:
        option, values = SWEEPS[m]
        labels = {v: f"{m}@{option}={v:g}" for v in values}
        found = {v: run_numbers(runs[label], None) for v, label in labels.items() if label in runs}
        rows += [[m, f"{option} {v:g}", f"{n['AA']:.1f}", f"{n['learnt']:.1f}", str(n["not learnt"]),
                  f"{n['BWT']:+.1f}"] for v, n in found.items()]
        if found:
            chosen[m] = min(found, key=lambda v: (found[v]["not learnt"], -found[v]["AA"]))
            unlearnt += [m] if found[chosen[m]]["not learnt"] else []
            points = [(math.log10(v), n[key], key, "pretrained") for v, n in found.items()
                      for key in ("AA", "learnt", "BWT")]
            panels.append(scatter(points, f"{m}: stability and plasticity", f"log10 {option}", "points"))
    flags = " ".join(f"--{SWEEPS[m][0].replace('_', '-')} {v:g}" for m, v in chosen.items())
    out.mkdir(parents=True, exist_ok=True)
    if panels:
        tile(panels, 3).save(out / "sweep.png")
    (out / "sweep.md").write_text("\n".join([
        "## Strengths chosen on a validation seed", "",
        f"Seed {VALIDATION_SEED} (the study reports seeds from 0), pretrained base, scored on that seed's "
        f"test rows, whose layouts its training never saw; train.py flags `{' '.join(extra) or 'defaults'}`. "
        f"The rule, fixed before the sweep ran: {SWEEP_RULE}.", "", markdown_table(rows),
        f"Chosen: `{flags}`; TIR takes EWC's λ. Methods no value of which learns every task: "
        f"{', '.join(unlearnt) or 'none'}.",
        "", "![sweep.png](sweep.png)", ""]))
    (out / "sweep.json").write_text(json.dumps(dict(rows=rows, chosen=chosen, unlearnt=unlearnt), indent=1))
    print(format_table(rows) + f"\nchosen: {flags}\nwrote {out}/sweep.md, sweep.json and sweep.png")


# running the study: its plan, its jobs


def naive_first(spec):
    """Does strategy `spec` train its first task as naive does, so that it may start from naive's?"""
    return strategies.build(spec.split("@")[0], strategies.StrategyConfig()).naive_first


def study(args, names, bases, extra, seeds=None, write=None):
    """Train every (order, base, strategy, seed) not already finished, args.jobs at a time, then write the
    report (write(out, runs) instead, if given: the sweep's, the pairs') -> exit code. Each seed's base is
    trained first, by a job of its own; its runs start when it is cached. A strategy that trains its first
    task as naive does starts from naive's (train.py --first-task-from): the same bits, a task less to train
    (a test checks it)."""
    t0, out = time.time(), Path(args.out)
    try:
        plan = runner.study_plan(args, names, bases, extra, seeds)
    except runner.CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = {k: r for k, (_, run_dir, config) in plan.items() if (r := runner.finished(run_dir, config))}
    todo, failed = [k for k in plan if k not in runs], []
    print(f"study: {len(plan)} runs, {len(runs)} reused, {len(todo)} to train with {args.jobs} jobs, "
          f"in {out}")
    bar = tqdm(total=len(plan), initial=len(runs), desc="study", unit="run")
    waiting = {}  # naive's run -> the runs that start from its first task, once it has finished

    def submit(key, naive=None):  # naive: the finished naive run whose first task this run takes
        more = ["--first-task-from", str(plan[naive][1])] if naive in runs else []
        jobs[pool.submit(runner.train_run, plan[key][0] + more)] = key

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
        jobs = {pool.submit(runner.train_run, runner.base_job(args, bases, extra, seed)): ("base", seed)
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
    if runs and write:
        write(out, runs)
    elif runs:
        notes = ["Seed 0." if args.seeds == 1 else f"Seeds 0..{args.seeds - 1}.",
                 f"train.py flags: `{' '.join(extra) or '(defaults)'}`.",
                 f"Wall time {time.time() - t0:.0f} s "
                 f"({len(todo)} runs trained, {len(plan) - len(todo)} reused)."]
        if failed:
            notes.append(f"Failed: {', '.join(failed)}.")
        by_order = {order: {k[1:]: r for k, r in runs.items() if k[0] == order}
                    for order in runner.orders_of(args)}
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
    ap.add_argument("--bases", default=",".join(runner.BASES), help="a comma list of train.py --base values")
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds 0..N-1; cells are mean ± std; each finding is a paired test over the seeds")
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
    ap.add_argument("--sweep", metavar="METHODS", help=f"choose the strengths of these ({', '.join(SWEEPS)}) "
                    f"on seed {VALIDATION_SEED}, which the study never reports; writes <out>/sweep")
    ap.add_argument("--pairs", action="store_true", help="the task-pair experiment (8 + 56 task trainings a "
                    "seed and base, for 8 tasks) for finding 6; writes <out>/pairs, which the study reads")
    ap.add_argument("--write-results", metavar="FILE",
                    help="write FILE (RESULTS.md) from the finished study in --out, train nothing")
    args = ap.parse_args(argv)
    if args.write_results:
        return write_results(args.out, args.write_results)
    if args.sweep:
        methods = args.sweep.split(",")
        if set(methods) - set(SWEEPS):
            print(f"error: --sweep {args.sweep!r}: choose from {', '.join(SWEEPS)}", file=sys.stderr)
            return 2
        args.out = str(Path(args.out) / "sweep")
        labels = [f"{m}@{SWEEPS[m][0]}={v:g}" for m in methods for v in SWEEPS[m][1]]
        return study(args, ["naive", *labels], ["pretrained"], extra, [VALIDATION_SEED],
                     lambda out, runs: write_sweep(out, {k[2]: r for k, r in runs.items()}, methods, extra))
    if args.pairs:  # one order: a pair's drop does not depend on the order
        args.out, args.orders = str(Path(args.out) / "pairs"), args.orders.split(",")[0]
        tasks = runner.task_names(next(iter(runner.orders_of(args).values())))
        return study(args, [f"naive@pair_first={t}" for t in tasks], args.bases.split(","), extra,
                     write=lambda out, runs: write_pairs(out, runs, tasks))
    return study(args, args.strategies.split(","), args.bases.split(","), extra)


if __name__ == "__main__":
    sys.exit(main())
