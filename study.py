"""The paper's study: every strategy from both bases (and several seeds), its table, findings and charts.

    python study.py                                    # every strategy x both bases, seed 0, 2 jobs
    python study.py --seeds 3 --strategies naive,replay,ewc -- --steps 200    # flags after -- go to train.py

Each run is one train.py process with one thread; a run folder already holding results.json from the same
configuration is reused, so a killed study resumes. The report (study.md, study.json, pictures) goes to
--out (runs/study). The findings checked are those of He et al. (arXiv 2311.16206); the task-pair
analysis ranks naive's forgetting against TIR's task similarity (Spearman).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import strategies
import train
from eval import format_table, heatmap, human_bytes, markdown_table

BASES = ("pretrained", "multitask")  # alignment only, and that base tuned jointly on the held-in tasks
COLORS = dict(zip(BASES, [(31, 119, 180), (214, 39, 40)]))  # one colour per base in every chart
RESERVED = ("--strategy", "--base", "--seed", "--run-dir", "--tasks")  # the study sets these for each run
UNCOMPARED = ("vocab_size", "run_dir", "cache_dir")  # set at run time, or paths: not what a run computes
# the table's (column, format); None: bytes, the same each seed
COLUMNS = [("AA", "{:.1f}"), ("BWT", "{:+.1f}"), ("forgetting", "{:.1f}"), ("FWT", "{:+.1f}"),
           ("task ID", "{:.1f}"), ("gain", "{:+.1f}"), ("extra memory", None), ("extra time", "{:+.0f} s")]


def ranks(xs):
    """1-based ranks; ties share the mean of the ranks they span: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    return [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]


def spearman(xs, ys):
    """Spearman's rank correlation: the Pearson correlation of the ranks. NaN when either side is constant."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(var) if var > 0 else math.nan


def task_pairs(A, similarity):
    """Each pair of tasks i < j -> (similarity of j to i, the drop in task i's accuracy while j trained)."""
    return [(similarity[j][i], A[j - 1][i] - A[j][i]) for j in range(1, len(A)) for i in range(j)]


def run_numbers(r, naive):
    """One run's results.json -> what the study reports; gain and extra time are over naive's run, if any."""
    seconds = sum(t["train_seconds"] for t in r["timings"])
    numbers = {k: r["metrics"][k] for k in ("AA", "BWT", "forgetting", "FWT")}
    numbers.update({"task ID": r.get("task_id_accuracy"), "extra memory": r["extra_bytes"],
                    "matrix": r["matrix"], "similarity": r.get("task_similarity")})
    if naive and naive is not r:
        numbers["gain"] = r["metrics"]["AA"] - naive["metrics"]["AA"]
        numbers["extra time"] = seconds - sum(t["train_seconds"] for t in naive["timings"])
    return numbers


def summarize(runs):
    """{(base, strategy, seed): results} -> {(base, strategy): {number: [one value per seed]}}."""
    summary = {}
    for (base, strategy, seed), r in runs.items():
        for k, v in run_numbers(r, runs.get((base, "naive", seed))).items():
            if v is not None:
                summary.setdefault((base, strategy), {}).setdefault(k, []).append(v)
    return summary


def mean_matrix(matrices):
    return [[statistics.fmean(cells) for cells in zip(*rows)] for rows in zip(*matrices)]


def cell(values, fmt):
    """Values over seeds -> '74.7', or '74.7 ± 2.1' for several seeds; '-' for none."""
    if not values:
        return "-"
    text = human_bytes(statistics.fmean(values)) if fmt is None else fmt.format(statistics.fmean(values))
    return text + f" ± {statistics.stdev(values):.1f}" if len(values) > 1 and fmt else text


def study_rows(summary, strategies, bases):
    """The study's table: one row per (strategy, base), header first; 'task ID' only if a strategy routes."""
    columns = [c for c in COLUMNS if c[0] != "task ID" or any("task ID" in n for n in summary.values())]
    return [["strategy", "base"] + [name for name, _ in columns]] + [
        [s, b] + [cell(summary[b, s].get(name), fmt) for name, fmt in columns]
        for s in strategies for b in bases if (b, s) in summary]


def rho_text(rho):
    return "ρ undefined (too few pairs, or a constant side)" if math.isnan(rho) else f"ρ = {rho:+.2f}"


def findings(summary, rho, n_pairs):
    """The paper's six findings, checked -> [(claim, True | False | None (not measured), numbers)]."""
    def per_base(strategy, key):  # {base: mean over seeds}, for the bases that have the number
        return {b: statistics.fmean(summary[b, strategy][key]) for b in BASES
                if summary.get((b, strategy), {}).get(key)}

    def show(strategy, key, values):
        sign = "+" if key in ("BWT", "gain") else ""
        return f"{strategy} {key} " + (", ".join(f"{v:{sign}.1f} ({b})" for b, v in values.items()) or "-")

    bwt, forget = per_base("naive", "BWT"), per_base("naive", "forgetting")
    gain = {s: per_base(s, "gain") for s in ("replay", "expansion", "ewc", "mas")}
    aa = {s: per_base(s, "AA") for s in ("tir", "ewc")}
    both = [g for g in (gain["ewc"], gain["mas"]) if len(g) == 2]  # a regulariser's gain from each base
    common = aa["tir"].keys() & aa["ewc"].keys()
    beat_naive = all(v > 0 for s in ("replay", "expansion") for v in gain[s].values())
    return [
        ("1. Sequential (naive) tuning forgets: BWT < 0", all(v < 0 for v in bwt.values()) if bwt else None,
         show("naive", "BWT", bwt)),
        ("2. The multitask base forgets less than the pretrained one (naive's forgetting)",
         forget["multitask"] < forget["pretrained"] if len(forget) == 2 else None,
         show("naive", "forgetting", forget)),
        ("3. Replay and expansion beat naive's AA from every base",
         beat_naive if gain["replay"] and gain["expansion"] else None,
         show("replay", "gain", gain["replay"]) + "; " + show("expansion", "gain", gain["expansion"])),
        ("4. Regularisation (EWC, MAS) gains more over naive from the multitask base "
         "than from the pretrained one",
         all(g["multitask"] > g["pretrained"] for g in both) if both else None,
         show("ewc", "gain", gain["ewc"]) + "; " + show("mas", "gain", gain["mas"])),
        ("5. TIR's AA ≥ EWC's", all(aa["tir"][b] >= aa["ewc"][b] for b in common) if common else None,
         show("tir", "AA", aa["tir"]) + "; " + show("ewc", "AA", aa["ewc"])),
        ("6. Similar tasks interfere less: Spearman ρ(similarity, forgetting) < 0",
         None if math.isnan(rho) else rho < 0, f"{rho_text(rho)} over {n_pairs} task pairs"),
    ]


# pictures: a frame with a y axis, then bars or points in it

PLOT_W, PLOT_H, LEFT, TOP = 380, 220, 64, 44  # plot area and the margins left of and above it


def span(values, zero=True):
    """A range holding every value (and 0), padded so no mark sits on the frame."""
    values = list(values) + [0] * zero
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 1
    return lo - pad, hi + pad


def ticks(lo, hi):
    """About five round values in [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    raw = (hi - lo) / 5
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def frame(title, ylabel, ys, width=PLOT_W, legend=()):
    """A blank chart: title, y axis spanning ys and 0, dashed line at 0, legend -> (img, draw, y -> pixel)."""
    y0, y1 = span(ys)
    img = Image.new("RGB", (LEFT + width + 20, TOP + PLOT_H + 56), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=11)

    def to_y(y):
        return TOP + (y1 - y) / (y1 - y0) * PLOT_H
    draw.text((8, 8), title, fill="black", font=ImageFont.load_default(size=13))
    draw.text((8, 26), ylabel, fill="dimgray", font=font)
    draw.rectangle([LEFT, TOP, LEFT + width, TOP + PLOT_H], outline="gray")
    for y in ticks(y0, y1):
        draw.line([LEFT - 4, to_y(y), LEFT, to_y(y)], fill="gray")
        draw.text((LEFT - 6, to_y(y)), f"{y:g}", fill="black", font=font, anchor="rm")
    for x in range(LEFT, LEFT + width - 4, 8):
        draw.line([x, to_y(0), x + 4, to_y(0)], fill="gray")
    x = 8
    for name in legend:  # a swatch and the name of each base
        draw.rectangle([x, TOP + PLOT_H + 42, x + 8, TOP + PLOT_H + 50], fill=COLORS[name])
        draw.text((x + 12, TOP + PLOT_H + 40), f"{name} base", fill=COLORS[name], font=font)
        x += 24 + font.getlength(f"{name} base")
    return img, draw, to_y


def bar_chart(values, groups, title, ylabel):
    """{(group, base): [values over seeds]} -> bars grouped by strategy, a colour per base, ± std whiskers."""
    bases = [b for b in BASES if any((g, b) in values for g in groups)]
    width = max(PLOT_W, 64 * len(groups))
    img, draw, to_y = frame(title, ylabel, [statistics.fmean(v) for v in values.values()], width, bases)
    slot, font = width / len(groups), ImageFont.load_default(size=11)
    bar = slot / (len(bases) + 1)
    for g, group in enumerate(groups):
        draw.text((LEFT + (g + 0.5) * slot, TOP + PLOT_H + 6), group, fill="black", font=font, anchor="mt")
        for k, base in enumerate(bases):
            if (group, base) in values:
                v, x = values[group, base], LEFT + g * slot + bar * (k + 0.5)
                y = sorted([to_y(statistics.fmean(v)), to_y(0)])
                draw.rectangle([x, y[0], x + bar - 2, y[1]], fill=COLORS[base])
                if len(v) > 1:
                    m, s = statistics.fmean(v), statistics.stdev(v)
                    draw.line([x + bar / 2 - 1, to_y(m - s), x + bar / 2 - 1, to_y(m + s)], fill="black")
    return img


def scatter(points, title, xlabel, ylabel, bytes_x=False):
    """[(x, y, label, base)] -> labelled points, a colour per base; bytes_x puts x (bytes) on a log scale."""
    xs = [math.log10(max(x, 1)) if bytes_x else x for x, *_ in points]
    bases = [b for b in BASES if b in {base for *_, base in points}]
    img, draw, to_y = frame(title, ylabel, [y for _, y, *_ in points], legend=bases)
    (x0, x1), font = span(xs, zero=not bytes_x), ImageFont.load_default(size=11)

    def to_x(x):
        return LEFT + (x - x0) / (x1 - x0) * PLOT_W
    if bytes_x:  # 1 KB, 10 KB, 100 KB, ... on a narrow range; else 1 KB, 1 MB
        steps = (1, 10, 100) if x1 - x0 < 3 else (1,)
        marks = [(math.log10(m * 1024 ** k), human_bytes(m * 1024 ** k)) for k in range(4) for m in steps]
    else:
        marks = [(x, f"{x:g}") for x in ticks(x0, x1)]
    for x, text in marks:
        if x0 <= x <= x1:
            draw.line([to_x(x), TOP + PLOT_H, to_x(x), TOP + PLOT_H + 4], fill="gray")
            draw.text((to_x(x), TOP + PLOT_H + 6), text, fill="black", font=font, anchor="mt")
    draw.text((LEFT + PLOT_W / 2, TOP + PLOT_H + 26), xlabel, fill="dimgray", font=font, anchor="mt")
    for x, (_, y, label, base) in zip(xs, points):
        draw.ellipse([to_x(x) - 3, to_y(y) - 3, to_x(x) + 3, to_y(y) + 3], fill=COLORS[base])
        draw.text((to_x(x) + 5, to_y(y)), label, fill=COLORS[base], font=font, anchor="lm")
    return img


def tile(images, columns):
    """Paste images into a grid, row by row, on white."""
    w, h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (w * min(columns, len(images)), h * math.ceil(len(images) / columns)), "white")
    for k, img in enumerate(images):
        grid.paste(img, (w * (k % columns), h * (k // columns)))
    return grid


def study_pictures(summary, pairs, rho, tasks, strategies, bases):
    """The study's charts -> {file name: image}."""
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
        matrices = [heatmap(tasks, mean_matrix(summary[b, s]["matrix"]), f"{s}, {b} base")
                    for s in strategies if (b, s) in summary]
        pictures[f"matrices-{b}.png"] = tile(matrices, 3)
        if "similarity" in summary.get((b, "tir"), {}):
            percent = [[100 * v for v in row] for row in mean_matrix(summary[b, "tir"]["similarity"])]
            pictures[f"similarity-{b}.png"] = heatmap(tasks, percent, f"task similarity x 100, {b} base",
                                                      rows="{}", note="measured by TIR")
    if pairs:
        title = "Spearman " + rho_text(rho).replace("ρ", "rho")  # the bundled font has no ρ
        points = [(x, y, "", b) for x, y, b in pairs]
        pictures["task_pairs.png"] = scatter(points, title, "similarity of task j to task i",
                                             "drop in task i while task j trains (naive)")
    return pictures


def study_markdown(tasks, rows, checks, rho, n_pairs, pictures, notes):
    verdict = {True: "holds", False: "does not hold", None: "not measured"}
    checked = [f"- [{'x' if holds else ' '}] {claim}: **{verdict[holds]}** ({numbers})"
               for claim, holds, numbers in checks]
    if n_pairs:
        similarity = (f"Spearman {rho_text(rho)} over {n_pairs} task pairs: naive's drop in task i while "
                      "task j trains (A[j-1][i] - A[j][i]) against TIR's similarity of j to i, pooled over "
                      "bases and seeds.")
    else:
        similarity = ("The study ran no tir (or no naive) run: no task similarity, so no similarity heatmap "
                      "and no task-pair analysis.")
    return "\n".join(
        ["# nanoCIT study", "", f"Tasks in order: {' -> '.join(tasks)}. " + " ".join(notes), "",
         markdown_table(rows),
         "AA, BWT, forgetting, FWT as in eval.py; *task ID*: how often routing found the task; *gain*: AA "
         "minus naive's from the same base and seed; *extra memory*: what the strategy keeps beyond the "
         "model; *extra time*: training seconds beyond naive's. Several seeds: mean ± std.", "",
         "## The paper's findings", ""]
        + checked + ["", "## Task similarity and forgetting", "", similarity, "", "## Pictures", ""]
        + [f"![{name}]({name})" for name in pictures]) + "\n"


def write_report(out, runs, strategies, bases, notes=()):
    """{(base, strategy, seed): finished results} -> study.md, study.json, pictures in out -> table rows."""
    out, summary, tasks = Path(out), summarize(runs), next(iter(runs.values()))["tasks"]
    strategies = [s for s in strategies if any((b, s) in summary for b in bases)]
    bases = [b for b in bases if any((b, s) in summary for s in strategies)]
    pairs = []  # (similarity, forgetting, base): each task pair of each naive run that has a tir twin
    for (base, s, seed), r in runs.items():
        if s == "naive" and (base, "tir", seed) in runs:
            similarity = runs[base, "tir", seed]["task_similarity"]
            pairs += [(x, y, base) for x, y in task_pairs(r["matrix"], similarity)]
    rho = spearman([x for x, _, _ in pairs], [y for _, y, _ in pairs]) if len(pairs) > 1 else math.nan
    checks, rows = findings(summary, rho, len(pairs)), study_rows(summary, strategies, bases)
    pictures = study_pictures(summary, pairs, rho, tasks, strategies, bases)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in pictures.items():
        img.save(out / name)
    (out / "study.md").write_text(study_markdown(tasks, rows, checks, rho, len(pairs), pictures, notes))
    report = dict(tasks=tasks, summary={f"{b}/{s}": numbers for (b, s), numbers in summary.items()},
                  task_pairs=[dict(similarity=x, forgetting=y, base=b) for x, y, b in pairs],
                  spearman=None if math.isnan(rho) else rho,
                  findings=[dict(claim=c, holds=h, numbers=n) for c, h, n in checks])
    (out / "study.json").write_text(json.dumps(report, indent=1))
    return rows


# the runner

def study_plan(args, names, bases, extra):
    """Every run of the study -> {(base, strategy, seed): (train.py flags, run folder, resolved config)}.
    Raises train.CLIError on bad input, before anything is written."""
    for b in bases:
        if b not in BASES:
            raise train.CLIError(f"unknown base {b!r}; choose from {', '.join(BASES)}")
    for name in ("seeds", "jobs"):
        if getattr(args, name) < 1:
            raise train.CLIError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for flag in extra:
        if flag.split("=")[0] in RESERVED:
            raise train.CLIError(f"{flag} after -- is set by the study for each run; "
                                 "use --strategies, --bases, --seeds or --tasks")
    plan = {}
    for seed in range(args.seeds):
        for base in bases:
            for s in names:
                run_dir = Path(args.out) / "runs" / base / s / f"seed{seed}"
                flags = ["--threads", "1", *extra, *(["--tasks", args.tasks] if args.tasks else []),
                         "--strategy", s, "--base", base, "--seed", str(seed), "--run-dir", str(run_dir)]
                cfg, mcfg, scfg = train.parse(flags)  # train.py checks the strategy, tasks and flags after --
                config = dict(train=asdict(cfg), model=asdict(mcfg), strategy=asdict(scfg))
                plan[base, s, seed] = flags, run_dir, config
    return plan


def finished(run_dir, config):
    """The run's results if this configuration made its results.json, else None: a killed study resumes."""
    def comparable(config):
        return {part: {k: v for k, v in values.items() if k not in UNCOMPARED}
                for part, values in config.items()}
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else None
    return results if results and comparable(results["config"]) == comparable(config) else None


def train_run(flags):
    """One train.py run in its own Python, one thread, no progress bars -> the finished process."""
    return subprocess.run([sys.executable, str(Path(__file__).with_name("train.py")), *flags], text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def study(args, names, bases, extra):
    """Train every (base, strategy, seed) not already finished, args.jobs at a time, then write the report ->
    exit code. The first run of each (base, seed) goes ahead of the rest: it trains the base they reuse, so
    they start when it ends (not when every base is trained). The two bases' first runs both train the
    pretrained stage, side by side: a minute of one core, which would otherwise wait."""
    t0, out = time.time(), Path(args.out)
    try:
        plan = study_plan(args, names, bases, extra)
    except train.CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = {k: r for k, (_, run_dir, config) in plan.items() if (r := finished(run_dir, config))}
    todo, first, failed = [k for k in plan if k not in runs], {}, []
    for b, s, seed in todo:
        first.setdefault((b, seed), (b, s, seed))
    print(f"study: {len(plan)} runs, {len(runs)} reused, {len(todo)} to train with {args.jobs} jobs, "
          f"in {out}")
    bar = tqdm(total=len(plan), initial=len(runs), desc="study", unit="run")
    with bar, ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(train_run, plan[k][0]): k for k in first.values()}
        while jobs:
            for job in wait(jobs, return_when=FIRST_COMPLETED).done:
                (b, s, seed), proc = jobs.pop(job), job.result()
                if first[b, seed] == (b, s, seed):  # its base is cached now: the rest of (b, seed) may start
                    jobs.update({pool.submit(train_run, plan[k][0]): k for k in todo
                                 if (k[0], k[2]) == (b, seed) and k != (b, s, seed)})
                if proc.returncode == 0:
                    runs[b, s, seed] = json.loads((plan[b, s, seed][1] / "results.json").read_text())
                else:
                    failed.append(f"{b}/{s}/seed{seed}")
                    tqdm.write(f"FAILED {failed[-1]} (exit {proc.returncode}); its stderr ends:\n  "
                               + "\n  ".join(proc.stderr.strip().splitlines()[-12:]), file=sys.stderr)
                bar.set_postfix_str(f"{b}/{s}/seed{seed}")
                bar.update()
    if runs:
        notes = ["Seed 0." if args.seeds == 1 else f"Seeds 0..{args.seeds - 1}.",
                 f"train.py flags: `{' '.join(extra) or '(defaults)'}`.",
                 f"Wall time {time.time() - t0:.0f} s "
                 f"({len(todo)} runs trained, {len(plan) - len(todo)} reused)."]
        if failed:
            notes.append(f"Failed: {', '.join(failed)}.")
        rows = write_report(out, runs, names, bases, notes)
        print(format_table(rows) + f"\nwrote {out}/study.md, study.json and pictures")
    print(f"study: {len(runs)} of {len(plan)} runs finished, {len(failed)} failed, "
          f"wall time {time.time() - t0:.0f} s")
    return 1 if failed else 0


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
    ap.add_argument("--strategies", default=",".join(strategies.STRATEGIES),
                    help="a comma list (default: all)")
    ap.add_argument("--bases", default=",".join(BASES), help="a comma list of train.py --base values")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1; cells are then mean ± std")
    ap.add_argument("--jobs", type=int, default=2, help="train.py runs at once, one CPU thread each")
    ap.add_argument("--tasks", help="train.py's --tasks for every run (default: train.py's)")
    ap.add_argument("--out", default="runs/study",
                    help="where the runs, study.md, study.json and pictures go")
    args = ap.parse_args(argv)
    return study(args, args.strategies.split(","), args.bases.split(","), extra)


if __name__ == "__main__":
    sys.exit(main())
