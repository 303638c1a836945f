"""A run's settings and its folder: the config dataclass and its CLI, checkpoints, resume and refusals.

    python train.py --help      # every flag, from TrainConfig, ModelConfig and StrategyConfig

train.py holds the protocol; this file holds what keeps a run safe to start, stop and start again. Bad input
is refused before any work with one line (CLIError, exit 2). A run folder (runs/<strategy>) gets config.json
and tokenizer.json first, then checkpoint.pt every --checkpoint-every steps, written atomically and loaded
with weights_only=True; rerunning the command resumes it, and a command that would compute something else
is refused with the settings that differ.
"""
import argparse
import itertools
import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import data
import llava
import strategies
from data import atomic_write
from eval import format_report, format_row
from model import PRESETS, VLM, ModelConfig, arg
from report import heatmap


@dataclass
class TrainConfig:
    strategy: str = arg("naive", "continual-learning strategy; combine parts with '+', e.g. replay+naive")
    tasks: str = arg("paper", f"an order ({', '.join(data.ORDERS)}), or a comma list of tasks and task files")
    benchmark: str = arg("single", "built-in tasks of one kind of question each (single), or with the other "
                         "kinds their datasets hold (mixed), so that answer forms recur across tasks")
    image_root: str = arg("", "where task files' image paths start; empty means each file's own folder")
    truncate: bool = arg(False, "cut task-file rows longer than --max-text-len (and count them), not stop")
    preset: str = arg("tiny", "size of model and schedule: tiny for a CPU, small or base for a GPU")
    base: str = arg("pretrained", "pretrained (alignment only), or multitask (then held-in tasks jointly)")
    steps: int = arg(400, "training steps per task: enough for every task to reach 90 (docs/benchmark.md)")
    batch_size: int = arg(32, "rows per step; small batches keep a CPU step at a few milliseconds")
    lr: float = arg(5e-4, "peak AdamW learning rate of the task stage; higher ones fail to learn reading")
    base_steps: int = arg(3000, "steps of the alignment stage (captions, grounded captions): enough to learn "
                          "the grounded captions; cached, so paid once")
    base_lr: float = arg(2e-3, "peak learning rate of the alignment stage: higher stalls, lower is slow")
    multitask_steps: int = arg(1000, "--base multitask: steps of joint tuning on the held-in tasks, at --lr")
    n_train: int = arg(4000, "training rows per task, each seen about 3 times in 400 steps: fewer, seen more "
                       "often, are learnt by heart")
    n_test: int = arg(150, "test rows per task: a few points of sampling noise, cheap to evaluate")
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
    export: str = arg("", "write the benchmark these settings train on (built-in tasks) as LLaVA task files "
                      "into this folder, then stop")
    base_only: bool = arg(False, "only train (or find cached) the base model of these settings, then stop")
    first_task_from: str = arg("", "a naive run of these settings: take its first task's weights instead of "
                               "training them (the same bits; for strategies that train it as naive does)")
    pair_first: str = arg("", "a task of --tasks: tune it from the base, then each other task from its "
                          "weights in turn, and stop (naive; study.py --pairs runs one per task)")
    compile: bool = arg(False, "torch.compile the model for training: a one-off delay, then faster steps")
    bf16: bool = arg(False, "bfloat16 autocast on CUDA: faster matmuls; weights and optimizer stay fp32")


BASES = ("pretrained", "multitask")  # alignment only, and that base tuned jointly on the held-in tasks
TRAIN_PRESETS = {"tiny": {}, "small": dict(batch_size=64, steps=300, base_steps=2000, n_train=4000),
                 "base": dict(batch_size=64, steps=500, base_steps=4000, n_train=8000)}

POSITIVE = ("steps", "batch_size", "lr", "base_lr", "n_train", "n_test", "n_base", "eval_batch_size",
            "threads", "multitask_steps", "checkpoint_every")
SAME_RUN_ANYWAY = {"run_dir", "cache_dir", "threads", "show_mistakes", "checkpoint_every", "resume",
                   "force_new", "evaluate", "export", "base_only",
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
    names = task_names(cfg.tasks)  # fails early on unknown tasks
    if cfg.pair_first and cfg.pair_first not in names:
        raise CLIError(f"--pair-first {cfg.pair_first!r} is not one of --tasks; "
                       f"choose from {', '.join(names)}")
    if cfg.pair_first and cfg.strategy != "naive":
        raise CLIError(f"--pair-first trains as naive does; drop --strategy {cfg.strategy}")
    if cfg.benchmark not in data.BENCHMARKS:
        raise CLIError(f"unknown benchmark {cfg.benchmark!r}; choose from {', '.join(data.BENCHMARKS)}")
    if cfg.base not in BASES:
        raise CLIError(f"unknown base {cfg.base!r}; choose from {', '.join(BASES)}")
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


def set_up(cfg, mcfg, scfg):
    """Check all that bad input can break, before any work, and open the run folder (resuming a checkpoint)
    -> (device, run folder, {name: task}, tokenizer, the resolved config, the checkpoint or None, the state of
    --first-task-from or None)."""
    names, device, run_dir = task_names(cfg.tasks), pick_device(cfg.device), Path(cfg.run_dir)
    if cfg.force_new:  # a fresh folder next to the old one, which stays as it is
        run_dir = next(p for i in range(2, 10 ** 6) if not (p := Path(f"{run_dir}-{i}")).exists())
    tasks = llava.read_tasks(names, cfg.image_root, cfg.truncate, run_dir / "cache",
                             cfg.benchmark)  # files checked here
    if cfg.bf16 and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        raise CLIError(f"--bf16 needs a CUDA device with bfloat16 support; this run is on {device.type}")
    if cfg.compile:  # torch.compile fails late and at length where it cannot work (no C++ compiler...)
        try:
            torch.compile(lambda x: x + 1)(torch.ones(2, device=device))
        except Exception as e:
            raise CLIError(f"--compile does not work here: {str(e).strip().splitlines()[0][:120]}") from None
    torch.set_num_threads(cfg.threads)
    tok = llava.train_tokenizer(data.ALL_TASKS, cfg.seed, llava.file_texts(tasks.values()))  # a second
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
        diff = config_diff(saved["config"], config, SAME_RUN_ANYWAY)
        if diff:
            raise CLIError(f"{run_dir} holds a run with other settings ({'; '.join(diff)}): rerun with its "
                           "settings to resume it, or add --force-new")
    elif cfg.resume:
        raise CLIError(f"--resume: nothing to resume in {run_dir} (no checkpoint.pt)")
    for folder, what in ((run_dir, "run folder"), (Path(cfg.cache_dir), "--cache-dir")):
        writable(folder, what)  # before any work is done
    return saved


def config_diff(old, new, ignore=()):
    """Two configs ({part: {field: value}}) -> 'field old -> new' for each field that differs, but those in
    `ignore` and the strategy options that the new config's strategy does not read (a changed default of
    EWC's does not make a naive run another). Resume, --first-task-from and the study's reuse ask it."""
    read = strategies.build(new["train"]["strategy"], strategies.StrategyConfig()).options
    ignore = set(ignore) | set(new.get("strategy", {})) - set(read)
    old, new = ({k: v for part in c.values() for k, v in part.items()} for c in (old, new))
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in ignore and old.get(k) != v]


def settings_line(cfg, mcfg, scfg):
    """The settings that differ from the defaults (of the preset), in one line; config.json holds them all."""
    defaults = (TrainConfig(**TRAIN_PRESETS[cfg.preset]), ModelConfig(**PRESETS[cfg.preset]),
                strategies.StrategyConfig())
    changed = [f"{f.name}={getattr(ours, f.name)}" for ours, default in zip((cfg, mcfg, scfg), defaults)
               for f in fields(ours) if f.name not in ("threads", "run_dir", "vocab_size")  # shown elsewhere
               and getattr(ours, f.name) != getattr(default, f.name)]
    return "settings: " + (", ".join(changed) or "the defaults")


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
    theirs, ours = ({part: c[part] for part in ("train", "model")} for c in (saved["config"], config))
    diff = config_diff(theirs, ours, skip)
    if saved["config"]["train"]["strategy"] != "naive" or diff:
        raise CLIError(f"--first-task-from: {path} is not of a naive run with these settings "
                       f"({'; '.join(diff) or saved['config']['train']['strategy']})")
    return saved


def set_up_base(cfg, mcfg):
    """--base-only: what a base needs (a device, and the tokenizer of the run's tasks) -> (tok, device)."""
    tasks = llava.read_tasks(task_names(cfg.tasks), cfg.image_root, cfg.truncate, Path(cfg.run_dir) / "cache",
                             cfg.benchmark)
    writable(Path(cfg.cache_dir), "--cache-dir")
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    tok = llava.train_tokenizer(data.ALL_TASKS, cfg.seed, llava.file_texts(tasks.values()))
    mcfg.vocab_size = tok.get_vocab_size()
    return tok, device


def load_run(path):
    """--evaluate FILE: the run that FILE (a checkpoint) belongs to, from the config.json in its folder ->
    (TrainConfig, the model and strategy holding FILE's state, tokenizer, task names, test rows)."""
    run_dir = Path(path).parent
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise CLIError(f"{path}: its folder {run_dir} holds no readable config.json of a run") from None
    cfg, mcfg = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    strategy = strategies.build(cfg.strategy, strategies.StrategyConfig(**config["strategy"]), cfg.seed)
    model = VLM(mcfg)
    try:
        load_state(model, strategy, load_checkpoint(path))
    except (RuntimeError, KeyError) as e:  # another run's or a foreign checkpoint
        raise CLIError(f"{path} does not fit the run in {run_dir}: {str(e).splitlines()[0][:80]}") from None
    tok = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    tasks = llava.read_tasks(task_names(cfg.tasks), cfg.image_root, cfg.truncate, run_dir / "cache",
                             cfg.benchmark)
    tests = task_rows(tasks, cfg, mcfg, tok, 1)[1]  # one train row: only the tests are needed
    return cfg, model, strategy, tok, list(tasks), tests


def finish_task(run_dir, progress, names, rows, loss, timing, config, model, strategy):
    """A task is trained and every task evaluated: its rows (accuracy, format, content, answer spaces), loss
    and times join the progress, its row is printed, and checkpoint.pt and task<N>-<name>.pt are written."""
    t = progress["task"]
    for key, row in rows.items():
        progress[key].append(row)
    progress["timings"].append(timing)
    progress["losses"].append(loss)
    progress.update(task=t + 1, step=0)
    tqdm.write(format_row(names[t], progress["matrix"][-1], names))
    state = checkpoint(run_dir / "checkpoint.pt", progress, config, model, strategy)
    atomic_write(run_dir / f"task{t + 1}-{names[t]}.pt", lambda p: torch.save({**state, "task": t}, p))


def task_rows(tasks, cfg, mcfg, tok, n_train):
    """-> (train splits, test splits) in task order: built-in tasks are drawn, task files are read."""
    def rows(task):
        if isinstance(task, llava.FileTask):
            return llava.load_file_task(task, cfg.seed, tok, mcfg.image_size, mcfg.max_text_len)
        return llava.make_task(task, n_train, cfg.n_test, cfg.seed, tok, mcfg.image_size, mcfg.max_text_len)
    return tuple(zip(*[rows(task) for task in tasks.values()]))


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


# ----------------------------------------------------------------------------------------------
# many runs: study.py's plan of train.py runs (each in a Python of its own) and their reuse

RESERVED = ("--strategy", "--base", "--seed", "--run-dir", "--tasks", "--base-only",
            "--first-task-from", "--pair-first")  # the study sets these for each run
UNCOMPARED = ("vocab_size", "run_dir", "cache_dir",
              "first_task_from", "pair_first")  # set at run time, or paths: not what a run computes


def orders_of(args):
    """The task orders the study runs -> {folder name: train.py --tasks}: --tasks alone, else --orders."""
    if args.tasks:
        return {args.tasks if args.tasks in args.orders.split(",") else "tasks": args.tasks}
    return {order: order for order in args.orders.split(",")}


def study_plan(args, names, bases, extra, seeds=None):
    """Every run of the study -> {(order, base, strategy, seed): (train.py flags, run folder, config)}. A
    strategy may carry settings, as a sweep's do: 'ewc@ewc_lambda=1e+06'. Seeds: 0..args.seeds-1 unless given.
    Raises CLIError on bad input, before anything is written."""
    for name in ("seeds", "jobs"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for flag in extra:
        if flag.split("=")[0] in RESERVED:
            raise CLIError(f"{flag} after -- is set by the study for each run; "
                           "use --strategies, --bases, --seeds, --orders or --tasks")
    plan, seeds = {}, range(args.seeds) if seeds is None else seeds
    for (order, tasks), seed, base, s in itertools.product(orders_of(args).items(), seeds, bases, names):
        run_dir = Path(args.out) / "runs" / order / base / s / f"seed{seed}"
        strategy, *settings = s.split("@")
        flags = ["--threads", "1", *extra, "--tasks", tasks, "--strategy", strategy, "--base",
                 base, "--seed", str(seed), "--run-dir", str(run_dir),
                 *(f"--{setting.replace('_', '-')}" for setting in settings)]
        cfg, mcfg, scfg = parse(flags)  # checks strategy, base, tasks and flags after --
        plan[order, base, s, seed] = flags, run_dir, dict(train=asdict(cfg), model=asdict(mcfg),
                                                          strategy=asdict(scfg))
    return plan


def finished(run_dir, config):
    """The run's results if this configuration made its results.json, else None: a killed study resumes."""
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else None
    return None if not results or config_diff(results["config"], config, UNCOMPARED) else results


def train_run(flags):
    """One train.py run in its own Python, one thread, no progress bars -> the finished process."""
    return subprocess.run([sys.executable, str(Path(__file__).with_name("train.py")), *flags], text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def base_job(args, bases, extra, seed):
    """train.py flags that train a seed's bases once (the multitask one holds the pretrained stage): all the
    seed's runs, in every order, reuse them."""
    tasks = next(iter(orders_of(args).values()))  # every order has the same tasks, so the same tokenizer
    return ["--threads", "1", *extra, "--tasks", tasks, "--base", "multitask" if "multitask" in bases else
            bases[0], "--seed", str(seed), "--base-only", "--run-dir", str(Path(args.out) / "runs" / "bases")]
