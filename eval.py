"""Metrics over the accuracy matrix, answer scoring, reports and pictures.

A[i][j] is the accuracy (in %) on task j after training on task i; `base` is the row of the model
before any task. Definitions follow Lopez-Paz & Ranzato (2017) and Chaudhry et al. (2018), plus the
worst-drop BWT of He et al. (arXiv 2311.16206).
Run `python eval.py RUN_DIR` to reprint a run's report, `--checkpoint FILE` to re-evaluate one, and
`python eval.py --compare runs/*` to put runs side by side (table.md and table.png in --out, runs/compare).
`python eval.py --study` trains every strategy from both bases and writes the paper's table, its findings
and figures to runs/study (`--help` for seeds, jobs and flags passed on to train.py).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# metrics: pure functions of the matrix

def average_accuracy(A):
    """AA: mean accuracy over all tasks after the last one."""
    return sum(A[-1]) / len(A[-1])


def backward_transfer(A):
    """BWT: mean over earlier tasks of (final accuracy - accuracy right after learning it). < 0 = forgetting."""
    T = len(A)
    return sum(A[-1][j] - A[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0


def forgetting(A):
    """Mean over earlier tasks of (best accuracy it ever had - final accuracy)."""
    T = len(A)
    return sum(max(A[i][j] for i in range(j, T - 1)) - A[-1][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0


def forward_transfer(A, base):
    """FWT: mean over tasks 2..T of (zero-shot accuracy just before training it - the base model's)."""
    T = len(A)
    return sum(A[j - 1][j] - base[j] for j in range(1, T)) / (T - 1) if T > 1 else 0.0


def mean_average_accuracy(A):
    """MAA: the average accuracy over tasks seen so far, averaged over all stages."""
    return sum(sum(A[i][:i + 1]) / (i + 1) for i in range(len(A))) / len(A)


def worst_drop_bwt(A):
    """He et al.'s BWT: mean over earlier tasks of the worst (minimum) later accuracy minus the first."""
    T = len(A)
    return sum(min(A[i][j] - A[j][j] for i in range(j + 1, T)) for j in range(T - 1)) / (T - 1) if T > 1 else 0.0


def all_metrics(A, base):
    return dict(AA=average_accuracy(A), BWT=backward_transfer(A), forgetting=forgetting(A),
                FWT=forward_transfer(A, base), MAA=mean_average_accuracy(A), BWT_worst=worst_drop_bwt(A))


# ----------------------------------------------------------------------------------------------
# scoring one answer

def normalize(text):
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def exact_match(pred, ref):
    return float(normalize(pred) == normalize(ref))


def token_f1(pred, ref):
    """F1 of the word multisets, as in SQuAD: partial credit for partly right captions."""
    p, r = normalize(pred).split(), normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact": exact_match, "f1": token_f1}


# ----------------------------------------------------------------------------------------------
# reports

def _width(tasks):
    return min(9, max(6, max(len(t) for t in tasks) + 1))  # long names are cut to fit


def format_header(tasks):
    w = _width(tasks)
    return f"{'after':>14} " + "".join(f"{t[:w - 1]:>{w}}" for t in tasks) + f"{'mean':>{w}}"


def format_row(label, row, tasks):
    w = _width(tasks)
    return f"{label[:14]:>14} " + "".join(f"{a:>{w}.1f}" for a in row) + f"{sum(row) / len(row):>{w}.1f}"


def format_matrix(tasks, A, base=None):
    """The matrix as text: a header, the base row if given, then one row per training stage."""
    rows = ([format_row("base", base, tasks)] if base else []) + [format_row(tasks[i], r, tasks) for i, r in enumerate(A)]
    return "\n".join([format_header(tasks)] + rows)


def format_report(results):
    tasks, A, base = results["tasks"], results["matrix"], results.get("base_row")
    m = results.get("metrics") or all_metrics(A, base)
    lines = [f"strategy {results['config']['train']['strategy']}: accuracy (%) on each task (columns) after each stage (rows)",
             format_matrix(tasks, A, base), "",
             "  ".join(f"{k} {v:+.1f}" if k in ("BWT", "FWT", "BWT_worst") else f"{k} {v:.1f}" for k, v in m.items())]
    if "wall_seconds" in results:
        lines.append(f"wall time {results['wall_seconds']:.0f} s")
    return "\n".join(lines)


def heatmap(tasks, A, title="", rows="after {}", note="columns: task evaluated"):
    """Draw the accuracy matrix (or any task x task grid of 0-100) with Pillow: white = 0, dark green = 100."""
    cell, left, top = 44, 110, 40
    img = Image.new("RGB", (left + cell * len(tasks) + 10, top + cell * len(A) + 70), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=11)
    draw.text((8, 8), title, fill="black", font=ImageFont.load_default(size=13))
    for i, row in enumerate(A):
        draw.text((left - 6, top + i * cell + cell / 2), rows.format(tasks[i])[:16], fill="black", font=font,
                  anchor="rm")
        for j, a in enumerate(row):
            g = a / 100
            color = (int(255 - 215 * g), int(255 - 110 * g), int(255 - 195 * g))
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=color)
            draw.text((x + cell / 2, y + cell / 2), f"{a:.0f}", font=font, anchor="mm",
                      fill="white" if g > 0.6 else "black")
    for j, t in enumerate(tasks):
        draw.text((left + j * cell + cell / 2, top + len(A) * cell + 6), t[:7], fill="black", font=font, anchor="mt")
    draw.text((left, top + len(A) * cell + 28), note, fill="gray", font=font)
    return img


def human_bytes(n):
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def comparison_rows(runs):
    """results.json dicts -> the comparison table as rows of strings, header first, best AA first.

    'trainable' is what the last task trained; 'extra memory' is what the strategy keeps beyond the
    model (buffers, importances, experts, teachers); 'task ID' is how often routing found the task.
    """
    routed = any("task_id_accuracy" in r for r in runs)
    rows = [["strategy", "AA", "BWT", "forgetting", "FWT", "trainable", "extra memory", "wall time"]
            + (["task ID"] if routed else [])]
    for r in sorted(runs, key=lambda r: -r["metrics"]["AA"]):
        m = r["metrics"]
        row = [r["config"]["train"]["strategy"], f"{m['AA']:.1f}", f"{m['BWT']:+.1f}", f"{m['forgetting']:.1f}",
               f"{m['FWT']:+.1f}", f"{r['timings'][-1]['trainable']:,}", human_bytes(r["extra_bytes"]),
               f"{r['wall_seconds']:.0f} s"]
        rows.append(row + ([f"{r['task_id_accuracy']:.1f}" if "task_id_accuracy" in r else "-"] if routed else []))
    return rows


def format_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def markdown_table(rows):
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]) + "\n"


def table_image(rows, title):
    """The table drawn with Pillow, column by column (the bundled font is not monospaced)."""
    font, title_font, pad = ImageFont.load_default(size=13), ImageFont.load_default(size=14), 18
    widths = [max(font.getlength(row[i]) for row in rows) for i in range(len(rows[0]))]
    width = max(sum(widths) + pad * (len(widths) + 1), title_font.getlength(title) + 2 * pad)
    img = Image.new("RGB", (int(width), 50 + 20 * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 10), title, fill="black", font=title_font)
    for r, row in enumerate(rows):
        x = pad
        for i, (cell, w) in enumerate(zip(row, widths)):  # names left-aligned, numbers right-aligned
            draw.text((x if i == 0 else x + w, 38 + 20 * r), cell, font=font, anchor="la" if i == 0 else "ra",
                      fill="dimgray" if r == 0 else "black")
            x += w + pad
    return img


def compare(run_dirs, out):
    """Print the comparison of runs, and write it to out/table.md and out/table.png -> exit code."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if path.is_file():
            runs.append(json.loads(path.read_text()))
        else:
            print(f"skipping {d}: no results.json", file=sys.stderr)
    if not runs:
        print("error: none of the folders holds a results.json", file=sys.stderr)
        return 2
    if len({tuple(r["tasks"]) for r in runs}) > 1:
        print("warning: the runs trained different task lists; their numbers do not compare", file=sys.stderr)
    rows, out = comparison_rows(runs), Path(out)
    print(format_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table(rows))
    table_image(rows, f"tasks: {' -> '.join(runs[0]['tasks'])}").save(out / "table.png")
    print(f"wrote {out}/table.md and {out}/table.png")
    return 0


# ----------------------------------------------------------------------------------------------
# the study (--study): every strategy from every base, run by train.py, reported in one folder

BASES = ("pretrained", "multitask")  # the alignment-only base, and that base tuned jointly on the held-in tasks
COLORS = dict(zip(BASES, [(31, 119, 180), (214, 39, 40)]))  # one colour per base in every chart
RESERVED = ("--strategy", "--base", "--seed", "--run-dir", "--tasks")  # the study sets these for each run
UNCOMPARED = ("vocab_size", "run_dir", "cache_dir")  # set at run time, or where files go: not what a run computes
COLUMNS = [("AA", "{:.1f}"), ("BWT", "{:+.1f}"), ("forgetting", "{:.1f}"), ("FWT", "{:+.1f}"), ("task ID", "{:.1f}"),
           ("gain", "{:+.1f}"), ("extra memory", None), ("extra time", "{:+.0f} s")]  # None: bytes, the same each seed


def ranks(xs):
    """1-based ranks; tied values share the mean of the ranks they span: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    return [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]


def spearman(xs, ys):
    """Spearman's rank correlation: the Pearson correlation of the ranks. NaN when either side is constant."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(var) if var > 0 else math.nan


def task_pairs(A, similarity):
    """Each pair of tasks i < j -> (similarity of j to i, the drop in task i's accuracy while task j trained)."""
    return [(similarity[j][i], A[j - 1][i] - A[j][i]) for j in range(1, len(A)) for i in range(j)]


def run_numbers(r, naive):
    """One run's results.json -> what the study reports; gain and extra time are over naive's run, if any."""
    seconds = sum(t["train_seconds"] for t in r["timings"])
    numbers = {k: r["metrics"][k] for k in ("AA", "BWT", "forgetting", "FWT")}
    numbers.update({"task ID": r.get("task_id_accuracy"), "extra memory": r["extra_bytes"], "matrix": r["matrix"],
                    "similarity": r.get("task_similarity")})
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
    """The paper's six findings checked on the numbers -> [(claim, True | False | None (not measured), numbers)]."""
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
    return [
        ("1. Sequential (naive) tuning forgets: BWT < 0", all(v < 0 for v in bwt.values()) if bwt else None,
         show("naive", "BWT", bwt)),
        ("2. The multitask base forgets less than the pretrained one (naive's forgetting)",
         forget["multitask"] < forget["pretrained"] if len(forget) == 2 else None, show("naive", "forgetting", forget)),
        ("3. Replay and expansion beat naive's AA from every base",
         all(v > 0 for s in ("replay", "expansion") for v in gain[s].values()) if gain["replay"] and gain["expansion"]
         else None, show("replay", "gain", gain["replay"]) + "; " + show("expansion", "gain", gain["expansion"])),
        ("4. Regularisation (EWC, MAS) gains more over naive from the multitask base than from the pretrained one",
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
    """A blank chart: title, a y axis spanning ys and 0, a dashed line at 0, a legend -> (img, draw, y -> pixel)."""
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
    """{(group, base): [values over seeds]} -> bars grouped by strategy, one colour per base, ± std whiskers."""
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
    """[(x, y, label, base)] -> labelled points, one colour per base; bytes_x puts x (bytes) on a log scale."""
    xs = [math.log10(max(x, 1)) if bytes_x else x for x, *_ in points]
    bases = [b for b in BASES if b in {base for *_, base in points}]
    img, draw, to_y = frame(title, ylabel, [y for _, y, *_ in points], legend=bases)
    (x0, x1), font = span(xs, zero=not bytes_x), ImageFont.load_default(size=11)

    def to_x(x):
        return LEFT + (x - x0) / (x1 - x0) * PLOT_W
    steps = (1, 10, 100) if x1 - x0 < 3 else (1,)  # 1 KB, 10 KB, 100 KB, ... on a narrow range; else 1 KB, 1 MB
    marks = ([(math.log10(m * 1024 ** k), human_bytes(m * 1024 ** k)) for k in range(4) for m in steps] if bytes_x
             else [(x, f"{x:g}") for x in ticks(x0, x1)])
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
        return [(statistics.fmean(n[key]), statistics.fmean(n["gain"]), s, b) for (b, s), n in summary.items()
                if s != "naive" and "gain" in n]
    gain = "gain in AA over naive (points)"
    pictures = {"aa_bwt.png": tile([bar_chart(metric("AA"), strategies, "final average accuracy", "AA (%)"),
                                    bar_chart(metric("BWT"), strategies, "backward transfer (< 0: forgetting)",
                                              "BWT (points)")], 1)}
    if cost("extra time"):
        pictures["cost_benefit.png"] = tile([
            scatter(cost("extra memory"), "does memory pay for itself?", "extra memory (log scale)", gain, True),
            scatter(cost("extra time"), "does compute pay for itself?", "extra training time (s)", gain)], 2)
    for b in bases:
        pictures[f"matrices-{b}.png"] = tile([heatmap(tasks, mean_matrix(summary[b, s]["matrix"]), f"{s}, {b} base")
                                              for s in strategies if (b, s) in summary], 3)
        if "similarity" in summary.get((b, "tir"), {}):
            percent = [[100 * v for v in row] for row in mean_matrix(summary[b, "tir"]["similarity"])]
            pictures[f"similarity-{b}.png"] = heatmap(tasks, percent, f"task similarity x 100, {b} base", "{}",
                                                      "measured by TIR")
    if pairs:
        title = "Spearman " + rho_text(rho).replace("ρ", "rho")  # the bundled font has no ρ
        pictures["task_pairs.png"] = scatter([(x, y, "", b) for x, y, b in pairs], title,
                                             "similarity of task j to task i", "drop in task i while task j trains (naive)")
    return pictures


def study_markdown(tasks, rows, checks, rho, n_pairs, pictures, notes):
    verdict = {True: "holds", False: "does not hold", None: "not measured"}
    return "\n".join(
        ["# nanoCIT study", "", f"Tasks in order: {' -> '.join(tasks)}. " + " ".join(notes), "", markdown_table(rows),
         "AA, BWT, forgetting, FWT as in eval.py; *task ID*: how often routing found the task; *gain*: AA minus "
         "naive's from the same base and seed; *extra memory*: what the strategy keeps beyond the model; *extra "
         "time*: training seconds beyond naive's. Several seeds: mean ± std.", "", "## The paper's findings", ""]
        + [f"- [{'x' if holds else ' '}] {claim}: **{verdict[holds]}** ({numbers})" for claim, holds, numbers in checks]
        + ["", "## Task similarity and forgetting", "",
           f"Spearman {rho_text(rho)} over {n_pairs} task pairs: naive's drop in task i while task j trains "
           "(A[j-1][i] - A[j][i]) against TIR's similarity of j to i, pooled over bases and seeds." if n_pairs else
           "The study ran no tir (or no naive) run: no task similarity, so no similarity heatmap and no task-pair "
           "analysis.", "", "## Pictures", ""] + [f"![{name}]({name})" for name in pictures]) + "\n"


def write_report(out, runs, strategies, bases, notes=()):
    """Finished runs {(base, strategy, seed): results} -> study.md, study.json and pictures in out -> table rows."""
    out, summary, tasks = Path(out), summarize(runs), next(iter(runs.values()))["tasks"]
    strategies = [s for s in strategies if any((b, s) in summary for b in bases)]
    bases = [b for b in bases if any((b, s) in summary for s in strategies)]
    pairs = [(x, y, base) for (base, s, seed), r in runs.items() if s == "naive" and (base, "tir", seed) in runs
             for x, y in task_pairs(r["matrix"], runs[base, "tir", seed]["task_similarity"])]
    rho = spearman([x for x, _, _ in pairs], [y for _, y, _ in pairs]) if len(pairs) > 1 else math.nan
    checks, rows = findings(summary, rho, len(pairs)), study_rows(summary, strategies, bases)
    pictures = study_pictures(summary, pairs, rho, tasks, strategies, bases)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in pictures.items():
        img.save(out / name)
    (out / "study.md").write_text(study_markdown(tasks, rows, checks, rho, len(pairs), pictures, notes))
    (out / "study.json").write_text(json.dumps(dict(
        tasks=tasks, summary={f"{b}/{s}": numbers for (b, s), numbers in summary.items()},
        task_pairs=[dict(similarity=x, forgetting=y, base=b) for x, y, b in pairs],
        spearman=None if math.isnan(rho) else rho, findings=[dict(claim=c, holds=h, numbers=n) for c, h, n in checks]),
        indent=1))
    return rows


# the runner

def study_plan(args, names, bases, extra):
    """Every run of the study -> {(base, strategy, seed): (train.py flags, run folder, the config they resolve to)}.
    Raises train.CLIError on bad input, before anything is written."""
    import train  # here, not at the top: train.py imports this module
    for b in bases:
        if b not in BASES:
            raise train.CLIError(f"unknown base {b!r}; choose from {', '.join(BASES)}")
    for name in ("seeds", "jobs"):
        if getattr(args, name) < 1:
            raise train.CLIError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for flag in extra:
        if flag.split("=")[0] in RESERVED:
            raise train.CLIError(f"{flag} after -- is set by the study for each run; use --strategies, --bases, "
                                 "--seeds or --tasks")
    plan = {}
    for seed in range(args.seeds):
        for base in bases:
            for s in names:
                run_dir = Path(args.out) / "runs" / base / s / f"seed{seed}"
                flags = ["--threads", "1", *extra, *(["--tasks", args.tasks] if args.tasks else []),
                         "--strategy", s, "--base", base, "--seed", str(seed), "--run-dir", str(run_dir)]
                cfg, mcfg, scfg = train.parse(flags)  # train.py checks the strategy, the tasks, the flags after --
                plan[base, s, seed] = flags, run_dir, dict(train=asdict(cfg), model=asdict(mcfg), strategy=asdict(scfg))
    return plan


def finished(run_dir, config):
    """The run's results if its results.json was made by this configuration (so a killed study resumes), else None."""
    def comparable(config):
        return {part: {k: v for k, v in values.items() if k not in UNCOMPARED} for part, values in config.items()}
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
    import train
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
    print(f"study: {len(plan)} runs, {len(runs)} reused, {len(todo)} to train with {args.jobs} jobs, in {out}")
    bar = tqdm(total=len(plan), initial=len(runs), desc="study", unit="run")
    with bar, ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(train_run, plan[k][0]): k for k in first.values()}
        while jobs:
            for job in wait(jobs, return_when=FIRST_COMPLETED).done:
                (b, s, seed), proc = jobs.pop(job), job.result()
                if first[b, seed] == (b, s, seed):  # its base is in the cache now: the rest of (b, seed) may start
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
                 f"Wall time {time.time() - t0:.0f} s ({len(todo)} runs trained, {len(plan) - len(todo)} reused)."]
        rows = write_report(out, runs, names, bases, notes + [f"Failed: {', '.join(failed)}."] * bool(failed))
        print(format_table(rows) + f"\nwrote {out}/study.md, study.json and pictures")
    print(f"study: {len(runs)} of {len(plan)} runs finished, {len(failed)} failed, wall time {time.time() - t0:.0f} s")
    return 1 if failed else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(
        description="Reprint a run's report, re-evaluate a checkpoint, compare runs, or run the whole study.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="flags after -- go to every train.py run of "
        "--study:\n  python eval.py --study --strategies naive,replay --tasks classify,count -- --steps 20 "
        "--base-steps 20\na run folder already holding results.json from the same configuration is reused, so a "
        "killed study resumes")
    ap.add_argument("run_dir", nargs="?", help="a run folder written by train.py")
    ap.add_argument("--checkpoint", help="re-evaluate this checkpoint on every task of the run")
    ap.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="put these runs side by side in one table")
    ap.add_argument("--study", action="store_true", help="train every strategy from every base, one train.py per "
                    "run, and write study.md, study.json and pictures to --out")
    ap.add_argument("--strategies", help="--study: a comma list (default: every strategy in strategies.py)")
    ap.add_argument("--bases", default=",".join(BASES), help="--study: a comma list of train.py --base values")
    ap.add_argument("--seeds", type=int, default=1, help="--study: seeds 0..N-1; cells are then mean ± std")
    ap.add_argument("--jobs", type=int, default=2, help="--study: train.py runs at once, one CPU thread each")
    ap.add_argument("--tasks", help="--study: train.py's --tasks for every run (default: train.py's)")
    ap.add_argument("--out", help="where --compare (default runs/compare) or --study (default runs/study) writes")
    args = ap.parse_args(argv)
    if extra and not args.study:
        ap.error("flags after -- are for the train.py runs of --study")
    if args.study:
        import strategies  # here: it imports torch, which the other commands do not need
        names = args.strategies.split(",") if args.strategies is not None else list(strategies.STRATEGIES)
        args.out = args.out or "runs/study"
        return study(args, names, args.bases.split(","), extra)
    if args.compare:
        return compare(args.compare, args.out or "runs/compare")
    if args.run_dir is None:
        ap.error("give a run folder, or --compare RUN_DIR ...")
    path = Path(args.run_dir) / "results.json"
    if not path.is_file():
        print(f"error: no results.json in {args.run_dir}", file=sys.stderr)
        return 2
    results = json.loads(path.read_text())
    print(format_report(results))
    if args.checkpoint:
        import data
        import train  # imported here: train.py imports this module
        try:
            accs = train.reevaluate(args.run_dir, args.checkpoint)
        except (train.Stop, data.TaskFileError, RuntimeError) as e:  # damaged, foreign or another run's checkpoint
            print(f"error: {args.checkpoint}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"\nre-evaluated {args.checkpoint}:\n{format_header(results['tasks'])}\n"
              + format_row(Path(args.checkpoint).stem, accs, results["tasks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
