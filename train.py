"""Continual instruction tuning: train a base model, then tune it on tasks one after another.

    python train.py --strategy replay          # the whole job on a laptop CPU, in about three minutes
    python train.py --strategy naive --help    # every flag, with the reason for its default

The protocol of He et al., Continual Instruction Tuning for Large Multimodal Models (arXiv 2311.16206): a
base model, then for each task in turn: tune on it, evaluate every task, record one row of the accuracy
matrix. The run folder (runs/<strategy>) gets results.json and heatmaps; runner.py keeps the folder, the
checkpoints and the refusals. `torchrun --nproc_per_node=N train.py ...` splits each batch among N
processes (torch's DDP, gloo or nccl).
"""
import os

# Before torch loads OpenMP: a thread waiting for work sleeps instead of spinning, so that two threads do not
# fight a busy core for their turn (measured: tools/bench_train.py --threads-only). A value you set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import hashlib
import inspect
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import llava
import runner
import strategies
from data import atomic_write
from eval import all_metrics, answer_space, format_header, format_matrix, format_row, row_spaces
from eval import examples_features, score_tests, stage_rows
from model import VLM
from runner import RANK, WORLD, Stop


def run(cfg, mcfg, scfg):
    """The protocol: a base model, then each task in turn, every task evaluated after each -> results."""
    clock = {"start": time.time()}
    device, run_dir, tasks, tok, config, saved, shared = runner.set_up(cfg, mcfg, scfg)
    names = list(tasks)  # a task file's name is its stem
    trains, tests = runner.task_rows(tasks, cfg, mcfg, tok, cfg.n_train)
    print(f"data: {len(names)} tasks, {sum(map(len, trains))} train + {sum(map(len, tests))} test rows")
    clock["base"] = time.time()
    model, base_path = base_model(cfg, mcfg, tok, device)
    atomic_write(run_dir / "base.pt", lambda p: p.write_bytes(base_path.read_bytes()))
    clock["rows"] = time.time()
    strategy = strategies.build(cfg.strategy, scfg, cfg.seed)
    progress = start_or_resume(model, strategy, saved, run_dir, names, tests, tok, device, cfg)
    clock["tasks"] = time.time()
    spaces = [answer_space(name, rows.answers) for name, rows in zip(names, trains)]
    per_row = [row_spaces(space, test.answers) for space, test in zip(spaces, tests)]
    results, first = [], progress["task"]  # a resumed run trains from task `first` on
    for t in range(first, len(names)):
        t0 = time.time()

        def save(step, gen, opt):  # inside task t: where it stands, to resume from
            state = {**progress, "task": t, "step": step}
            runner.checkpoint(run_dir / "checkpoint.pt", state, config, model, strategy, gen, opt)
        loss, trainable = tune(t, model, strategy, trains[t], cfg, device, f"task {t + 1}/{len(names)}: "
                               f"{names[t]}", saved, save, shared if t == 0 else None)
        t1 = time.time()
        results = evaluate(model, strategy, tests, tok, device, cfg)
        reused = shared["timings"][0]["train_seconds"] if shared and t == 0 else 0  # counted as if trained
        timing = dict(task=names[t], train_seconds=t1 - t0 + reused, reused_seconds=reused,
                      eval_seconds=time.time() - t1, trainable=trainable)
        rows = stage_rows(results, spaces, per_row)
        runner.finish_task(run_dir, progress, names, rows, loss, timing, config, model, strategy)
    out = results_of(progress, first, clock, config, names, model, strategy, tests, tok, device, cfg)
    runner.report(run_dir, out, results, cfg.show_mistakes)
    return out


def train_steps(model, rows, strategy, steps, lr, cfg, gen, device, desc, start=0, opt_state=None, save=None):
    """AdamW over the trainable parameters, warm-up then cosine decay; the strategy's hooks shape each batch.
    From step `start` with a saved optimizer state when resuming; save(step, opt) every --checkpoint-every."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" or None  # one kernel for all parameters on a GPU
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused)
    if opt_state:
        opt.load_state_dict(opt_state)
    # torchrun: torch's DDP all-reduces the gradients in buckets while backward still runs. Wrapped afresh
    # for every stage, since a strategy may add parameters between tasks (LoRA adapters, experts). The hooks
    # get the unwrapped model: per-sample importances (vmap) run on it, and a penalty's gradient still joins
    # the all-reduce, which DDP hooks on each parameter's gradient, not on the forward.
    module = DistributedDataParallel(model) if WORLD > 1 else model
    forward = torch.compile(module) if cfg.compile else module
    frozen = not cfg.bf16 and not any(p.requires_grad for p in model.vision.parameters())
    # a frozen vision tower's output for every image the batches can hold: computed once, not each step
    seen = llava.encode_images(model, [rows, strategy.stored_rows()], device) if frozen else None
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, leave=False, dynamic_ncols=True,
               disable=not progress_bars())
    for step in bar:
        for group in opt.param_groups:  # linear warm-up over 5 %, then cosine from 1 down to 0.1
            warmup, cosine = (step + 1) / max(1, steps // 20), 0.55 + 0.45 * math.cos(math.pi * step / steps)
            group["lr"] = lr * min(warmup, cosine)
        fresh = rows.subset(torch.randint(len(rows), (cfg.batch_size,), generator=gen))
        batch_rows = strategy.batch(fresh, gen)
        batch = llava.to_batch(batch_rows, range(len(batch_rows)), device)
        images = batch_rows.images
        if WORLD > 1:  # each rank takes every WORLD-th row; scaled so that summed gradients average the batch
            share = (batch[2][RANK::WORLD] != -100).sum() / (batch[2] != -100).sum()
            batch, images = tuple(x[RANK::WORLD] for x in batch), images[RANK::WORLD]
        with torch.autocast(device.type, torch.bfloat16) if cfg.bf16 else contextlib.nullcontext():
            seen_now = llava.vision_seen(model, images, seen, device) if frozen else None
            logits, loss = forward(*batch, seen=seen_now)
            extra = strategy.penalty(model, batch, logits)
        # DDP averages the ranks' gradients; the shares sum to 1, so the average of WORLD·share·loss is the
        # gradient of the whole batch's mean loss. A penalty is the same on every rank (EWC's) or a mean over
        # the rank's rows (LwF's): the ranks' average is the whole batch's, as it stands
        total = loss * (share * WORLD if WORLD > 1 else 1) + (0 if extra is None else extra)
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


def progress_bars():
    """Bars on a terminal only: in a log, one line per stage and task (TQDM_DISABLE turns them off too)."""
    return RANK == 0 and sys.stderr.isatty() and "TQDM_DISABLE" not in os.environ


@torch.no_grad()
def evaluate(model, strategy, tests, tok, device, cfg):
    """Greedy answers for every test row, through the strategy (which may route) -> score_tests' results."""
    if RANK > 0:  # under DDP rank 0 alone evaluates, and alone writes
        return [(float("nan"), [], [])] * len(tests)
    model.eval()

    def answer(images, ids):  # uint8 pixels and int16 prompts -> the answers' texts
        out = strategy.generate(model, llava.pixels(images).to(device), ids.long().to(device),
                                model.cfg.max_text_len - ids.size(1), llava.EOS).tolist()
        return [tok.decode(row[:row.index(llava.EOS)] if llava.EOS in row else row) for row in out]
    return score_tests(answer, tests, tok, cfg.eval_batch_size)


def random_row(mcfg, tests, tok, device, cfg):
    """Every task's accuracy of the untrained model (the run's seed): the reference of FWT_random."""
    model = VLM(mcfg, seed=cfg.seed).to(device)
    return [acc for acc, *_ in evaluate(model, strategies.Strategy(None), tests, tok, device, cfg)]


def base_model(cfg, mcfg, tok, device):
    """The starting model: the alignment stage, then for --base multitask joint tuning on the held-in tasks.
    Each stage is cached under a key of everything that made it, and loaded again when that matches."""
    key = dict(model=asdict(mcfg), batch_size=cfg.batch_size, seed=cfg.seed, tokenizer=tok.to_str(),
               bf16=cfg.bf16, threads=cfg.threads,  # more threads sum in another order: other bits
               n_test=cfg.n_test,  # the test layouts every stage leaves out depend on it
               code=base_code())
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
        model.load_state_dict(runner.load_checkpoint(paths[done])["model"])
        print(f"base model: reused {paths[done]}")
    for (name, tasks, steps, lr, n), path in list(zip(stages, paths))[done + 1:]:
        t0, gen = time.time(), torch.Generator().manual_seed(cfg.seed)
        rows = llava.Examples.concat([llava.make_split(t, "train", n, cfg.seed, tok, mcfg.image_size,
                                                     mcfg.max_text_len, exclude=held_out)[0] for t in tasks])
        model.vision.requires_grad_(name == "pretrained" or not cfg.freeze_vision)
        plain = strategies.Strategy(None)  # no strategy: a base stage is ordinary training
        loss = train_steps(model, rows, plain, steps, lr, cfg, gen, device, f"base: {name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: torch.save({"model": model.state_dict(), "key": key}, p))
        print(f"base model: {name} stage, {steps} steps in {time.time() - t0:.0f} s (loss {loss:.3f}), "
              f"cached as {path}")
    return model, paths[-1]


def base_code():
    """A digest of the code that makes a base: data.py, llava.py (tokens and batches), attention.py, model.py
    and base_model itself. The rest of this file is left out, so an edit of the task loop (an exercise's, say)
    keeps the cached bases."""
    here = Path(__file__).parent
    files = ("data.py", "llava.py", "attention.py", "model.py")
    code = b"".join((here / name).read_bytes() for name in files)
    return hashlib.sha256(code + inspect.getsource(base_model).encode()).hexdigest()


def prepare_base(cfg, mcfg):
    """--base-only: train the base model of these settings (or find it in --cache-dir), then stop. Before a
    class; and the study's first step for each seed, so that its runs do not each train the same base."""
    _, path = base_model(cfg, mcfg, *runner.set_up_base(cfg, mcfg))
    print(f"base model ready: {path}")


def pairs(cfg, mcfg, scfg):
    """--pair-first TASK, a unit of study.py --pairs: TASK tuned from the base, then each other task of
    --tasks from TASK's weights in turn, as naive's second task (`--tasks TASK,OTHER` gives the same bits).
    -> results.json: TASK's accuracy (and last loss) alone, and after each other task (with that task's
    own); TASK's mean features on the base (eval.row_features), for the similarity of every pair."""
    device, run_dir, tasks, tok, config, _, _ = runner.set_up(cfg, mcfg, scfg)
    names, t0, skip = list(tasks), time.time(), lambda *_: None  # skip: no checkpoints within a task
    trains, tests = runner.task_rows(tasks, cfg, mcfg, tok, cfg.n_train)
    model, _ = base_model(cfg, mcfg, tok, device)
    i, naive = names.index(cfg.pair_first), strategies.build("naive", scfg, cfg.seed)
    base = dict(model.named_parameters())  # read before any training: the base's vision tower and embedding
    features = [f.mean(0).tolist() for f in examples_features(model, base, trains[i])]
    loss = tune(0, model, naive, trains[i], cfg, device, f"{names[i]} from the base", None, skip)[0]
    first = {k: v.clone() for k, v in model.state_dict().items()}
    alone = dict(acc=evaluate(model, naive, [tests[i]], tok, device, cfg)[0][0], loss=loss)
    after = {}  # each other task -> the accuracy on TASK after it, its own accuracy, its last loss
    for j in (j for j in range(len(names)) if j != i):
        model.load_state_dict(first)
        loss = tune(1, model, naive, trains[j], cfg, device, f"{names[j]} after {names[i]}", None, skip)[0]
        acc, own = (acc for acc, *_ in evaluate(model, naive, [tests[i], tests[j]], tok, device, cfg))
        after[names[j]] = dict(first=acc, own=own, loss=loss)
        print(f"{names[i]} {alone['acc']:.1f} -> {acc:.1f} after {names[j]}, which reached {own:.1f}")
    out = dict(config=config, tasks=names, first=names[i], alone=alone, after=after, features=features,
               wall_seconds=time.time() - t0)
    atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(out, indent=1)))


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


def start_or_resume(model, strategy, saved, run_dir, names, tests, tok, device, cfg):
    """The run's progress so far: from the checkpoint when resuming, else the base and random models' rows
    and empty matrices, one row per task to come."""
    if saved:
        runner.load_state(model, strategy, saved)
        done, where = saved["task"] == len(names), f"task {saved['task'] + 1}, step {saved['step']}"
        print(f"resuming from {run_dir}/checkpoint.pt: "
              + ("finished, nothing left to train" if done else where))
    stages = ("matrix", "format_matrix", "content_matrix", "space_shares", "timings", "losses")  # a row each
    progress = {k: saved[k] for k in ("task", "step", "base_row", "random_row", *stages)} if saved else dict(
        task=0, step=0, base_row=[acc for acc, *_ in evaluate(model, strategy, tests, tok, device, cfg)],
        random_row=random_row(model.cfg, tests, tok, device, cfg), **{k: [] for k in stages})
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; accuracy (%) on each task "
          "after each stage:\n" + format_matrix(names, progress["matrix"], progress["base_row"]))
    return progress


def results_of(progress, first, clock, config, names, model, strategy, tests, tok, device, cfg):
    """What results.json holds: the matrices, the metrics, the times, and what the strategy reports."""
    matrix, base_row = progress["matrix"], progress["base_row"]
    out = dict(config=config, tasks=names, base_row=base_row, random_row=progress["random_row"],
               matrix=matrix, **{k: progress[k] for k in ("format_matrix", "content_matrix", "space_shares")},
               metrics=all_metrics(matrix, base_row, progress["random_row"]),
               final_loss=progress["losses"],  # each task's last loss
               timings=progress["timings"], extra_bytes=strategy.extra_bytes(),
               n_params=sum(p.numel() for p in model.parameters()), device=str(device),
               torch=torch.__version__, wall_seconds=time.time() - clock["start"], world_size=WORLD)
    trained, evals, reused = (sum(s.get(k, 0) for s in progress["timings"][first:])  # this process's work
                              for k in ("train_seconds", "eval_seconds", "reused_seconds"))
    parts = dict(set_up=clock["base"] - clock["start"], base=clock["rows"] - clock["base"],
                 tasks=trained - reused, evaluation=evals + clock["tasks"] - clock["rows"])
    out["breakdown"] = {**parts, "other": out["wall_seconds"] - sum(parts.values())}  # checkpoints, report
    out.update(strategy.extra_results(model, tests))  # e.g. expansion's task-ID accuracy, TIR's similarity
    if strategy.oracle(0) is not None:  # told each task: what the strategy could reach with perfect routing
        out["oracle_row"] = [evaluate(model, strategy.oracle(j), [test], tok, device, cfg)[0][0]
                             for j, test in enumerate(tests)]
    return out


def reevaluate(path):
    """A saved checkpoint, evaluated on all of its run's tasks through the run's strategy -> accuracies."""
    cfg, model, strategy, tok, names, tests = runner.load_run(path)
    accs = [acc for acc, *_ in evaluate(model, strategy, tests, tok, torch.device("cpu"), cfg)]
    print(f"re-evaluated {path}:\n{format_header(names)}\n{format_row(Path(path).stem, accs, names)}")
    return accs


def main(argv=None):
    try:
        cfg, mcfg, scfg = runner.parse(argv)
        if cfg.evaluate:  # a checkpoint evaluated again, with the settings of the run folder it lies in
            reevaluate(cfg.evaluate)
            return 0
        if cfg.export:  # the same rows that a run with these settings draws, as files anyone can read
            llava.export(cfg.export, cfg.n_train, cfg.n_test, cfg.seed, mcfg.image_size, cfg.benchmark)
            print(f"wrote the {len(data.TASKS)} built-in tasks to {cfg.export}: <task>.json, "
                  "<task>.test.json, images/")
            return 0
        if WORLD > 1:  # launched by torchrun: join the others; only rank 0 prints
            cuda = "cuda" in cfg.device or cfg.device == "auto" and torch.cuda.is_available()
            dist.init_process_group("nccl" if cuda else "gloo")
            sys.stdout = open(os.devnull, "w") if RANK > 0 else sys.stdout
        print(runner.settings_line(cfg, mcfg, scfg))
        prepare_base(cfg, mcfg) if cfg.base_only else pairs(cfg, mcfg, scfg) if cfg.pair_first else run(
            cfg, mcfg, scfg)
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
