"""Pictures drawn with Pillow alone: heatmaps of task x task grids, bar charts, scatter plots and tables.

    heatmap(tasks, A, title).save("accuracy.png")    # train.py draws every run's matrices so

train.py draws each run's accuracy, format and content heatmaps; study.py its charts; eval.py --compare its
table. No plotting library: a frame with a y axis, then bars or points in it, in about a hundred lines.
"""
import math
import statistics

from PIL import Image, ImageDraw, ImageFont

BASE_COLORS = {"pretrained": (31, 119, 180), "multitask": (214, 39, 40)}  # one colour per base in every chart


def heatmap(tasks, A, title="", rows="after {}", note="columns: task evaluated"):
    """Draw the accuracy matrix (or any task x task grid of 0-100) with Pillow: white 0, dark green 100."""
    cell, left, top = 44, 110, 40
    img = Image.new("RGB", (left + cell * len(tasks) + 10, top + cell * len(A) + 70), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=11)
    draw.text((8, 8), title, fill="black", font=ImageFont.load_default(size=13))
    for i, row in enumerate(A):
        draw.text((left - 6, top + i * cell + cell / 2), rows.format(tasks[i])[:16], fill="black", font=font,
                  anchor="rm")
        for j, a in enumerate(row):
            if a is None:  # undefined, e.g. content where no answer had the right format
                x, y = left + j * cell + cell / 2, top + i * cell + cell / 2
                draw.text((x, y), "-", fill="gray", font=font, anchor="mm")
                continue
            g = a / 100
            color = (int(255 - 215 * g), int(255 - 110 * g), int(255 - 195 * g))
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=color)
            draw.text((x + cell / 2, y + cell / 2), f"{a:.0f}", font=font, anchor="mm",
                      fill="white" if g > 0.6 else "black")
    for j, t in enumerate(tasks):
        x, y = left + j * cell + cell / 2, top + len(A) * cell + 6
        draw.text((x, y), t[:7], fill="black", font=font, anchor="mt")
    draw.text((left, top + len(A) * cell + 28), note, fill="gray", font=font)
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
