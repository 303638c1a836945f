"""What you look at: heatmaps, charts and tables drawn with Pillow alone (a frame with a y axis, then bars or
points in it), the comparison of runs, and the study's written report: study.md and RESULTS.md.

    python report.py runs/replay                       # reprint a run's report
    python report.py --compare runs/naive runs/replay  # runs side by side: table.md, table.png in --out
    heatmap(tasks, A, title).save("accuracy.png")      # train.py draws every run's matrices so
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import eval as ev
from data import atomic_write
from eval import LEARNT, format_report

BASE_COLORS = {"pretrained": (31, 119, 180), "multitask": (214, 39, 40)}  # one colour per base in every chart


def heatmap(tasks, A, title="", rows="after {}", note="columns: task evaluated"):
    """Draw the accuracy matrix (or any task x task grid of 0-100) with Pillow: white 0, dark green 100."""
    side, left, top = 44, 110, 40
    img = Image.new("RGB", (left + side * len(tasks) + 10, top + side * len(A) + 70), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=11)
    draw.text((8, 8), title, fill="black", font=ImageFont.load_default(size=13))
    for i, row in enumerate(A):
        draw.text((left - 6, top + i * side + side / 2), rows.format(tasks[i])[:16], fill="black", font=font,
                  anchor="rm")
        for j, a in enumerate(row):
            if a is None:  # undefined, e.g. content where no answer had the right format
                x, y = left + j * side + side / 2, top + i * side + side / 2
                draw.text((x, y), "-", fill="gray", font=font, anchor="mm")
                continue
            g = min(max(a / 100, 0), 1)  # the colour's scale; the number says the rest
            color = (int(255 - 215 * g), int(255 - 110 * g), int(255 - 195 * g))
            x, y = left + j * side, top + i * side
            draw.rectangle([x, y, x + side - 2, y + side - 2], fill=color)
            draw.text((x + side / 2, y + side / 2), f"{a:.0f}", font=font, anchor="mm",
                      fill="white" if g > 0.6 else "black")
    for j, t in enumerate(tasks):
        x, y = left + j * side + side / 2, top + len(A) * side + 6
        draw.text((x, y), t[:7], fill="black", font=font, anchor="mt")
    draw.text((left, top + len(A) * side + 28), note, fill="gray", font=font)
    return img


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


def human_bytes(n):
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# charts: a frame with a y axis, then bars or points in it

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
        draw.rectangle([x, TOP + PLOT_H + 42, x + 8, TOP + PLOT_H + 50], fill=BASE_COLORS[name])
        draw.text((x + 12, TOP + PLOT_H + 40), f"{name} base", fill=BASE_COLORS[name], font=font)
        x += 24 + font.getlength(f"{name} base")
    return img, draw, to_y


def bar_chart(values, groups, title, ylabel):
    """{(group, base): [values over seeds]} -> bars grouped by strategy, a colour per base, std whiskers."""
    bases = [b for b in BASE_COLORS if any((g, b) in values for g in groups)]
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
                draw.rectangle([x, y[0], x + bar - 2, y[1]], fill=BASE_COLORS[base])
                if len(v) > 1:
                    m, s = statistics.fmean(v), statistics.stdev(v)
                    draw.line([x + bar / 2 - 1, to_y(m - s), x + bar / 2 - 1, to_y(m + s)], fill="black")
    return img


def scatter(points, title, xlabel, ylabel, bytes_x=False, legend=True):
    """[(x, y, label, base)] -> labelled points, a colour per base; bytes_x puts x (bytes) on a log scale."""
    xs = [math.log10(max(x, 1)) if bytes_x else x for x, *_ in points]
    bases = [b for b in BASE_COLORS if b in {base for *_, base in points} and legend]
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
        draw.ellipse([to_x(x) - 3, to_y(y) - 3, to_x(x) + 3, to_y(y) + 3], fill=BASE_COLORS[base])
        draw.text((to_x(x) + 5, to_y(y)), label, fill=BASE_COLORS[base], font=font, anchor="lm")
    return img


def tile(images, columns):
    """Paste images into a grid, row by row, on white."""
    w, h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (w * min(columns, len(images)), h * math.ceil(len(images) / columns)), "white")
    for k, img in enumerate(images):
        grid.paste(img, (w * (k % columns), h * (k // columns)))
    return grid


# comparing runs (python report.py --compare)

def comparison_rows(runs):
    """results.json dicts -> the comparison table as rows of strings, header first, best AA first.
    'trainable': what the last task trained; 'extra memory': what the strategy keeps beyond the model;
    'task ID': how often routing found the task."""
    routed = any("task_id_accuracy" in r for r in runs)
    rows = [["strategy", "AA", "BWT", "forgetting", "FWT", "trainable", "extra memory", "wall time"]
            + (["task ID"] if routed else [])]
    for r in sorted(runs, key=lambda r: -r["metrics"]["AA"]):
        m = r["metrics"]
        strategy = r["config"]["train"]["strategy"]
        row = [strategy, f"{m['AA']:.1f}", f"{m['BWT']:+.1f}", f"{m['forgetting']:.1f}",
               f"{m['FWT']:+.1f}", f"{r['timings'][-1]['trainable']:,}", human_bytes(r["extra_bytes"]),
               f"{r['wall_seconds']:.0f} s"]
        if routed:
            row.append(f"{r['task_id_accuracy']:.1f}" if "task_id_accuracy" in r else "-")
        rows.append(row)
    return rows


def format_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    def line(row):  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join(map(line, rows))


def markdown_table(rows):
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]) + "\n"


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


# the study's report (study.py writes it)

def mean_or_none(values):
    values = [v for v in values or () if v is not None]
    return statistics.fmean(values) if values else None


def mean_matrix(matrices):
    """The cell-wise mean over seeds; a cell undefined (None) in every seed stays None."""
    return [[mean_or_none(cells) for cells in zip(*rows)] for rows in zip(*matrices)]


def cell(values, fmt):
    """Values over seeds -> '74.7', or '74.7 ± 2.1' for several seeds; '-' for none."""
    if not values:
        return "-"
    text = human_bytes(statistics.fmean(values)) if fmt is None else fmt.format(statistics.fmean(values))
    return text + f" ± {statistics.stdev(values):.1f}" if len(values) > 1 and fmt else text


def rho_text(rho):
    return "ρ undefined (too few pairs, or a constant side)" if math.isnan(rho) else f"ρ = {rho:+.2f}"


def finding_text(check):
    """'per seed: holds, fails; naive BWT (pretrained) -40.0 [-52.1, -27.9] (p 0.004), ...; Holm-adjusted
    p 0.021 (the other way 1.000)': each number's mean, 95 % interval and one-sided p in the claimed direction
    (finding 6: its ρ per seed, then the permutation test of the seed-averaged pairs)."""
    def number(label, values):
        if label == "ρ" or label not in check["tests"]:
            return f"{label} {cell(values, '{:+.2f}' if label == 'ρ' else '{:+.1f}')}"
        mean, half, p = check["tests"][label]
        interval = "" if half is None else f" [{mean - half:+.1f}, {mean + half:+.1f}]"
        return f"{label} {mean:+.1f}{interval}" + ("" if p is None else f" (p {p:.3f})")
    seeds = ", ".join({True: "holds", False: "fails", None: "-"}[h] for h in check["per_seed"])
    text = f"per seed: {seeds}; " + ", ".join(number(*item) for item in check["differences"].items())
    if "n_pairs" in check:
        rho, p = check["rho"], check["p"]
        text += (f"; {rho_text(math.nan if rho is None else rho)} over the {check['n_pairs']} task pairs "
                 f"(i, j) of the seeds' mean grid with task i learnt (>= {LEARNT} %), one-sided Mantel "
                 + ("p undefined" if p is None else f"p {p:.3f}"))
    if check["p_holds_holm"] is not None:
        text += f"; Holm-adjusted p {check['p_holds_holm']:.3f} (the other way {check['p_fails_holm']:.3f})"
    return text


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
    if pairs:
        title = "Spearman " + rho_text(rho).replace("ρ", "rho")  # the bundled font has no ρ
        points = [(x, y, "", "pretrained") for x, y in pairs]  # one colour: pairs average over the bases
        pictures["task_pairs.png"] = scatter(points, title, "similarity of tasks i and j",
                                             "naive: drop in task i while j trains / A[i][i]", legend=False)
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


def seeds_can(n, findings):
    """What n seeds can show: how many of its seeds' standard deviations the clearest finding's mean must lie
    from 0 to hold after Holm's correction."""
    t = ev.t_quantile(1 - ev.ALPHA / findings, max(n - 1, 1))
    return "One seed gives no test: every finding is undecided." if n < 2 else (
        f"{n} seeds give the t-test {n - 1} degrees of freedom: the clearest finding holds only if its mean "
        f"lies {t / math.sqrt(n):.1f} standard deviations of its seeds from 0 (t = {t:.2f} at p = "
        f"{ev.ALPHA}/{findings}); a smaller effect, even of one sign on every seed, stays undecided: too few "
        "seeds to tell, which is no evidence that it is absent.")


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
    similarity = ("No task-pair experiment in pairs/ (python study.py --pairs), or no task learnt there: "
                  "finding 6 is not measured." if not six["n_pairs"] else
                  "Finding 6 takes the task-pair experiment (pairs/pairs.md): naive's drop in task i while "
                  "task j trains after it, relative to A[i][i], where task i was learnt (>= "
                  f"{LEARNT} %), against the similarity of i and j; each pair averaged over seeds and bases: "
                  f"{six['n_pairs']} pairs.")
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
         "Each number is a paired difference per seed: its mean, 95 % interval and one-sided p (a t-test "
         "over the seeds, in the claimed direction). A finding with several numbers takes the largest p; "
         f"finding 6 takes its permutation test. With Holm's correction across the {len(checks)}, a finding "
         f"*holds* at adjusted p < {ev.ALPHA}, *fails* where the other direction is that clear, and is "
         f"*undecided* otherwise. {seeds_can(len(checks[0]['per_seed']), len(checks))}", ""]
        + lines + ["", "## Is every task learnt?", "",
                   f"A task never learnt (below {LEARNT} right after its own training) cannot be forgotten, "
                   "so a strategy that leaves one unlearnt can look stable without being so.", ""]
        + list(learnt_lines) + ["", "## Task similarity and forgetting", "", similarity, "",
                   "## Forgetting taken apart: format and content", ""] + list(format_lines)
        + ["", "## Pictures", ""] + [f"![{name}]({name})" for name in pictures]) + "\n"


def write_results(folder, path):
    """RESULTS.md from a finished study folder: how it was made, its study.md, the sweep's sweep.md and the
    task pairs' pairs.md (study.py --sweep, --pairs), without the pictures, which stay there -> exit code."""
    folder, path = Path(folder), Path(path)
    try:
        report, md = json.loads((folder / "study.json").read_text()), (folder / "study.md").read_text()
    except (OSError, ValueError):
        print(f"error: {folder} holds no finished study (study.json and study.md); run python study.py "
              f"--out {folder} first", file=sys.stderr)
        return 2
    made = report.get("about") or {}
    body = md.split("\n## Pictures")[0].split("\n", 1)[1].strip()  # without its title and its pictures
    for part in (folder / "sweep" / "sweep.md", folder / "pairs" / "pairs.md"):  # if they ran
        if part.is_file():  # its tables, without its pictures
            body += "\n\n" + part.read_text().split("\n![")[0].strip()
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
    ap = argparse.ArgumentParser(description="Reprint a run's report, or compare runs side by side.")
    ap.add_argument("run_dir", nargs="?", help="a run folder written by train.py")
    ap.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="put these runs side by side in a table")
    ap.add_argument("--out", default="runs/compare", help="where --compare writes table.md and table.png")
    args = ap.parse_args(argv)
    if args.run_dir is None and not args.compare:
        ap.error("give a run folder, or --compare RUN_DIR ...")
    if args.compare:
        return compare(args.compare, args.out)
    path = Path(args.run_dir) / "results.json"
    if not path.is_file():
        print(f"error: no results.json in {args.run_dir}", file=sys.stderr)
        return 2
    print(format_report(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
