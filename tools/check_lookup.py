"""Does the base find the objects of the colour named? The model-level check of the alignment stage.

    python tools/check_lookup.py                 # the default model, 2000 alignment steps, seed 0, one thread
    python tools/check_lookup.py --seed 2 --base-steps 3000

The colour-lookup tasks (attribute, ground, unanswerable, count) are learnt in a few hundred steps because
the base already has this skill, and the grounded captions of data._align are what teach it. This trains a
base as train.py does (cached in --cache-dir, so a second call only evaluates), then asks held-out scenes
that have two colours in different numbers, each scene three times: each of its two colours, and a colour it
lacks. A grounded caption begins with how many objects have the colour named ('two: ...', 'one: ...',
'none'), and here the three words differ. A colour-blind base, whose answer depends on the scene alone,
gives the three prompts one answer and so gets no scene all right; the bar is 30 %. Exit 1 below it.

Not part of the suite: it trains the default model for 2000 steps (about 200 CPU-seconds), where the whole
suite has 240 s. The data-level twin in the suite, tests/test_data.py's independent solver of the alignment
captions, fails when a grounded caption stops depending on the colour named (mutant grounded_colour_blind).
Measured in docs/testing.md.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import llava  # noqa: E402
import runner  # noqa: E402
import strategies  # noqa: E402
import train  # noqa: E402

SCENES = 200  # held-out scenes, each asked three times
BAR = 0.3  # a colour-blind base scores 0


def colours(scene):
    """-> the scene's colours in reading order of first appearance, and how many objects have each."""
    order = list(dict.fromkeys(o.color for o in sorted(scene.objects, key=lambda o: o.cell)))
    return order, [sum(o.color == c for o in scene.objects) for c in order]


def two_colour_scene(rng):
    """An alignment scene whose first two colours come in different numbers."""
    while True:
        scene = data._align_scene(rng)
        order, n = colours(scene)
        if len(order) >= 2 and n[0] != n[1]:
            return scene


def ask(k):
    """The prompt names the scene's k-th colour (k = 2: the first colour it lacks); the reference is the
    first word of that prompt's grounded caption: how many objects have the colour ('two', ... or 'none')."""
    def make(scene, rng):
        order, n = colours(scene)
        if k == 2:
            return next(c for c in data.COLORS if c not in order), "none"
        return order[k], data.NUMBERS[n[k]]
    return make


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default="runs/lookup-cache", help="where the base is cached")
    args, rest = ap.parse_known_args()  # the rest are train.py flags, e.g. --seed 1 --base-steps 3000
    cfg, mcfg, _ = runner.parse(["--base-steps", "2000", "--threads", "1", "--cache-dir", args.cache_dir,
                                 *rest])
    torch.set_num_threads(cfg.threads)
    device = runner.pick_device(cfg.device)
    tok = llava.train_tokenizer(data.ALL_TASKS, cfg.seed)
    mcfg.vocab_size = tok.get_vocab_size()
    tasks = [data.Task("lookup", "", ("",), two_colour_scene, ask(k)) for k in range(3)]
    scenes = [[s.key() for s, *_ in data.split_scenes(task, "test", SCENES, 99)] for task in tasks]
    assert scenes[0] == scenes[1] == scenes[2]  # one rng per task name, and make() draws nothing from it
    trained = {s.key() for s, *_ in data.split_scenes(data.ALIGN, "train", cfg.n_base, cfg.seed,
                                                      data.test_layouts(cfg.n_test, cfg.seed))}
    unseen = [i for i, key in enumerate(scenes[0]) if key not in trained]  # never in the base's rows
    tests = [llava.make_split(task, "test", SCENES, 99, tok, mcfg.image_size, mcfg.max_text_len)[0]
             for task in tasks]
    base, _ = train.base_model(cfg, mcfg, tok, device)
    results = train.evaluate(base, strategies.Strategy(None), tests, tok, device, cfg)
    right = [[pred.split(":")[0] == answer for (pred, _), answer in zip(answered, test.answers)]
             for (_, _, answered), test in zip(results, tests)]
    all_three = sum(all(r[i] for r in right) for i in unseen) / len(unseen)
    per_prompt = [round(100 * sum(r[i] for i in unseen) / len(unseen)) for r in right]
    print(f"{len(unseen)} unseen scenes: all three prompts right on {100 * all_three:.0f} % "
          f"(bar {100 * BAR:.0f} %, colour-blind 0 %); count word right per prompt "
          f"(colour 1, colour 2, missing): {per_prompt} %")
    return 0 if all_three >= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
