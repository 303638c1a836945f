"""Continual instruction tuning: train a base model, then tune it on tasks one after another.

    python train.py --strategy replay          # the whole job on a laptop CPU, in about three minutes
    python train.py --strategy naive --help    # every flag, with the reason for its default

After each task every task is evaluated, giving one row of the accuracy matrix; the run folder
(runs/<strategy>) gets config.json, tokenizer.json, checkpoints, results.json and accuracy.png.
Rerunning a command resumes its run folder where it stopped (checkpoint.pt, every --checkpoint-every steps).
`torchrun --nproc_per_node=N train.py ...` splits each batch among N processes (DDP, gloo or nccl).
The protocol follows He et al., Continual Instruction Tuning for Large Multimodal Models (2311.16206).
"""
import os

# Before torch loads OpenMP: a thread waiting for work sleeps instead of spinning, so that two threads do not
# fight a busy core for their turn (measured: tests/bench_train.py --threads-only). A value you set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import hashlib
import json
import math
import pickle
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tokenizers import Tokenizer
from tqdm import tqdm

import data
import llava
import strategies
from data import atomic_write
from eval import (all_metrics, answer_space, format_header, format_matrix, format_report, format_row, heatmap,
                  score_tests, stage_rows)
from model import PRESETS, VLM, ModelConfig, arg


@dataclass
class TrainConfig:
    strategy: str = arg("naive", "continual-learning strategy; combine parts with '+', e.g. replay+naive")
    tasks: str = arg("paper", f"an order ({', '.join(data.ORDERS)}), or a comma list of tasks and task files")
    image_root: str = arg("", "where task files' image paths start; empty means each file's own folder")
    truncate: bool = arg(False, "cut task-file rows longer than --max-text-len (and count them), not stop")
    preset: str = arg("tiny", "size of model and schedule: tiny for a CPU, small or base for a GPU")
    base: str = arg("pretrained", "pretrained (alignment only), or multitask (then held-in tasks jointly)")
    steps: int = arg(400, "training steps per task: 250 left counting and grounding near 70 %")
    batch_size: int = arg(32, "rows per step; small batches keep a CPU step at a few milliseconds")
    lr: float = arg(5e-4, "peak AdamW learning rate of the task stage; at 1e-3 reading stayed at 13 %")
    base_steps: int = arg(3000, "steps of the alignment stage (captions, grounded captions): 1500 answered "
                          "71 % of grounded rows exactly, 3000 gave 97 %; cached, so paid once")
    base_lr: float = arg(2e-3, "peak learning rate of the alignment stage; 1e-2 stalls, 6e-4 is slow")
    multitask_steps: int = arg(1000, "--base multitask: steps of joint tuning on the held-in tasks, at --lr")
    n_train: int = arg(4000, "training rows per task, each seen ~3 times in 400 steps; at 1000 (13 times) "
                       "count and spatial overfit: 99 % right on training rows, 89-90 % on test rows")
    n_test: int = arg(150, "test rows per task: ±4 points of sampling noise at 80 %")
    n_base: int = arg(6000, "rows of the alignment stage, drawn from every kind of scene")
    freeze_vision: bool = arg(True, "freeze the ViT while tuning tasks, as LLaVA freezes its vision tower")
    seed: int = arg(0, "seeds data, initialisation and batch order: the same seed gives the same run")
    device: str = arg("auto", "auto picks cuda, then mps, then cpu")
    threads: int = arg(0, "CPU threads; 0: two if torch sees two cores (OMP_NUM_THREADS), else one; a "
                       "change of count changes the last bits of every result")
    run_dir: str = arg("", "run folder; empty means runs/<strategy>")
    cache_dir: str = arg("runs/cache", "where base models are cached, keyed by everything that made them")
    eval_batch_size: int = arg(256, "prompts decoded together in evaluation")
    show_mistakes: int = arg(0, "print this many wrong answers per task after the last evaluation")
    checkpoint_every: int = arg(100, "steps between checkpoints in a task: a kill loses at most this much")
    resume: bool = arg(False, "continue the run in --run-dir with its saved settings (rerunning does it too)")
    force_new: bool = arg(False, "start afresh in a new folder (<run-dir>-2, -3, ...) instead of resuming")
    evaluate: str = arg("", "only evaluate this checkpoint (e.g. runs/naive/task2-classify.pt) again")
    base_only: bool = arg(False, "only train (or find cached) the base model of these settings, then stop")
    first_task_from: str = arg("", "a naive run of these settings: take its first task's weights instead of "
                               "training them (the same bits; for strategies that train it as naive does)")
    compile: bool = arg(False, "torch.compile the model for training: a one-off delay, then faster steps")
    bf16: bool = arg(False, "bfloat16 autocast on CUDA: faster matmuls; weights and optimizer stay fp32")


TRAIN_PRESETS = {"tiny": {}, "small": dict(batch_size=64, steps=300, base_steps=2000, n_train=4000),
                 "base": dict(batch_size=64, steps=500, base_steps=4000, n_train=8000)}
POSITIVE = ("steps", "batch_size", "lr", "base_lr", "n_train", "n_test", "n_base", "eval_batch_size",
            "threads", "multitask_steps", "checkpoint_every")
SAME_RUN_ANYWAY = {"run_dir", "cache_dir", "threads", "show_mistakes", "checkpoint_every", "resume",
                   "force_new", "evaluate", "base_only",
                   "first_task_from"}  # flags that change where or how a run goes, not what it computes
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun


class Stop(Exception):
    """The run cannot go on: one line on stderr, exit code 1."""
    code = 1


class CLIError(Stop):
    """Bad input: reported as one line, exit code 2."""
    code = 2


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
    saved = {}  # --resume: the run folder's settings, under the flags given
    if given.get("resume"):
        folder = Path(given.get("run_dir") or f"runs/{given.get('strategy', 'naive')}")
        try:
            saved = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            raise CLIError(f"--resume: no run to resume in {folder} (no readable config.json)") from None
        saved["train"] = {k: v for k, v in saved["train"].items() if k not in ("resume", "force_new")}
    preset = given.get("preset", saved.get("train", {}).get("preset", "tiny"))
    if preset not in PRESETS:
        raise CLIError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    mine = {cls: {k: v for k, v in given.items() if k in {f.name for f in fields(cls)}}  # the flags given
            for cls in groups.values()}
    cfg = TrainConfig(**{**TRAIN_PRESETS[preset], **saved.get("train", {}), **mine[TrainConfig]})
    cfg.threads = cfg.threads or min(2, torch.get_num_threads())  # resolved: config.json says which
    scfg = strategies.StrategyConfig(**{**saved.get("strategy", {}), **mine[strategies.StrategyConfig]})
    try:
        mcfg = ModelConfig(**{**PRESETS[preset], **saved.get("model", {}), **mine[ModelConfig]})
        strategy = strategies.build(cfg.strategy, scfg)
    except ValueError as e:
        raise CLIError(str(e)) from None
    options = mine[strategies.StrategyConfig]
    for name, value in [(n, getattr(cfg, n)) for n in POSITIVE] + list(options.items()):
        if isinstance(value, (int, float)) and value <= 0 and name != "replay_ratio":
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= scfg.replay_ratio < 1:
        raise CLIError(f"--replay-ratio must be in [0, 1), got {scfg.replay_ratio}")
    for name in sorted(options.keys() - set(strategy.options)):
        raise CLIError(f"--{name.replace('_', '-')} is not an option of strategy {cfg.strategy!r}")
    task_names(cfg.tasks)  # fails early on unknown tasks
    if cfg.base not in ("pretrained", "multitask"):
        raise CLIError(f"unknown base {cfg.base!r}; choose from pretrained, multitask")
    if cfg.batch_size < WORLD:
        raise CLIError(f"--batch-size {cfg.batch_size} leaves some of the {WORLD} processes without a row")
    cfg.run_dir = cfg.run_dir or f"runs/{cfg.strategy}"
    return cfg, mcfg, scfg


def task_names(spec):
    names = data.ORDERS[spec] if spec in data.ORDERS else [t.strip() for t in spec.split(",") if t.strip()]
    for n in names:
        if n not in data.TASKS and not n.endswith(llava.TASK_FILE_SUFFIXES):  # files: llava.read_tasks
            raise CLIError(f"unknown task {n!r}; choose from {', '.join(data.TASKS)}, an order "
                           f"({', '.join(data.ORDERS)}) or .json/.jsonl task files")
    if not names or len(set(names)) < len(names):
        raise CLIError(f"--tasks {spec!r} must name each task once")
    return names


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(name):
        raise CLIError(f"device {name!r} is not available here; choose from auto, cpu, cuda, mps (if there)")
    return torch.device(name, int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)


def train_steps(model, rows, strategy, steps, lr, cfg, gen, device, desc, start=0, opt_state=None, save=None):
    """AdamW over the trainable parameters, warm-up then cosine decay; the strategy's hooks shape each batch.
    From step `start` with a saved optimizer state when resuming; save(step, opt) every --checkpoint-every."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" or None  # one kernel for all parameters on a GPU
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused)
    if opt_state:
        opt.load_state_dict(opt_state)
    # torchrun: torch's DDP all-reduces the gradients in buckets while backward still runs. Wrapped afresh
    # for every stage, since a strategy may add parameters between tasks (LoRA adapters, experts).
    module = DistributedDataParallel(model) if WORLD > 1 else model
    forward = torch.compile(module) if cfg.compile else module
    frozen = not cfg.bf16 and not any(p.requires_grad for p in model.vision.parameters())
    # a frozen vision tower's output for every image the batches can hold: computed once, not each step
    seen = encode_images(model, [rows, strategy.stored_rows()], device) if frozen else None
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, leave=False, dynamic_ncols=True,
               disable=RANK > 0 or "TQDM_DISABLE" in os.environ)  # the study's runs set it
    for step in bar:
        for group in opt.param_groups:  # linear warm-up over 5 %, then cosine from 1 down to 0.1
            warmup, cosine = (step + 1) / max(1, steps // 20), 0.55 + 0.45 * math.cos(math.pi * step / steps)
            group["lr"] = lr * min(warmup, cosine)
        fresh = rows.subset(torch.randint(len(rows), (cfg.batch_size,), generator=gen))
        batch_rows = strategy.batch(fresh, gen)
        batch = data.to_batch(batch_rows, range(len(batch_rows)), device)
        images = batch_rows.images
        if WORLD > 1:  # each rank takes every WORLD-th row; scaled so that summed gradients average the batch
            share = (batch[2][RANK::WORLD] != -100).sum() / (batch[2] != -100).sum()
            batch, images = tuple(x[RANK::WORLD] for x in batch), images[RANK::WORLD]
        with torch.autocast(device.type, torch.bfloat16) if cfg.bf16 else contextlib.nullcontext():
            logits, loss = forward(*batch, seen=vision_seen(model, images, seen, device) if frozen else None)
            extra = strategy.penalty(model, batch, logits)
        total = loss if extra is None else loss + extra
        if WORLD > 1:  # DDP averages the ranks' gradients; the shares sum to 1, so the average of
            total = total * share * WORLD  # WORLD·share·loss is the gradient of the whole batch's mean loss
        opt.zero_grad(set_to_none=True)
        total.backward()  # under DDP every rank now holds the same gradients
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):  # the same on every rank
            raise Stop(f"the loss ({loss.item():.3g}) or its gradients became inf or nan in {desc}, step "
                       f"{step + 1}; stopped before the update, keeping the last checkpoint: lower --lr and "
                       "rerun with --force-new")
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if save and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save(step + 1, opt)
    return loss.item()


@torch.no_grad()
def encode_images(model, sources, device, chunk=256):
    """The frozen vision tower's output for every image of some Examples (or None) -> {image bytes: output}.
    Encoded in fixed chunks, in row order: with two threads a row's floats can depend on the rows encoded
    beside it, so the grouping must not depend on which batch first met an image, which a resume changes."""
    images = torch.cat([rows.images for rows in sources if rows is not None])
    first = {}  # image bytes -> its first row: each distinct image is encoded once
    for i, image in enumerate(images):
        first.setdefault(image.numpy().tobytes(), i)
    keys, order, seen = list(first), list(first.values()), {}
    for i in range(0, len(order), chunk):
        outputs = model.vision(data.pixels(images[order[i:i + chunk]]).to(device))
        seen.update(zip(keys[i:i + chunk], outputs))
    return seen


@torch.no_grad()
def vision_seen(model, images, seen, device):
    """uint8 images (B, 3, H, W) -> the frozen vision tower's output, looked up in `seen` by their bytes. An
    image that encode_images did not cover is encoded alone, a grouping that no resume changes, and kept."""
    keys = [image.numpy().tobytes() for image in images]
    for i, key in enumerate(keys):
        if key not in seen:
            seen[key] = model.vision(data.pixels(images[i:i + 1]).to(device))[0]
    return torch.stack([seen[key] for key in keys])


@torch.no_grad()
def evaluate(model, strategy, tests, tok, device, cfg):
    """Greedy answers for every test row, through the strategy (which may route) -> score_tests' results."""
    if RANK > 0:  # under DDP rank 0 alone evaluates, and alone writes
        return [(float("nan"), [], [])] * len(tests)
    model.eval()

    def answer(images, ids):  # uint8 pixels and int16 prompts -> the answers' texts
        out = strategy.generate(model, data.pixels(images).to(device), ids.long().to(device),
                                model.cfg.max_text_len - ids.size(1), data.EOS).tolist()
        return [tok.decode(row[:row.index(data.EOS)] if data.EOS in row else row) for row in out]
    return score_tests(answer, tests, tok, cfg.eval_batch_size)


def random_row(mcfg, tests, tok, device, cfg):
    """Every task's accuracy of the untrained model (the run's seed): the reference of FWT_random."""
    model = VLM(mcfg, seed=cfg.seed).to(device)
    return [acc for acc, *_ in evaluate(model, strategies.Strategy(None), tests, tok, device, cfg)]


def load_checkpoint(path):
    """torch.load with weights_only=True, and a clear refusal of a damaged file or one carrying objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CLIError(f"{path} carries pickled Python objects, not only tensors: refused") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CLIError(f"{path} is damaged or truncated ({str(e).splitlines()[0][:80]}); move it away, "
                       "or rerun with --force-new") from None


def load_state(model, strategy, saved):
    """A checkpoint into the model. The strategy's state goes first: it says what the model must hold to fit
    the saved weights (e.g. LoRA adapters). base.pt has no strategy state."""
    if "strategy" in saved:
        strategy.load_state_dict(saved["strategy"])
        strategy.restore(model)
    model.load_state_dict(saved["model"])


def base_model(cfg, mcfg, tok, device):
    """The starting model: the alignment stage, then for --base multitask joint tuning on the held-in tasks.
    Each stage is cached under a key of everything that made it, and loaded again when that matches."""
    code = b"".join((Path(__file__).parent / n).read_bytes() for n in ("data.py", "model.py", "train.py"))
    key = dict(model=asdict(mcfg), batch_size=cfg.batch_size, seed=cfg.seed, tokenizer=tok.to_str(),
               bf16=cfg.bf16, threads=cfg.threads,  # more threads sum in another order: other bits
               n_test=cfg.n_test,  # the test layouts every stage leaves out depend on it
               code=hashlib.sha256(code).hexdigest())  # an edit of any of the three must not reuse a base
    held_out = data.test_layouts(cfg.n_test, cfg.seed)  # every task's test layouts: no stage trains on them
    stages = [("pretrained", [data.ALIGN], cfg.base_steps, cfg.base_lr, cfg.n_base)]
    if cfg.base == "multitask":  # with --freeze-vision the vision tower stays frozen here, as in task tuning
        stages.append(("multitask", list(data.HELD_IN.values()), cfg.multitask_steps, cfg.lr, cfg.n_train))
    paths = []
    for name, tasks, steps, lr, n in stages:  # each stage's key holds every stage before it
        key[name] = dict(tasks=[t.name for t in tasks], steps=steps, lr=lr, n=n,
                         frozen_vision=cfg.freeze_vision and name == "multitask")
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        paths.append(Path(cfg.cache_dir) / f"{name}-{digest}.pt")
    model = VLM(mcfg, seed=cfg.seed).to(device)
    done = max((i for i, path in enumerate(paths) if path.is_file()), default=-1)
    if done >= 0:
        model.load_state_dict(load_checkpoint(paths[done])["model"])
        print(f"base model: reused {paths[done]}")
    for (name, tasks, steps, lr, n), path in list(zip(stages, paths))[done + 1:]:
        t0, gen = time.time(), torch.Generator().manual_seed(cfg.seed)
        rows = data.Examples.concat([data.make_split(t, "train", n, cfg.seed, tok, mcfg.image_size,
                                                     mcfg.max_text_len, exclude=held_out)[0] for t in tasks])
        model.vision.requires_grad_(name == "pretrained" or not cfg.freeze_vision)
        plain = strategies.Strategy(None)  # no strategy: a base stage is ordinary training
        loss = train_steps(model, rows, plain, steps, lr, cfg, gen, device, f"base: {name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: torch.save({"model": model.state_dict(), "key": key}, p))
        print(f"base model: {name} stage, {steps} steps in {time.time() - t0:.0f} s (loss {loss:.3f}), "
              f"cached as {path}")
    return model, paths[-1]


def set_up(cfg, mcfg, scfg):
    """Check all that bad input can break, before any work, and open the run folder (resuming a checkpoint)
    -> (device, run folder, {name: task}, tokenizer, the resolved config, the checkpoint or None, the state of
    --first-task-from or None)."""
    names, device, run_dir = task_names(cfg.tasks), pick_device(cfg.device), Path(cfg.run_dir)
    if cfg.force_new:  # a fresh folder next to the old one, which stays as it is
        run_dir = next(p for i in range(2, 10 ** 6) if not (p := Path(f"{run_dir}-{i}")).exists())
    tasks = llava.read_tasks(names, cfg.image_root, cfg.truncate, run_dir / "cache")  # files checked here
    if cfg.bf16 and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        raise CLIError(f"--bf16 needs a CUDA device with bfloat16 support; this run is on {device.type}")
    if cfg.compile:  # torch.compile fails late and at length where it cannot work (no C++ compiler...)
        try:
            torch.compile(lambda x: x + 1)(torch.ones(2, device=device))
        except Exception as e:
            raise CLIError(f"--compile does not work here: {str(e).strip().splitlines()[0][:120]}") from None
    torch.set_num_threads(cfg.threads)
    tok = data.train_tokenizer(data.ALL_TASKS, cfg.seed, llava.file_texts(tasks.values()))  # a second
    mcfg.vocab_size = tok.get_vocab_size()
    config = {"train": asdict(cfg), "model": asdict(mcfg), "strategy": asdict(scfg)}
    strategy = strategies.build(cfg.strategy, scfg)  # only to ask it: may it take naive's first task?
    shared = first_task(cfg, config, strategy, next(iter(tasks))) if cfg.first_task_from else None
    saved = run_folder(cfg, config, run_dir)
    config["train"]["run_dir"] = cfg.run_dir = str(run_dir)
    atomic_write(run_dir / "tokenizer.json", lambda p: tok.save(str(p)))  # what --evaluate reads back
    atomic_write(run_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=1)))
    print(f"device {device} | strategy {cfg.strategy} | base {cfg.base} | preset {cfg.preset} | run folder "
          f"{run_dir}" + (f" | {WORLD} processes" if WORLD > 1 else "") + "\ntasks in order: "
          + " -> ".join(f"{n} ({task.like})" for n, task in tasks.items()))
    return device, run_dir, tasks, tok, config, saved, None if saved else shared  # a resume has trained it


def run_folder(cfg, config, run_dir):
    """Prove the run folder writable -> its checkpoint to resume, or None. A changed command is refused."""
    ckpt = run_dir / "checkpoint.pt"
    saved = load_checkpoint(ckpt) if ckpt.is_file() and not cfg.force_new else None
    if saved:  # resume only the same run: flags that change results must match
        old, new = ({k: v for part in c.values() for k, v in part.items()} for c in (saved["config"], config))
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
                if k not in SAME_RUN_ANYWAY and old.get(k) != v]
        if diff:
            raise CLIError(f"{run_dir} holds a run with other settings ({'; '.join(diff)}): rerun with its "
                           "settings to resume it, or add --force-new")
    elif cfg.resume:
        raise CLIError(f"--resume: nothing to resume in {run_dir} (no checkpoint.pt)")
    for folder, what in ((run_dir, "run folder"), (Path(cfg.cache_dir), "--cache-dir")):
        writable(folder, what)  # before any work is done
    return saved


def writable(folder, what):
    """Make the folder and prove it writable, or stop with one line naming it."""
    try:
        if RANK == 0:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"  # its own name: the study's runs share a cache
            probe.write_text("ok")
            probe.unlink()
    except OSError as e:
        raise CLIError(f"cannot write {what} {folder}: {e.strerror or e}") from None


def prepare_base(cfg, mcfg):
    """--base-only: train the base model of these settings (or find it in --cache-dir), then stop. Before a
    class; and the study's first step for each seed, so that its runs do not each train the same base."""
    tasks = llava.read_tasks(task_names(cfg.tasks), cfg.image_root, cfg.truncate, Path(cfg.run_dir) / "cache")
    writable(Path(cfg.cache_dir), "--cache-dir")
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    tok = data.train_tokenizer(data.ALL_TASKS, cfg.seed, llava.file_texts(tasks.values()))
    mcfg.vocab_size = tok.get_vocab_size()
    _, path = base_model(cfg, mcfg, tok, device)
    print(f"base model ready: {path}")


def task_rows(tasks, cfg, mcfg, tok, n_train):
    """-> (train splits, test splits) in task order: built-in tasks are drawn, task files are read."""
    def rows(task):
        if isinstance(task, llava.FileTask):
            return llava.load_file_task(task, cfg.seed, tok, mcfg.image_size, mcfg.max_text_len)
        return data.make_task(task, n_train, cfg.n_test, cfg.seed, tok, mcfg.image_size, mcfg.max_text_len)
    return tuple(zip(*[rows(task) for task in tasks.values()]))


def checkpoint(path, progress, config, model, strategy, gen=None, opt=None):
    """Everything a resume needs -> path, atomically (rank 0 alone writes); -> the state written."""
    state = dict(config=config, model=model.state_dict(), strategy=strategy.state_dict(), **progress,
                 trainable=[n for n, p in model.named_parameters() if p.requires_grad],
                 gen=gen and gen.get_state(), optimizer=opt and opt.state_dict())
    atomic_write(path, lambda p: torch.save(state, p))
    return state


def first_task(cfg, config, strategy, name):
    """--first-task-from FOLDER -> the naive run's state after its first task, if training it here would give
    the same bits: the strategy trains its first task as naive does, and that run had these settings."""
    path = Path(cfg.first_task_from) / f"task1-{name}.pt"
    if not strategy.naive_first:
        raise CLIError(f"--first-task-from: {cfg.strategy} does not train its first task as naive does")
    if not path.is_file():
        raise CLIError(f"--first-task-from: no {path} (the first task of a naive run)")
    saved = load_checkpoint(path)
    skip = SAME_RUN_ANYWAY - {"threads"} | {"strategy"}  # more threads sum in another order: other bits
    theirs, ours = ({k: v for part in ("train", "model") for k, v in c[part].items() if k not in skip}
                    for c in (saved["config"], config))
    diff = [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if saved["config"]["train"]["strategy"] != "naive" or diff:
        raise CLIError(f"--first-task-from: {path} is not of a naive run with these settings "
                       f"({'; '.join(diff) or saved['config']['train']['strategy']})")
    return saved


def tune(t, model, strategy, rows, cfg, device, desc, saved, save, shared=None):
    """Train task t: strategy.before_task, the steps, strategy.after_task; from `saved` if it stopped inside
    task t; with `shared` (first_task), its weights instead of the steps.
    -> (the last training loss, the number of trainable parameters)."""
    resumed = saved is not None and saved["task"] == t and saved["step"] > 0
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + t + 1)  # one stream per task
    if resumed:  # within the task: as it was saved
        for n, p in model.named_parameters():
            p.requires_grad_(n in saved["trainable"])
        gen.set_state(saved["gen"])
    else:
        model.vision.requires_grad_(not cfg.freeze_vision)
        strategy.before_task(model, t, rows)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if shared is not None:  # naive's weights after this task: what the steps would make (test_speed.py)
        model.load_state_dict(shared["model"])
        loss = shared["losses"][0]
    else:
        loss = train_steps(model, rows, strategy, cfg.steps, cfg.lr, cfg, gen, device, desc,
                           saved["step"] if resumed else 0, saved["optimizer"] if resumed else None,
                           save=lambda step, opt: save(step, gen, opt))
    strategy.after_task(model, t, rows)
    return loss, trainable


def run(cfg, mcfg, scfg):
    """The protocol of He et al.: a base model, then each task in turn, every task evaluated after each."""
    t_start = time.time()
    device, run_dir, tasks, tok, config, saved, shared = set_up(cfg, mcfg, scfg)
    names = list(tasks)  # a task file's name is its stem
    t0 = time.time()
    trains, tests = task_rows(tasks, cfg, mcfg, tok, cfg.n_train)
    print(f"data: {len(names)} tasks, {sum(map(len, trains))} train + {sum(map(len, tests))} test rows "
          f"in {time.time() - t0:.1f} s")

    t_base = time.time()
    model, base_path = base_model(cfg, mcfg, tok, device)
    t_rows = time.time()
    base_seconds = t_rows - t_base  # trained, or loaded from the cache
    atomic_write(run_dir / "base.pt", lambda p: p.write_bytes(base_path.read_bytes()))
    strategy = strategies.build(cfg.strategy, scfg, cfg.seed)
    if saved:
        load_state(model, strategy, saved)
        done, where = saved["task"] == len(names), f"task {saved['task'] + 1}, step {saved['step']}"
        print(f"resuming from {run_dir}/checkpoint.pt: "
              + ("finished, nothing left to train" if done else where))
    stages = ("matrix", "format_matrix", "content_matrix", "space_shares", "timings", "losses")  # a row each
    progress = {k: saved[k] for k in ("task", "step", "base_row", "random_row", *stages)} if saved else dict(
        task=0, step=0, base_row=[acc for acc, *_ in evaluate(model, strategy, tests, tok, device, cfg)],
        random_row=random_row(mcfg, tests, tok, device, cfg), **{k: [] for k in stages})
    rows_seconds = time.time() - t_rows  # the base's and the random model's rows (a resumed run has them)
    spaces = [answer_space(name, rows.answers) for name, rows in zip(names, trains)]
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; accuracy (%) on each task "
          "after each stage:\n" + format_matrix(names, progress["matrix"], progress["base_row"]))

    results, first = [], progress["task"]  # a resumed run trains from task `first` on
    for t in range(first, len(names)):
        t0, desc = time.time(), f"task {t + 1}/{len(names)}: {names[t]}"
        def save(step, gen, opt):  # inside task t: where it stands, to resume from
            state = {**progress, "task": t, "step": step}
            checkpoint(run_dir / "checkpoint.pt", state, config, model, strategy, gen, opt)
        loss, trainable = tune(t, model, strategy, trains[t], cfg, device, desc, saved, save,
                               shared if t == 0 else None)
        t1 = time.time()
        results = evaluate(model, strategy, tests, tok, device, cfg)
        for key, row in stage_rows(results, spaces).items():  # accuracy, format, content, answer spaces
            progress[key].append(row)
        reused = shared["timings"][0]["train_seconds"] if shared and t == 0 else 0  # counted as if trained
        progress["timings"].append(dict(task=names[t], train_seconds=t1 - t0 + reused, reused_seconds=reused,
                                        eval_seconds=time.time() - t1, trainable=trainable))
        progress["losses"].append(loss)
        progress.update(task=t + 1, step=0)
        tqdm.write(format_row(names[t], progress["matrix"][-1], names))
        state = checkpoint(run_dir / "checkpoint.pt", progress, config, model, strategy)
        atomic_write(run_dir / f"task{t + 1}-{names[t]}.pt", lambda p: torch.save({**state, "task": t}, p))
    matrix, base_row = progress["matrix"], progress["base_row"]
    out = dict(config=config, tasks=names, base_row=base_row, random_row=progress["random_row"],
               matrix=matrix,
               **{k: progress[k] for k in ("format_matrix", "content_matrix", "space_shares")},
               metrics=all_metrics(matrix, base_row, progress["random_row"]),
               final_loss=progress["losses"],  # each task's last loss
               timings=progress["timings"], extra_bytes=strategy.extra_bytes(),
               n_params=sum(p.numel() for p in model.parameters()), device=str(device),
               torch=torch.__version__, wall_seconds=time.time() - t_start, world_size=WORLD)
    trained, evals, reused = (sum(s.get(k, 0) for s in progress["timings"][first:])  # this process's work
                              for k in ("train_seconds", "eval_seconds", "reused_seconds"))
    parts = dict(set_up=t_base - t_start, base=base_seconds, tasks=trained - reused,  # the time spent here
                 evaluation=evals + rows_seconds)
    out["breakdown"] = {**parts, "other": out["wall_seconds"] - sum(parts.values())}  # checkpoints, report
    out.update(strategy.extra_results(model, tests))  # e.g. expansion's task-ID accuracy, TIR's similarity
    if strategy.oracle(0) is not None:  # told each task: what the strategy could reach with perfect routing
        out["oracle_row"] = [evaluate(model, strategy.oracle(j), [test], tok, device, cfg)[0][0]
                             for j, test in enumerate(tests)]
    report(run_dir, out, results, cfg.show_mistakes)
    return out


def report(run_dir, out, results, show_mistakes):
    """results.json, accuracy.png, format.png and content.png into the run folder; the report and the first
    mistakes printed."""
    atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(out, indent=1)))
    pictures = [("accuracy", "matrix", "accuracy (%)"), ("content", "content_matrix", "content (% right)"),
                ("format", "format_matrix", "format (% in the task's space)")]
    for name, key, what in pictures:
        def draw(path):  # called by rank 0 alone: the other ranks have no scores to draw
            title = f"{out['config']['train']['strategy']}: {what}"
            heatmap(out["tasks"], out[key], title).save(path, format="PNG")
        atomic_write(run_dir / f"{name}.png", draw)
    print("\n" + format_report(out))
    for (acc, mistakes, _), name in zip(results, out["tasks"]):
        for q, pred, ref in mistakes[:show_mistakes]:
            print(f"  {name}: {q!r} -> {pred!r} (expected {ref!r})")
    print(f"wrote {run_dir}/results.json, accuracy.png, format.png and content.png")


def reevaluate(run_dir, path):
    """Evaluate a saved checkpoint of a run on all of that run's tasks, through its strategy -> accuracies."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        raise CLIError(f"{path}: its folder {run_dir} holds no readable config.json of a run") from None
    cfg, mcfg = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    strategy = strategies.build(cfg.strategy, strategies.StrategyConfig(**config["strategy"]), cfg.seed)
    model = VLM(mcfg)
    try:
        load_state(model, strategy, load_checkpoint(path))
    except (RuntimeError, KeyError) as e:  # another run's or a foreign checkpoint
        raise CLIError(f"{path} does not fit the run in {run_dir}: {str(e).splitlines()[0][:80]}") from None
    tok = Tokenizer.from_file(str(Path(run_dir) / "tokenizer.json"))
    tasks = llava.read_tasks(task_names(cfg.tasks), cfg.image_root, cfg.truncate, Path(run_dir) / "cache")
    tests = task_rows(tasks, cfg, mcfg, tok, 1)[1]  # one train row: only the tests are needed
    accs = [acc for acc, *_ in evaluate(model, strategy, tests, tok, torch.device("cpu"), cfg)]
    names = list(tasks)
    print(f"re-evaluated {path}:\n{format_header(names)}\n{format_row(Path(path).stem, accs, names)}")
    return accs


def main(argv=None):
    try:
        cfg, mcfg, scfg = parse(argv)
        if cfg.evaluate:  # a checkpoint evaluated again, with the settings of the run folder it lies in
            reevaluate(Path(cfg.evaluate).parent, cfg.evaluate)
            return 0
        if WORLD > 1:  # launched by torchrun: join the others; only rank 0 prints
            cuda = "cuda" in cfg.device or cfg.device == "auto" and torch.cuda.is_available()
            dist.init_process_group("nccl" if cuda else "gloo")
            sys.stdout = open(os.devnull, "w") if RANK > 0 else sys.stdout
        print("config: " + json.dumps({**asdict(cfg), **asdict(mcfg), **asdict(scfg)}))
        prepare_base(cfg, mcfg) if cfg.base_only else run(cfg, mcfg, scfg)
    except (Stop, llava.TaskFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints written so far stay, and the same command resumes
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
