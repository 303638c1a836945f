"""What the continual-learning strategies cost on the tiny preset: a penalty per step, an importance pass per
task.

    OMP_NUM_THREADS=1 python tools/bench_strategies.py

Times one training step (forward, backward, AdamW) with and without each penalty, and the importance pass
that EWC, MAS and TIR run after a task, against a task's training steps; and counts what LoRA and expansion
add.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import eval as ev  # noqa: E402
import llava  # noqa: E402
import strategies  # noqa: E402
from model import VLM, ModelConfig  # noqa: E402
from strategies import StrategyConfig  # noqa: E402
from runner import TrainConfig  # noqa: E402


def seconds(fn, repeat):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main():
    tcfg = TrainConfig()
    tok = llava.train_tokenizer(data.ALL_TASKS, 0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size())
    rows = [llava.make_task(data.TASKS[n], 512, 1, 0, tok, cfg.image_size, cfg.max_text_len)[0]
            for n in ("attribute", "count")]
    print(f"torch threads {torch.get_num_threads()}, batch {tcfg.batch_size}, {tcfg.steps} steps per task")

    def step_with(name):
        model = VLM(cfg)
        for p in model.vision.parameters():
            p.requires_grad_(False)
        strategy = strategies.build(name, StrategyConfig())
        strategy.before_task(model, 0, rows[0])
        strategy.after_task(model, 0, rows[0])
        strategy.before_task(model, 1, rows[1])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        fresh = rows[1].subset(range(tcfg.batch_size))  # through the strategy: LwF adds its rows
        shaped = strategy.batch(fresh, torch.Generator().manual_seed(0))
        batch = llava.to_batch(shaped, range(len(shaped)), "cpu")

        def step():
            logits, loss = model(*batch)
            extra = strategy.penalty(model, batch, logits)
            opt.zero_grad()
            (loss if extra is None else loss + extra).backward()
            opt.step()
        return model, strategy, step

    model, _, naive_step = step_with("naive")
    base = seconds(naive_step, 30)
    print(f"naive step: {1000 * base:.1f} ms; a task's {tcfg.steps} steps: {tcfg.steps * base:.1f} s")
    for name in ("ewc", "mas", "tir", "lwf"):
        _, strategy, step = step_with(name)
        t = seconds(step, 30)
        print(f"{name} step: {1000 * t:.1f} ms, the penalty adds {100 * (t - base) / base:+.0f} % to a step")
    for measure in ("ewc", "mas"):
        gen = torch.Generator().manual_seed(0)
        samples = StrategyConfig().importance_samples
        t = seconds(lambda: ev.importance(model, rows[0], measure, samples, gen), 3)
        print(f"importance pass ({measure}, {StrategyConfig().importance_samples} rows): {t:.2f} s, "
              f"{100 * t / (tcfg.steps * base):.0f} % of a task's training")
    n_params = sum(p.numel() for p in VLM(cfg).parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ewc = step_with("ewc")[1]
    print(f"ewc keeps {ewc.extra_bytes() // 4:,} floats for {trainable:,} trainable parameters "
          f"({ewc.extra_bytes() / 4 / trainable:.2f} x)")
    for name in ("lora", "expansion"):
        m, strategy, _ = step_with(name)
        per_task = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"{name}: {per_task:,} trainable parameters per task, {100 * per_task / n_params:.1f} % of the "
              f"{n_params:,}-parameter model")


if __name__ == "__main__":
    main()
