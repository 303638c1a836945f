"""The benchmark (data.py): determinism, train/test separation (no test layout in any training split of any
stage), answers checked by an independent solver, and rendering.

Run: python -m pytest tests/test_data.py -q
"""
import random
import re

import numpy as np
import pytest
import torch

import data
import llava
import runner
from data import Obj, Scene

ALL_TASKS = list(data.TASKS.values()) + [data.ALIGN]
IMAGE_SIZE, MAX_LEN = 48, 40


@pytest.fixture(scope="module")
def tok():
    return llava.train_tokenizer(ALL_TASKS, seed=0)


# ----------------------------------------------------------------------------------------------
# determinism and separation

@pytest.mark.parametrize("name", ["classify", "read", "caption"])
def test_make_split_is_a_function_of_task_split_seed(tok, name):
    task = data.TASKS[name]
    a, keys_a = llava.make_split(task, "train", 30, 0, tok, IMAGE_SIZE, MAX_LEN)
    b, keys_b = llava.make_split(task, "train", 30, 0, tok, IMAGE_SIZE, MAX_LEN)
    assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.prompt_len, b.prompt_len) and a.answers == b.answers and keys_a == keys_b
    other_seed, _ = llava.make_split(task, "train", 30, 1, tok, IMAGE_SIZE, MAX_LEN)
    other_split, _ = llava.make_split(task, "test", 30, 0, tok, IMAGE_SIZE, MAX_LEN)
    assert not torch.equal(a.images, other_seed.images)
    assert not torch.equal(a.images, other_split.images)


@pytest.mark.parametrize("name", list(data.TASKS))
def test_train_and_test_layouts_never_overlap(tok, name):
    task = data.TASKS[name]
    n_train, n_test = 300, 100
    train, test = llava.make_task(task, n_train, n_test, 0, tok, IMAGE_SIZE, MAX_LEN)
    test_again, test_keys = llava.make_split(task, "test", n_test, 0, tok, IMAGE_SIZE, MAX_LEN)
    train_again, train_keys = llava.make_split(task, "train", n_train, 0, tok, IMAGE_SIZE, MAX_LEN,
                                              exclude=data.test_layouts(n_test, 0))
    # make_task's splits are exactly these two, so their keys are the ones we check
    assert torch.equal(test.images, test_again.images) and torch.equal(train.images, train_again.images)
    assert len(train) == n_train and len(test) == n_test
    assert not train_keys & test_keys


def test_test_layouts_are_every_tasks_test_layouts(tok):
    union = set()
    for task in [*data.TASKS.values(), *data.HELD_IN.values()]:
        union |= llava.make_split(task, "test", 40, 1, tok, IMAGE_SIZE, MAX_LEN)[1]
    assert data.test_layouts(40, 1) == union


def test_no_stage_trains_on_any_test_layout(tok, tmp_path, monkeypatch):
    """Every training split that train.py builds (alignment, multitask, each task) avoids the test layouts of
    every task, built-in and held-in. Without the union, 142/150 classify test layouts were alignment rows."""
    import train
    cfg, mcfg, _ = runner.parse(["--base", "multitask", "--base-steps", "1", "--multitask-steps", "1",
                                "--n-base", "3000", "--n-train", "600", "--n-test", "150",
                                "--cache-dir", str(tmp_path), "--device", "cpu"])
    mcfg.vocab_size = tok.get_vocab_size()
    made = []  # (task, split, layouts) of every split train.py makes
    make_split = llava.make_split

    def spy(task, split, *args, **kw):
        ex, keys = make_split(task, split, *args, **kw)
        made.append((task.name, split, keys))
        return ex, keys
    monkeypatch.setattr(llava, "make_split", spy)
    train.base_model(cfg, mcfg, tok, torch.device("cpu"))
    for task in data.TASKS.values():
        llava.make_task(task, cfg.n_train, cfg.n_test, cfg.seed, tok, IMAGE_SIZE, MAX_LEN)
    tested = set().union(*(keys for _, split, keys in made if split == "test"))
    tested |= set().union(*(llava.make_split(t, "test", cfg.n_test, cfg.seed, tok, IMAGE_SIZE, MAX_LEN)[1]
                            for t in data.HELD_IN.values()))
    trained = {name for name, split, _ in made if split == "train"}
    assert trained == {"align", *data.TASKS, *data.HELD_IN}
    for name, split, keys in made:
        if split == "train":
            assert not keys & tested, f"{name}: {len(keys & tested)} test layouts in its training split"


@pytest.mark.parametrize("name", list(data.TASKS))
def test_every_task_jitters_its_shapes(name):
    """Objects are drawn ±1 px off their cell's centre in every task (counting drew them all centred)."""
    rng, task = random.Random(0), data.TASKS[name]
    offsets = {(o.dx, o.dy) for _ in range(100) for o in task.scene(rng).objects}
    assert len(offsets) == 9


def test_exclusion_is_needed_for_a_small_task(tok):
    """Without `exclude`, classify (450 layouts) would share layouts: the overlap test can fail."""
    task = data.TASKS["classify"]
    _, test_keys = llava.make_split(task, "test", 100, 0, tok, IMAGE_SIZE, MAX_LEN)
    _, train_keys = llava.make_split(task, "train", 300, 0, tok, IMAGE_SIZE, MAX_LEN)
    assert train_keys & test_keys


# ----------------------------------------------------------------------------------------------
# every answer, recomputed by a solver that shares no code with data.py

POSITION = {0: "top left", 1: "top middle", 2: "top right", 3: "middle left", 4: "center",
            5: "middle right", 6: "bottom left", 7: "bottom middle", 8: "bottom right"}
COLUMN = {c: c % 3 for c in range(9)}
ROW = {c: c // 3 for c in range(9)}


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def one(items):
    assert len(items) == 1, items
    return items[0]


def find(scene, color=None, shape=None):
    """The one object with this colour and/or shape (the tasks promise it is unique)."""
    return one([o for o in scene.objects
                if (color is None or o.color == color) and (shape is None or o.shape == shape)])


def mentioned(text, vocabulary):
    return one([w for w in words(text) if w in vocabulary])


def solve(task, scene, instruction):
    colors = set(data.COLORS)
    if task == "classify":
        return one(scene.objects).shape
    if task == "attribute":
        return find(scene, color=mentioned(instruction, colors)).shape
    if task == "count":
        color = mentioned(instruction, colors)
        return str(sum(o.color == color for o in scene.objects))
    if task == "spatial":  # which side of the image the object of that colour is on, of the two named
        m = re.search(r"the (\w+) object(?: on)?,? (?:on the )?(left|top)(?: or the | or )(right|bottom)\??$",
                      instruction)
        o, (low, high) = find(scene, color=m[1]), (m[2], m[3])
        axis = COLUMN if low == "left" else ROW
        assert axis[o.cell] != 1, instruction  # decidable: the object is on one side, not in the middle
        return low if axis[o.cell] == 0 else high
    if task == "read":
        return scene.text
    if task == "ground":
        return POSITION[find(scene, color=mentioned(instruction, colors)).cell]
    if task == "caption":
        parts = [f"a {o.size} {o.color} {o.shape} "
                 + ("in the center" if o.cell == 4 else f"at the {POSITION[o.cell]}")
                 for o in sorted(scene.objects, key=lambda o: o.cell)]
        return " and ".join(parts) + "."
    if task == "unanswerable":
        color = mentioned(instruction, colors)
        present = [o.shape for o in scene.objects if o.color == color]
        return one(present) if present else "unanswerable"
    if task == "align":
        cells = sorted(scene.objects, key=lambda o: o.cell)
        if instruction:  # grounded: every object of the one or two colours named, in cell order, or 'none'
            named = instruction.split()
            assert set(named) <= colors and len(set(named)) == len(named) <= 2
            found = [f"{o.size} {o.shape} {POSITION[o.cell]}" for o in cells if o.color in named]
            if len(named) == 1 and found:  # one colour: how many objects have it, in words, first
                found[0] = ["one", "two", "three", "four", "five"][len(found) - 1] + ": " + found[0]
            return "; ".join(found) or "none"
        parts = [f"{o.size} {o.color} {o.shape} {POSITION[o.cell]}" for o in cells]
        return "; ".join(parts + ([f"text {scene.text}"] if scene.text else []))
    raise AssertionError(f"no solver for task {task!r}")


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_every_answer_matches_an_independent_solver(task):
    rng = random.Random(f"solver-{task.name}")
    answers = []
    for _ in range(200):
        scene = task.scene(rng)
        instruction, answer = task.make(scene, rng)
        assert len({o.cell for o in scene.objects}) == len(scene.objects), "two objects share a cell"
        assert answer == solve(task.name, scene, instruction), (scene, instruction)
        answers.append(answer)
    # the task is not degenerate: its answers vary (yes and no, several counts, ...)
    assert len(set(answers)) >= 2
    if task.name in ("spatial", "unanswerable"):  # both kinds of answer occur often enough to learn
        kind = [a in ("right", "bottom", "unanswerable") for a in answers]
        assert 0.25 < sum(kind) / len(kind) < 0.75
    if task.name == "align":  # whole-scene captions, grounded rows, and some of those come back empty
        prompts = [task.make(task.scene(rng), rng) for _ in range(400)]
        assert 0.4 < sum(i != "" for i, _ in prompts) / 400 < 0.6 and any(a == "none" for _, a in prompts)


# ----------------------------------------------------------------------------------------------
# the mixed benchmark: each task's dataset's other kinds of question

def solve_minor(scene, instruction):
    """The answer to a minor kind of question (data.MINOR_KINDS), or None when the question is not one."""
    objs = scene.objects
    if m := re.fullmatch(r"Is the (\w+) (?:object|thing) an? (\w+)\?", instruction):  # shape check
        return "yes" if find(scene, color=m[1]).shape == m[2] else "no"
    if instruction in ("Count the things in this image.", "What is the number of things here?"):
        return str(len(objs))
    if m := re.fullmatch(r"Is the (\w+) (?:object|thing) on the (left|right|top|bottom)\?", instruction):
        o = find(scene, color=m[1])
        axis, low = (COLUMN, ("left", "right")) if m[2] in ("left", "right") else (ROW, ("top", "bottom"))
        assert axis[o.cell] != 1, instruction  # decidable: the object is on one side, not in the middle
        return "yes" if low[axis[o.cell] // 2] == m[2] else "no"
    if m := re.fullmatch(r"(?:Is (\w+) written here\?|Is the text (\w+)\?)", instruction):
        return "yes" if (m[1] or m[2]) == scene.text else "no"
    pattern = r"(?:Is an? (\w+) thing in the picture\?|Is there anything (\w+) here\?)"  # colour check
    if m := re.fullmatch(pattern, instruction):
        return "yes" if any(o.color == (m[1] or m[2]) for o in objs) else "no"
    return None


def minor_kind(instruction):
    """The minor kind whose phrasing this question fills in."""
    return one([k for k, t in data.MINOR_KINDS.items() for p in t.phrasings
                if re.fullmatch(re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(p)), instruction)])


@pytest.mark.parametrize("name", list(data.TASKS))
def test_every_mixed_answer_matches_an_independent_solver_and_minor_kinds_take_their_share(name):
    task, rng, kinds = data.BENCHMARKS["mixed"][name], random.Random(f"mixed-{name}"), []
    for _ in range(2000):
        scene = task.scene(rng)
        instruction, answer = task.make(scene, rng)
        minor = solve_minor(scene, instruction)
        expected = minor if minor is not None else solve(name, scene, instruction)
        assert answer == expected, (scene, instruction)
        kinds.append(None if minor is None else minor_kind(instruction))
    shares = dict(data.MINORS.get(name, ()))
    for kind, share in shares.items():  # 2000 rows: a share's standard error is at most 1.1 points
        assert abs(kinds.count(kind) / 2000 - share) < 0.04, (kind, kinds.count(kind))
    assert kinds.count(None) / 2000 == pytest.approx(1 - sum(shares.values()), abs=0.04)


def test_the_mixed_benchmark_draws_the_single_ones_scenes_in_words_the_tokenizer_has():
    """Each row's own question is drawn first, so the scenes, and the test layouts that every stage leaves
    out, are the single benchmark's: the same bases serve both. The minor kinds' phrasings use the words of
    the tokenizer that the single benchmark trains, so its vocabulary (and the initial weights) stay."""
    for name in data.TASKS:
        single, mixed = (data.split_scenes(b[name], "test", 60, 0) for b in data.BENCHMARKS.values())
        assert [s.key() for s, *_ in single] == [s.key() for s, *_ in mixed]
        assert all(q == q2 and a == a2 for (_, q, a), (_, q2, a2) in zip(single, mixed)
                   if solve_minor(_, q2) is None)  # a row of the task's own kind is the single one's
    vocabulary = set(llava.train_tokenizer(data.ALL_TASKS, seed=0).get_vocab())  # the one train.py trains
    for kind in data.MINOR_KINDS.values():
        for phrasing in kind.phrasings:  # every word is in the tokenizer the single benchmark trains
            words = re.sub(r"\{\w+\}", "", phrasing).replace("?", " ").replace(".", " ").split()
            assert all("▁" + w in vocabulary for w in words), phrasing


# ----------------------------------------------------------------------------------------------
# rendering

def test_render_shape_dtype_and_placement():
    scene = Scene((Obj("circle", "red", "large", 0), Obj("square", "blue", "large", 8)))
    img = data.render(scene, 48)
    assert img.dtype == np.uint8 and img.shape == (3, 48, 48)
    assert tuple(img[:, 8, 8]) == data.COLORS["red"]        # centre of the top-left cell
    assert tuple(img[:, 40, 40]) == data.COLORS["blue"]     # centre of the bottom-right cell
    assert tuple(img[:, 24, 24]) == tuple(img[:, 1, 47])    # the empty centre is background


def test_different_scenes_give_different_images():
    rng = random.Random("render")
    seen = {}
    for task in ALL_TASKS:
        for _ in range(20):
            scene = task.scene(rng)
            seen.setdefault(scene, data.render(scene).tobytes())
    assert len(set(seen.values())) == len(seen)
    base = Obj("circle", "red", "large", 4)
    variants = [base, Obj("square", "red", "large", 4), Obj("circle", "green", "large", 4),
                Obj("circle", "red", "small", 4), Obj("circle", "red", "large", 5),
                Obj("circle", "red", "large", 4, 1, 0)]
    images = [data.render(Scene((o,))).tobytes() for o in variants]
    images.append(data.render(Scene((base,), "K7A")).tobytes())
    assert len(set(images)) == len(images)


def test_the_loaded_once_glyph_font_draws_the_pixels_a_fresh_font_draws(monkeypatch):
    """data.glyph_font keeps Pillow's font after its first load; the text must come out the same pixels."""
    rng = random.Random(0)
    scenes = [data.Scene(data.random_objects(rng, 2), "".join(rng.sample(data.GLYPHS, 3))) for _ in range(20)]
    cached = [data.render(s) for s in scenes]
    monkeypatch.setattr(data, "glyph_font", lambda px: data.ImageFont.load_default(size=px))  # the old way
    assert all((data.render(s) == img).all() for s, img in zip(scenes, cached))
    assert (data.render(scenes[0]) != data.render(data.Scene(scenes[0].objects))).any()  # text drawn
