"""The benchmark: procedural scenes drawn with Pillow, eight instruction tasks and the base stages' tasks.

A scene is a few coloured shapes on a 3x3 grid, sometimes with a short string of glyphs in the
middle row. Each task asks its own kind of question about a scene, in the spirit of the datasets
that He et al. (arXiv 2311.16206) tune in sequence: ImageNet, VQAv2, GQA, TextVQA, RefCOCO, ...
Everything is a pure function of (task, split, seed), so two runs see the same pixels.
Run `python data.py` to print a few examples of every task. llava.py turns a task's (scene, instruction,
answer) triples into token rows and batches, and reads and writes tasks as LLaVA-format files.
"""
import argparse
import functools
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {"red": (225, 50, 50), "green": (50, 190, 70), "blue": (60, 100, 235),
          "yellow": (235, 215, 50), "purple": (165, 70, 210)}
SIZES = ("small", "large")
GLYPHS = "AEHKMPRTX347"  # upper case and digits only, so the tokenizer can split them one by one
ROWS, COLS = ("top", "middle", "bottom"), ("left", "middle", "right")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int   # 0..8, row-major over the 3x3 grid
    dx: int = 0  # pixel jitter, so that no two drawings of one layout are identical
    dy: int = 0


@dataclass(frozen=True)
class Scene:
    objects: tuple = ()
    text: str = ""  # glyphs drawn in the middle row, one per cell

    def key(self):
        """The layout without jitter: train and test never share a key."""
        return tuple(sorted((o.shape, o.color, o.size, o.cell) for o in self.objects)), self.text


def where(cell):
    """Grid cell -> 'top left', 'center', 'bottom middle', ..."""
    row, col = ROWS[cell // 3], COLS[cell % 3]
    return "center" if row == col == "middle" else f"{row} {col}"


@functools.lru_cache(maxsize=None)
def glyph_font(px):
    """Pillow's bundled font (no download) at px pixels, loaded once: loading it took a fifth of drawing."""
    return ImageFont.load_default(size=px)


def render(scene, size=48):
    """Draw a scene as a (3, size, size) uint8 array."""
    img = Image.new("RGB", (size, size), (24, 24, 28))
    draw, c = ImageDraw.Draw(img), size / 3  # c: the side of one grid cell in pixels
    for o in scene.objects:
        cx, cy = (o.cell % 3 + 0.5) * c + o.dx, (o.cell // 3 + 0.5) * c + o.dy
        r = c * (0.43 if o.size == "large" else 0.27)  # radius: large shapes nearly fill the cell
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # star: ten points alternating between the outer and an inner radius
            pts = [(cx + (r if i % 2 == 0 else r * 0.45) * np.sin(i * np.pi / 5),
                    cy - (r if i % 2 == 0 else r * 0.45) * np.cos(i * np.pi / 5)) for i in range(10)]
            draw.polygon(pts, fill=fill)
    for i, ch in enumerate(scene.text):
        draw.text(((i + 0.5) * c, 1.5 * c), ch, font=glyph_font(round(c * 0.9)), fill=(240, 240, 240),
                  anchor="mm", stroke_width=1, stroke_fill=(240, 240, 240))  # a bold stroke survives 16 px
    return np.asarray(img).transpose(2, 0, 1).copy()  # (H, W, 3) -> (3, H, W)


def random_objects(rng, n, cells=range(9), distinct=None, colors=tuple(COLORS)):
    """n objects in distinct cells; `distinct` = 'color' (or 'shape') makes that unique in the scene."""
    objs, seen = [], set()
    for cell in rng.sample(list(cells), n):
        while True:
            o = Obj(rng.choice(SHAPES), rng.choice(list(colors)), rng.choice(SIZES), cell,
                    rng.randint(-1, 1), rng.randint(-1, 1))
            tag = o.shape if distinct == "shape" else o.color
            if distinct is None or tag not in seen:
                seen.add(tag)
                objs.append(o)
                break
    return tuple(objs)


def some_objects(lo, hi, distinct=None):
    """A scene drawer: lo..hi random objects, anywhere (see random_objects for `distinct`)."""
    return lambda rng: Scene(random_objects(rng, rng.randint(lo, hi), distinct=distinct))


@dataclass
class Task:
    """One instruction task: how to draw a suitable scene, and how to ask about it.

    `scene(rng)` draws a scene, and `make(scene, rng)` returns (instruction, answer).
    `metric` is 'exact' (exact match) or 'f1' (token F1, for free-form text like captions).
    """
    name: str
    like: str       # the real dataset this task stands in for
    phrasings: tuple
    scene: object
    make: object
    metric: str = "exact"


def _classify(scene, rng):
    """'What object is this?' -> 'triangle'  (one object anywhere)"""
    return rng.choice(TASKS["classify"].phrasings), scene.objects[0].shape


def _attribute(scene, rng):
    """'What shape is the red object?' -> 'square'  (the colour asked about is unique)"""
    o = rng.choice(scene.objects)
    return rng.choice(TASKS["attribute"].phrasings).format(color=o.color), o.shape


def _count_scene(rng):
    """1-4 objects of one colour first, then up to 2 objects of other colours."""
    color, cells = rng.choice(list(COLORS)), rng.sample(range(9), 6)
    jitter = lambda: (rng.randint(-1, 1), rng.randint(-1, 1))  # ±1 px, as random_objects draws
    objs = [Obj(rng.choice(SHAPES), color, rng.choice(SIZES), c, *jitter())
            for c in cells[:rng.randint(1, 4)]]
    others = [c for c in COLORS if c != color]
    objs += [Obj(rng.choice(SHAPES), rng.choice(others), rng.choice(SIZES), c, *jitter())
             for c in cells[len(objs):len(objs) + rng.randint(0, 2)]]
    return Scene(tuple(objs))


def _count(scene, rng):
    """'How many red objects are there?' -> '2'  (0 to 4; usually asks about the first object's colour)"""
    absent = [c for c in COLORS if c not in {o.color for o in scene.objects}]
    color = scene.objects[0].color if rng.random() < 0.85 else rng.choice(absent)
    n = sum(o.color == color for o in scene.objects)
    return rng.choice(TASKS["count"].phrasings).format(color=color), str(n)


def _spatial_scene(rng):
    """1-3 objects of distinct colours, one of them at least off the center (the center has no side)."""
    while True:
        objs = random_objects(rng, rng.randint(1, 3), distinct="color")
        if any(o.cell != 4 for o in objs):
            return Scene(objs)


def _spatial(scene, rng):
    """'On which side of the image is the red object, left or right?' -> 'left'  (or 'top or bottom?')

    GQA's position questions in the choose form: the answer names the side. Only a side the object is on is
    asked: left/right not in the middle column, top/bottom not in the middle row. Two earlier forms, the
    relation of two objects ('Is the red object left or right of the blue one?') and its yes/no form, stayed
    near chance on most seeds (docs/benchmark.md): two lookups and a comparison in two layers."""
    o = rng.choice([o for o in scene.objects if o.cell != 4])
    x, y, answer = rng.choice(_axes(o))
    return rng.choice(TASKS["spatial"].phrasings).format(color=o.color, x=x, y=y), answer


def _axes(o):
    """The axes on which object o is on one side -> [(low side, high side, its side)]."""
    axes = []
    if o.cell % 3 != 1:
        axes.append(("left", "right", "left" if o.cell % 3 == 0 else "right"))
    if o.cell // 3 != 1:
        axes.append(("top", "bottom", "top" if o.cell // 3 == 0 else "bottom"))
    return axes


def _read_scene(rng):
    text = "".join(rng.choice(GLYPHS) for _ in range(3))
    return Scene(random_objects(rng, rng.randint(0, 2), cells=(0, 1, 2, 6, 7, 8)), text)


def _read(scene, rng):
    """'What is written here?' -> 'K7A'  (three glyphs in the middle row)"""
    return rng.choice(TASKS["read"].phrasings), scene.text


def _ground(scene, rng):
    """'Where is the green object?' -> 'top left'  (the colour asked about is unique)"""
    o = rng.choice(scene.objects)
    return rng.choice(TASKS["ground"].phrasings).format(color=o.color), where(o.cell)


def describe(o):
    place = "in the center" if o.cell == 4 else f"at the {where(o.cell)}"
    return f"a {o.size} {o.color} {o.shape} {place}"


def _caption(scene, rng):
    """'Describe the image.' -> 'a large red circle at the top left and a small blue square in the center.'"""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    return rng.choice(TASKS["caption"].phrasings), " and ".join(describe(o) for o in objs) + "."


def _unanswerable(scene, rng):
    """'If you can see a purple object, what shape is it?' -> 'unanswerable'  (half the time)"""
    present = [o.color for o in scene.objects]
    absent = [c for c in COLORS if c not in present]
    color = rng.choice(absent) if rng.random() < 0.5 else rng.choice(present)
    answer = next((o.shape for o in scene.objects if o.color == color), "unanswerable")
    return rng.choice(TASKS["unanswerable"].phrasings).format(color=color), answer


# Questions name objects by colour, not by shape: the tiny model learns to look for a colour in a
# few hundred steps, but not for a shape (docs/benchmark.md). The shapes are what it answers.
TASKS = {t.name: t for t in [
    Task("classify", "ImageNet", ("What object is this?", "What shape is shown?",
         "Name the object in the picture.", "Which shape do you see?"), some_objects(1, 1), _classify),
    Task("attribute", "VQAv2", ("What shape is the {color} object?", "Which shape is {color}?",
         "The {color} object has which shape?"), some_objects(1, 3, "color"), _attribute),
    Task("count", "TallyQA", ("How many {color} objects are there?", "Count the {color} objects.",
         "What is the number of {color} objects?"), _count_scene, _count),
    Task("spatial", "GQA", ("On which side of the image is the {color} object, {x} or {y}?",
         "Is the {color} object on the {x} or the {y}?", "Which side is the {color} object on, {x} or {y}?"),
         _spatial_scene, _spatial),
    Task("read", "TextVQA", ("What is written here?", "Read the text in the image.",
         "What does the text say?"), _read_scene, _read),
    Task("ground", "RefCOCO", ("Where is the {color} object?", "Locate the {color} object.",
         "In which part of the image is the {color} object?"), some_objects(1, 3, "color"), _ground),
    Task("caption", "Flickr30k", ("Describe the image.", "Write a short caption.",
         "What does this picture show?"), some_objects(1, 2), _caption, metric="f1"),
    Task("unanswerable", "VizWiz", ("What shape is the {color} object, if there is one?",
         "If you can see a {color} object, what shape is it?", "Is there a {color} object? Name its shape."),
         some_objects(1, 3, "color"), _unanswerable),
]}
ORDERS = {  # named task orders; 'paper' follows the spirit of the paper's sequence
    "paper": ("read", "classify", "spatial", "unanswerable", "ground", "attribute", "count", "caption"),
    "easy-first": ("classify", "attribute", "ground", "count", "spatial", "unanswerable", "read", "caption"),
}


# The mixed benchmark (--benchmark mixed): each task adds the other kinds of question its dataset holds, so
# answer forms recur across tasks. Phrasings use only the tokenizer's words (tested), none a held-in task's.
def _shape_check(scene, rng):
    """'Is the red object a star?' -> 'no'  (the shape asked is the object's half the time)"""
    o = rng.choice(scene.objects)
    shape = o.shape if rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != o.shape])
    question = rng.choice(MINOR_KINDS["shape check"].phrasings).format(color=o.color, shape=shape)
    return question, "yes" if shape == o.shape else "no"


def _how_many(scene, rng):
    """'Count the things in this image.' -> '3'  (every object: the scenes' colours are distinct)"""
    return rng.choice(MINOR_KINDS["how many"].phrasings), str(len(scene.objects))


def _side_check(scene, rng):
    """'Is the red object on the left?' -> 'yes'  (a side the object is on, or the opposite one)"""
    o = rng.choice([o for o in scene.objects if o.cell != 4])
    low, high, side = rng.choice(_axes(o))
    asked = rng.choice((low, high))
    question = rng.choice(MINOR_KINDS["side check"].phrasings).format(color=o.color, side=asked)
    return question, "yes" if asked == side else "no"


def _text_check(scene, rng):
    """'Is K7A written here?' -> 'yes'  (the scene's text half the time, else another)"""
    text = scene.text
    if rng.random() < 0.5:
        while text == scene.text:
            text = "".join(rng.choice(GLYPHS) for _ in range(3))
    question = rng.choice(MINOR_KINDS["text check"].phrasings).format(text=text)
    return question, "yes" if text == scene.text else "no"


def _colour_check(scene, rng):
    """'Is a purple thing in the picture?' -> 'no'  (present half the time)"""
    present = [o.color for o in scene.objects]
    color = rng.choice(present if rng.random() < 0.5 else [c for c in COLORS if c not in present])
    question = rng.choice(MINOR_KINDS["colour check"].phrasings).format(color=color)
    return question, "yes" if color in present else "no"


MINOR_KINDS = {t.name: t for t in [  # the scene is the task's own: no drawer of their own
    Task("shape check", "VQAv2 (yes/no)", ("Is the {color} object a {shape}?",
         "Is the {color} thing a {shape}?"), None, _shape_check),
    Task("how many", "VQAv2 (number)", ("Count the things in this image.",
         "What is the number of things here?"), None, _how_many),
    Task("side check", "GQA (yes/no)", ("Is the {color} object on the {side}?",
         "Is the {color} thing on the {side}?"), None, _side_check),
    Task("text check", "TextVQA (yes/no)", ("Is {text} written here?", "Is the text {text}?"), None,
         _text_check),
    Task("colour check", "VizWiz (yes/no)", ("Is a {color} thing in the picture?",
         "Is there anything {color} here?"), None, _colour_check),
]}
MINORS = {  # task -> (minor kind, share of its rows); the rest of its rows are its own kind
    "attribute": (("shape check", 0.25), ("how many", 0.15)), "spatial": (("side check", 0.3),),
    "read": (("text check", 0.2),), "unanswerable": (("colour check", 0.15), ("how many", 0.15)),
}


def mixed(task):
    """The task with its minor kinds (MINORS' shares). Its own question is drawn first, so a split draws the
    single benchmark's scenes, test layouts and bases; a generator of scene and question picks the kind."""
    kinds = MINORS.get(task.name, ())
    upto = list(itertools.accumulate(share for _, share in kinds))  # where each kind's share ends

    def make(scene, rng):
        question, answer = task.make(scene, rng)
        side = random.Random(f"{scene!r}|{question}")
        u = side.random()
        pick = next((kind for (kind, _), end in zip(kinds, upto) if u < end), None)
        return (question, answer) if pick is None else MINOR_KINDS[pick].make(scene, side)
    return Task(task.name, task.like, task.phrasings, task.scene, make, task.metric)


BENCHMARKS = {"single": TASKS, "mixed": {name: mixed(t) for name, t in TASKS.items()}}


def _exist(scene, rng):
    """'Is there a blue object in the image?' -> 'no'  (present half the time)"""
    present = [o.color for o in scene.objects]
    color = rng.choice(present if rng.random() < 0.5 else [c for c in COLORS if c not in present])
    return rng.choice(HELD_IN["exist"].phrasings).format(color=color), "yes" if color in present else "no"


def _about_one(name, answer):
    """make() of a held-in task: one of its phrasings about a random object o -> answer(o, scene)."""
    def make(scene, rng):
        o = rng.choice(scene.objects)
        question = rng.choice(HELD_IN[name].phrasings).format(color=o.color, where=where(o.cell))
        return question, answer(o, scene)
    return make


def _first(scene, rng):
    """'What is the first character of the text?' -> 'K'"""
    return rng.choice(HELD_IN["first"].phrasings), scene.text[0]


# The held-in tasks of the multitask base (train.py --base multitask). The paper's multitask base was tuned on
# a mixture before the continual sequence; here the same skills are asked in other words, with other answers.
HELD_IN = {t.name: t for t in [
    Task("exist", "VQAv2 (yes/no)", ("Is there a {color} object in the image?",
         "Do you see anything {color}?"), some_objects(1, 3, "color"), _exist),
    Task("colour", "GQA (attributes)", ("What colour is the object at the {where}?",
         "Name the colour of the thing in the {where}."), some_objects(1, 3),
         _about_one("colour", lambda o, s: o.color)),
    Task("size", "VQAv2 (size)", ("Is the {color} object large or small?", "How big is the {color} thing?"),
         some_objects(1, 3, "color"), _about_one("size", lambda o, s: o.size)),
    Task("total", "TallyQA (all)", ("How many objects does the picture contain?",
         "Tell me the total number of things."), some_objects(1, 4),
         _about_one("total", lambda o, s: str(len(s.objects)))),
    Task("first", "OCR-VQA", ("What is the first character of the text?",
         "Which symbol comes first in the writing?"), _read_scene, _first),
]}


def _align_scene(rng):
    text = "".join(rng.choice(GLYPHS) for _ in range(3)) if rng.random() < 0.3 else ""
    cells = (0, 1, 2, 6, 7, 8) if text else range(9)
    n = rng.choice((1, 1, 2, 2, 3, 4, 5)) - (1 if text else 0)  # many small scenes: each word grounds easily
    colors = tuple(COLORS) if rng.random() < 0.5 else rng.sample(list(COLORS), 2)  # in 2 colours, they repeat
    return Scene(random_objects(rng, n, cells=cells, colors=colors), text)


def _align(scene, rng):
    """A whole-scene caption, or (GROUNDED of the rows) a caption of the objects of the colours named:
    '' -> 'large red circle top left; small blue square center; text K7A'
    'red' -> 'two: large circle top left; small circle center'     'green' -> 'none'
    'blue red' -> 'large circle top left; small square center'
    Every caption lists its objects in reading order (by cell), whatever order the colours are named in; one
    colour named, it first says how many objects have it, as a dense caption does ('two red circles ...')."""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    if objs and rng.random() < GROUNDED:
        colors = []
        while len(colors) < (2 if rng.random() < GROUNDED_TWO else 1):
            absent = [c for c in COLORS if c not in {o.color for o in objs}]
            missing = absent and rng.random() < GROUNDED_ABSENT  # name a colour the scene lacks
            color = rng.choice(absent) if missing else rng.choice(objs).color
            if color not in colors:
                colors.append(color)
        found = [f"{o.size} {o.shape} {where(o.cell)}" for o in objs if o.color in colors]
        if len(colors) == 1 and found:
            found[0] = f"{NUMBERS[len(found)]}: {found[0]}"
        return " ".join(colors), "; ".join(found) or "none"
    parts = [f"{o.size} {o.color} {o.shape} {where(o.cell)}" for o in objs]
    return "", "; ".join(parts + ([f"text {scene.text}"] if scene.text else []))


# Grounded captions (as in grounded pretraining: objects referred to by a word, then described) teach the
# decoder to look an object up by a word of the prompt before any task asks it to. Without them the base only
# captions the cells in a fixed order, and each colour-lookup task must first find that circuit itself.
# Naming two colours makes it find both and put them in reading order, i.e. compare where they are. Saying how
# many objects have the colour teaches it to count what it looked up (docs/benchmark.md: count without it).
NUMBERS = ("none", "one", "two", "three", "four", "five")  # words: the base must not answer count zero-shot
GROUNDED = 0.5         # share of alignment rows that name colours
GROUNDED_TWO = 0.5     # of those, the share naming two colours
GROUNDED_ABSENT = 0.2  # the chance that a colour named is missing from the scene: lookup can come back empty
ALIGN = Task("align", "LLaVA-Pretrain (LCS-558K)", ("",), _align_scene, _align, metric="f1")
ALL_TASKS = [ALIGN, *TASKS.values(), *HELD_IN.values()]  # what the tokenizer learns from


def split_scenes(task, split, n, seed, exclude=frozenset()):
    """n (scene, instruction, answer) of `task`, deterministic from (task, split, seed), before any drawing;
    layouts in `exclude` are skipped."""
    rng = random.Random(f"{task.name}-{split}-{seed}")
    rows = []
    while len(rows) < n:
        scene = task.scene(rng)
        if scene.key() not in exclude:
            rows.append((scene, *task.make(scene, rng)))
    return rows


@functools.lru_cache(maxsize=4)
def test_layouts(n_test, seed):
    """Every layout of every test split: the eight tasks' and the held-in tasks'. Training splits of every
    stage (alignment, multitask, each task) exclude all of them, so no stage trains on a scene that any
    stage tests: a layout tested in one task must not be learnt in another (or in the base) either."""
    return frozenset(scene.key() for task in (*TASKS.values(), *HELD_IN.values())
                     for scene, _, _ in split_scenes(task, "test", n_test, seed))


def atomic_write(path, write):
    """write(tmp_path), fsync, then rename over `path`: a reader sees the old file or the new one, never half
    of one. The temporary name carries the process id, so two writers never share it. Under torchrun
    (RANK > 0) only rank 0 writes."""
    if int(os.environ.get("RANK", 0)) > 0:
        return
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    argparse.ArgumentParser(description="Print two examples of every task.").parse_args()  # --help, no flags
    for task in ALL_TASKS:
        rng = random.Random(task.name)
        for _ in range(2):
            q, a = task.make(task.scene(rng), rng)
            print(f"{task.name:>12} ({task.like}): {q!r} -> {a!r}")
