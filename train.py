"""Continual instruction tuning: train a base model, then tune it on tasks one after another.

    python train.py --strategy replay          # the whole job on a laptop CPU, in about two minutes
    python train.py --strategy naive --help    # every flag, with the reason for its default

After each task every task is evaluated, giving one row of the accuracy matrix; the run folder
(runs/<strategy>) gets config.json, tokenizer.json, checkpoints, results.json and accuracy.png.
The protocol follows He et al., Continual Instruction Tuning for Large Multimodal Models (2311.16206).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import data
import strategies
from eval import SCORERS, all_metrics, format_header, format_report, format_row, heatmap
from model import PRESETS, VLM, ModelConfig, add_lora, arg


@dataclass
class TrainConfig:
    strategy: str = arg("naive", "continual-learning strategy; combine parts with '+', e.g. replay+naive")
    tasks: str = arg("paper", "a named order (" + ", ".join(data.ORDERS) + ") or a comma list of tasks and task files")
    image_root: str = arg("", "the folder image paths in task files start from; empty means each file's own folder")
    truncate: bool = arg(False, "cut task-file rows longer than --max-text-len (and count them) instead of stopping")
    preset: str = arg("tiny", "size of model and schedule: tiny for a CPU, small or base for a GPU")
    steps: int = arg(400, "training steps per task: 250 left counting and grounding near 70 %")
    batch_size: int = arg(32, "rows per step; small batches keep a CPU step at a few milliseconds")
    lr: float = arg(5e-4, "peak AdamW learning rate of the task stage; at 1e-3 reading stayed at 13 %")
    base_steps: int = arg(1500, "steps of the alignment (captioning) stage that makes the base model")
    base_lr: float = arg(2e-3, "peak learning rate of the alignment stage; 1e-2 stalls, 6e-4 is slow")
    n_train: int = arg(1000, "training rows per task; more than the steps use, so rows rarely repeat")
    n_test: int = arg(150, "test rows per task: ±4 points of sampling noise at 80 %")
    n_base: int = arg(6000, "rows of the alignment stage, drawn from every kind of scene")
    freeze_vision: bool = arg(True, "freeze the ViT while tuning tasks, as LLaVA freezes its vision tower")
    seed: int = arg(0, "seeds data, initialisation and batch order: the same seed gives the same run")
    device: str = arg("auto", "auto picks cuda, then mps, then cpu")
    threads: int = arg(1, "CPU threads: tiny matrices gain little from more; 2 on a busy 2-core CPU ran 30x slower")
    run_dir: str = arg("", "run folder; empty means runs/<strategy>")
    cache_dir: str = arg("runs/cache", "where base models are cached, keyed by everything that made them")
    eval_batch_size: int = arg(256, "prompts decoded together in evaluation")
    show_mistakes: int = arg(0, "print this many wrong answers per task after the last evaluation")


TRAIN_PRESETS = {"tiny": {}, "small": dict(batch_size=64, steps=300, base_steps=2000, n_train=4000),
                 "base": dict(batch_size=64, steps=500, base_steps=4000, n_train=8000)}
POSITIVE = ("steps", "batch_size", "lr", "base_lr", "n_train", "n_test", "n_base", "eval_batch_size", "threads")


class CLIError(Exception):
    """Bad input: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error, and no exit from inside a library call
        raise CLIError(message)


def parse(argv):
    """argv -> (TrainConfig, ModelConfig, StrategyConfig): presets first, then the flags given."""
    ap = Parser(description=__doc__.split("\n")[0])
    groups = {"train": TrainConfig, "model": ModelConfig, "strategy options": strategies.StrategyConfig}
    for title, cls in groups.items():
        group = ap.add_argument_group(title)
        for f in fields(cls):
            if f.name == "vocab_size":
                continue  # set from the tokenizer
            why = f.metadata["help"] + f" (default {f.default})"
            kw = dict(default=None, help=why.replace("%", "%%"))  # argparse treats % as a format
            if f.type in (bool, "bool"):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            group.add_argument("--" + f.name.replace("_", "-"), **kw)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "tiny")
    if preset not in PRESETS:
        raise CLIError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    mine = {cls: {k: v for k, v in given.items() if k in {f.name for f in fields(cls)}} for cls in groups.values()}
    cfg = TrainConfig(**{**TRAIN_PRESETS[preset], **mine[TrainConfig]})
    scfg = strategies.StrategyConfig(**mine[strategies.StrategyConfig])
    try:
        mcfg = ModelConfig(**{**PRESETS[preset], **mine[ModelConfig]})
        strategy = strategies.build(cfg.strategy, scfg)
    except ValueError as e:
        raise CLIError(str(e)) from None
    for name, value in [(n, getattr(cfg, n)) for n in POSITIVE] + list(mine[strategies.StrategyConfig].items()):
        if isinstance(value, (int, float)) and value <= 0 and name != "replay_ratio":
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= scfg.replay_ratio < 1:
        raise CLIError(f"--replay-ratio must be in [0, 1), got {scfg.replay_ratio}")
    for name in sorted(mine[strategies.StrategyConfig].keys() - set(strategy.options)):
        raise CLIError(f"--{name.replace('_', '-')} is not an option of strategy {cfg.strategy!r}")
    task_names(cfg.tasks)  # fails early on unknown tasks
    cfg.run_dir = cfg.run_dir or f"runs/{cfg.strategy}"
    return cfg, mcfg, scfg


def task_names(spec):
    names = list(data.ORDERS[spec]) if spec in data.ORDERS else [t.strip() for t in spec.split(",") if t.strip()]
    for n in names:
        if n not in data.TASKS and not n.endswith(data.TASK_FILE_SUFFIXES):  # files are read by data.read_tasks
            raise CLIError(f"unknown task {n!r}; choose from {', '.join(data.TASKS)}, an order ({', '.join(data.ORDERS)}) "
                           "or .json/.jsonl task files")
    if not names or len(set(names)) < len(names):
        raise CLIError(f"--tasks {spec!r} must name each task once")
    return names


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(name):
        raise CLIError(f"device {name!r} is not available here; choose from auto, cpu, cuda, mps (where present)")
    return torch.device(name)


def atomic_write(path, write):
    """write(tmp_path), fsync, then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_steps(model, rows, strategy, steps, lr, cfg, gen, device, desc):
    """AdamW over the trainable parameters, warm-up then cosine decay; the strategy's hooks shape each batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over 5 %, then cosine from 1 down to 0.1
        opt, lambda s: min((s + 1) / max(1, steps // 20), 0.55 + 0.45 * math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        batch_rows = strategy.batch(rows.subset(torch.randint(len(rows), (cfg.batch_size,), generator=gen)), gen)
        batch = data.to_batch(batch_rows, range(len(batch_rows)), device)
        logits, loss = model(*batch)
        extra = strategy.penalty(model, batch, logits)
        total = loss if extra is None else loss + extra
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


@torch.no_grad()
def evaluate(model, strategy, tests, tok, device, cfg):
    """Greedy answers for every test row -> per task (accuracy in %, [(question, predicted, reference), ...])."""
    model.eval()
    results = []
    for test in tests:
        score, total, mistakes = SCORERS[test.metric], 0.0, []
        lengths = test.prompt_len.tolist()  # prompts of equal length decode together, with no padding
        for p in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == p]
            for k in range(0, len(rows), cfg.eval_batch_size):
                idx = torch.tensor(rows[k:k + cfg.eval_batch_size])
                ids = test.tokens[idx, :p].long().to(device)
                out = strategy.generate(model, data.pixels(test.images[idx]).to(device), ids,
                                        model.cfg.max_text_len - p, data.EOS).tolist()
                for i, row in zip(idx.tolist(), out):
                    pred = tok.decode(row[:row.index(data.EOS)] if data.EOS in row else row)
                    total += (s := score(pred, test.answers[i]))
                    if s < 1:
                        mistakes.append((tok.decode(test.tokens[i, 1:p - 1].long().tolist()), pred, test.answers[i]))
        results.append((100.0 * total / len(test), mistakes))
    return results


def base_model(cfg, mcfg, tok, device):
    """The model after the alignment stage: loaded from the cache if everything that made it matches."""
    code = b"".join((Path(__file__).parent / n).read_bytes() for n in ("data.py", "model.py"))
    key = dict(model=asdict(mcfg), base_steps=cfg.base_steps, base_lr=cfg.base_lr, n_base=cfg.n_base,
               batch_size=cfg.batch_size, seed=cfg.seed, tokenizer=tok.to_str(),
               code=hashlib.sha256(code).hexdigest())  # editing data.py or model.py must not reuse a stale base
    path = Path(cfg.cache_dir) / f"base-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.pt"
    model = VLM(mcfg, seed=cfg.seed).to(device)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
        print(f"base model: reused {path}")
        return model, path
    t0 = time.time()
    align, _ = data.make_split(data.ALIGN, "train", cfg.n_base, cfg.seed, tok, mcfg.image_size, mcfg.max_text_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss = train_steps(model, align, strategies.Strategy(None), cfg.base_steps, cfg.base_lr, cfg, gen, device,
                       "base: alignment")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save({"model": model.state_dict(), "key": key}, p))
    print(f"base model: trained {cfg.base_steps} steps in {time.time() - t0:.0f} s (loss {loss:.3f}), cached as {path}")
    return model, path


def run(cfg, mcfg, scfg):
    t_start, names, device = time.time(), task_names(cfg.tasks), pick_device(cfg.device)  # bad input fails first
    tasks = data.read_tasks(names, cfg.image_root, cfg.truncate, Path(cfg.run_dir) / "cache")  # files checked here
    names = list(tasks)  # a task file's name is its stem
    run_dir, probe = Path(cfg.run_dir), Path(cfg.run_dir) / ".write-test"
    try:  # prove the run folder is writable before any work is done
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"cannot write run folder {run_dir}: {e.strerror or e}") from None
    torch.set_num_threads(cfg.threads)
    tok = data.train_tokenizer(list(data.TASKS.values()) + [data.ALIGN], cfg.seed, tasks.values())  # a second; always fresh
    atomic_write(run_dir / "tokenizer.json", lambda p: tok.save(str(p)))  # what eval.py reads back
    mcfg.vocab_size = tok.get_vocab_size()
    config = {"train": asdict(cfg), "model": asdict(mcfg), "strategy": asdict(scfg)}
    atomic_write(run_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=1)))
    print(f"device {device} | strategy {cfg.strategy} | preset {cfg.preset} | run folder {run_dir}\ntasks in order: "
          + " -> ".join(f"{n} ({tasks[n].like})" for n in names))

    t0 = time.time()
    trains, tests = zip(*[data.make_task(tasks[n], cfg.n_train, cfg.n_test, cfg.seed, tok, mcfg.image_size,
                                         mcfg.max_text_len) for n in names])
    print(f"data: {len(names)} tasks, {sum(map(len, trains))} train + {sum(map(len, tests))} test rows "
          f"in {time.time() - t0:.1f} s")

    model, base_path = base_model(cfg, mcfg, tok, device)
    atomic_write(run_dir / "base.pt", lambda p: p.write_bytes(base_path.read_bytes()))
    strategy = strategies.build(cfg.strategy, scfg, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    base_row = [acc for acc, _ in evaluate(model, strategy, tests, tok, device, cfg)]
    print(f"model: {n_params:,} parameters; accuracy (%) on each task after each stage:\n{format_header(names)}")
    print(format_row("base", base_row, names))

    matrix, timings = [], []
    for t, name in enumerate(names):
        for p in model.vision.parameters():
            p.requires_grad_(not cfg.freeze_vision)
        strategy.before_task(model, t, trains[t])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + t + 1)  # one stream per task
        train_steps(model, trains[t], strategy, cfg.steps, cfg.lr, cfg, gen, device, f"task {t + 1}/{len(names)}: {name}")
        strategy.after_task(model, t, trains[t])
        t1 = time.time()
        results = evaluate(model, strategy, tests, tok, device, cfg)
        matrix.append([acc for acc, _ in results])
        timings.append(dict(task=name, train_seconds=t1 - t0, eval_seconds=time.time() - t1, trainable=trainable))
        tqdm.write(format_row(name, matrix[-1], names))
        state = dict(model=model.state_dict(), strategy=strategy.state_dict(), matrix=matrix, config=config, task=t)
        atomic_write(run_dir / f"task{t + 1}-{name}.pt", lambda p: torch.save(state, p))

    out = dict(config=config, tasks=names, base_row=base_row, matrix=matrix, metrics=all_metrics(matrix, base_row),
               timings=timings, n_params=n_params, extra_bytes=strategy.extra_bytes(), device=str(device),
               torch=torch.__version__, wall_seconds=time.time() - t_start)
    out.update(strategy.extra_results(model, tests))  # e.g. expansion's task-ID accuracy, TIR's task similarity
    atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(out, indent=1)))
    atomic_write(run_dir / "accuracy.png", lambda p: heatmap(names, matrix, f"{cfg.strategy}: accuracy (%)").save(p, format="PNG"))
    print("\n" + format_report(out))
    for (acc, mistakes), name in zip(results, names):
        for q, pred, ref in mistakes[:cfg.show_mistakes]:
            print(f"  {name}: {q!r} -> {pred!r} (expected {ref!r})")
    print(f"wrote {run_dir}/results.json and accuracy.png")
    return out


def reevaluate(run_dir, checkpoint):
    """Evaluate a saved checkpoint of a run on all of that run's tasks, through its strategy -> accuracies."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    cfg, mcfg = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    scfg = strategies.StrategyConfig(**config["strategy"])
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model, strategy = VLM(mcfg), strategies.build(cfg.strategy, scfg, cfg.seed)
    if any(".lora_" in k for k in saved["model"]):  # the run added adapters: make room to load them
        add_lora(model, scfg.lora_targets.split(","), scfg.lora_rank, scfg.lora_alpha, cfg.seed)
    model.load_state_dict(saved["model"])
    if "strategy" in saved:  # task checkpoints carry it (e.g. expansion's experts); base.pt does not
        strategy.load_state_dict(saved["strategy"])
    tok = Tokenizer.from_file(str(Path(run_dir) / "tokenizer.json"))
    tasks = data.read_tasks(task_names(cfg.tasks), cfg.image_root, cfg.truncate, Path(run_dir) / "cache")
    tests = [data.make_task(t, 1, cfg.n_test, cfg.seed, tok, mcfg.image_size, mcfg.max_text_len)[1]
             for t in tasks.values()]
    return [acc for acc, _ in evaluate(model, strategy, tests, tok, torch.device("cpu"), cfg)]


def main(argv=None):
    try:
        cfg, mcfg, scfg = parse(argv)
        print("config: " + json.dumps({**asdict(cfg), **asdict(mcfg), **asdict(scfg)}))
        run(cfg, mcfg, scfg)
    except (CLIError, data.TaskFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
