"""Steps to 90 %: how fast each task is learnt from a base model, evaluated every --every steps.

    python tools/probe_lookup.py --grounded 0.5 --seed 0     # the base of data.GROUNDED = 0.5
    python tools/probe_lookup.py --grounded 0 --seed 0       # the old base: whole-scene captions only

Trains the base as train.py does (cached under --cache-dir, one folder per --grounded), then tunes a
copy of it on each task alone with train.py's schedule, and prints the accuracy after every --every steps
and the first step that reached 90 (captions: token F1). Not collected by pytest.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import llava  # noqa: E402
import strategies  # noqa: E402
import runner
import train  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--grounded", type=float, default=data.GROUNDED, help="share of grounded alignment rows")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--base", default="pretrained", help="pretrained or multitask")
ap.add_argument("--tasks", default="unanswerable,ground,attribute,count,spatial")
ap.add_argument("--every", type=int, default=50, help="steps between evaluations")
ap.add_argument("--cache-dir", default="runs/probe-cache")
args, rest = ap.parse_known_args()  # the rest are train.py flags, e.g. --steps 800 --base-steps 3000

data.GROUNDED = args.grounded
cfg, mcfg, _ = runner.parse(["--base", args.base, "--seed", str(args.seed),
                             "--checkpoint-every", str(args.every),
                             "--cache-dir", f"{args.cache_dir}/grounded-{args.grounded}", *rest])
torch.set_num_threads(cfg.threads)
device = runner.pick_device(cfg.device)
tok = llava.train_tokenizer(data.ALL_TASKS, cfg.seed)
mcfg.vocab_size = tok.get_vocab_size()
t0 = time.time()
base, _ = train.base_model(cfg, mcfg, tok, device)
print(f"base ({args.base}, grounded {args.grounded}, seed {args.seed}) ready in {time.time() - t0:.0f} s")
none = strategies.Strategy(None)
names = args.tasks.split(",")
splits = {n: llava.make_task(data.TASKS[n], cfg.n_train, cfg.n_test, cfg.seed, tok, mcfg.image_size,
                            mcfg.max_text_len) for n in names}
zero = train.evaluate(base, none, [test for _, test in splits.values()], tok, device, cfg)
print("zero-shot: " + "  ".join(f"{n} {acc:.1f}" for n, (acc, *_) in zip(names, zero)))
print(f"{'task':>13} " + " ".join(f"{s:>5}" for s in range(args.every, cfg.steps + 1, args.every))
      + "  to-90")
for t, name in enumerate(names):
    model, (rows, test), curve = copy.deepcopy(base), splits[name], []
    model.vision.requires_grad_(not cfg.freeze_vision)

    def probe(step, opt):
        curve.append(train.evaluate(model, none, [test], tok, device, cfg)[0][0])
        model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + t + 1)
    train.train_steps(model, rows, none, cfg.steps, cfg.lr, cfg, gen, device, name, save=probe)
    probe(cfg.steps, None)
    hit = next((args.every * (i + 1) for i, acc in enumerate(curve) if acc >= 90), None)
    print(f"{name:>13} " + " ".join(f"{acc:5.1f}" for acc in curve) + f"  {hit or '>' + str(cfg.steps):>5}",
          flush=True)
