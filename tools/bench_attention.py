"""Time attention.cu against SDPA and manual attention on one GPU, forward and forward+backward.

    python tools/bench_attention.py

Causal, batch 4 × 8 heads, head size 64, T = 128, 512, 2048, in fp32 and bf16. Each path is warmed up, then
timed with CUDA events. One row per (dtype, T) holds the three paths' times and the kernel's time over each
of the others' (below 1: the kernel is faster). TFLOP/s counts useful work in the FlashAttention papers'
convention: 4·T²·d per head for the forward, halved by the causal mask, and 2.5 times that for the backward.
A second table times the shapes the GPU presets train on (batch 64, their heads, T = image patches + text)
and prints the set that attention.KERNEL_FASTER should hold on this GPU: the (head size, dtype) pairs where
the kernel's forward+backward beat SDPA's. `--attn auto` takes the kernel only there.
A line checks the bar: fp32 forward+backward at T ≥ 512 at least as fast as manual attention.
Without a CUDA device it prints one line and exits 0 (the CPU tests cover the twin instead).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attention import FlashAttention, attend, load_cuda_attention  # noqa: E402
from model import PRESETS, ModelConfig  # noqa: E402

BATCH, HEADS, HEAD_DIM = 4, 8, 64
LENGTHS = (128, 512, 2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def milliseconds(fn, warmup=3, reps=10):
    """Mean time of fn() in ms, from CUDA events around `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def time_paths(paths, T, dtype, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM):
    """{path: (forward ms, forward+backward ms)} at sequence length T; NaN where a path runs out of memory."""
    q, k, v = (torch.randn(batch, heads, T, head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    dO = torch.randn_like(q)
    times = {}
    for name, fn in paths.items():
        try:
            with torch.no_grad():
                forward = milliseconds(lambda: fn(q, k, v))
            both = milliseconds(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dO))
        except torch.cuda.OutOfMemoryError:  # the manual path holds T×T scores, several times over
            forward = both = float("nan")
            torch.cuda.empty_cache()
        times[name] = forward, both
    return times


def main():
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device, nothing to time (tests/test_attention.py checks the twin)")
        return 0
    kernels = load_cuda_attention()
    if kernels is None:
        print("bench_attention: attention.cu did not build; see the warning above")
        return 1
    paths = {"kernel": lambda q, k, v: FlashAttention.apply(q, k, v, True, kernels.forward,
                                                          kernels.backward)[0],  # O, not L
             "sdpa": lambda q, k, v: attend(q, k, v, True, "sdpa"),
             "manual": lambda q, k, v: attend(q, k, v, True, "manual")}
    print(f"{torch.cuda.get_device_name()} | causal, B={BATCH}, nh={HEADS}, d={HEAD_DIM} | times in ms; "
          "'k/sdpa', 'k/man' = the kernel's time over SDPA's, manual's (below 1: the kernel is faster)")
    print(f"{'':12}| {'forward':^46} | {'forward + backward':^46}")
    columns = f"{'kernel':>7} {'sdpa':>7} {'manual':>7} {'k/sdpa':>6} {'k/man':>6} {'TFLOP/s':>7}"
    print(f"{'dtype':>5} {'T':>5} | {columns} | {columns}")
    bar = []  # the kernel's fp32 forward+backward time over manual's, at each T >= 512
    for label, dtype in DTYPES.items():
        for T in LENGTHS:
            times = time_paths(paths, T, dtype)
            forward_flop = 4 * BATCH * HEADS * T * T * HEAD_DIM / 2  # two matmuls over half the T×T scores
            cells = []
            for i, flop in ((0, forward_flop), (1, 3.5 * forward_flop)):  # forward, then forward + backward
                kernel, sdpa, manual = (times[name][i] for name in paths)
                cells.append(f"{kernel:>7.3f} {sdpa:>7.3f} {manual:>7.3f} {kernel / sdpa:>6.2f} "
                             f"{kernel / manual:>6.2f} {flop / kernel / 1e9:>7.2f}")
            print(f"{label:>5} {T:>5} | {cells[0]} | {cells[1]}")
            if label == "fp32" and T >= 512:
                bar.append(times["kernel"][1] / times["manual"][1])
    verdict = "yes" if all(r <= 1 for r in bar) else "NO"  # a NaN (out of memory) is not a yes
    print(f"fp32 forward+backward, T >= 512: kernel at least as fast as manual attention: {verdict} "
          f"(kernel/manual {', '.join(f'{r:.2f}' for r in bar)})")
    presets(paths)
    return 0


def presets(paths):
    """The decoder's attention at each GPU preset's training shape: what --attn auto decides on."""
    print("\nthe presets' decoder shapes, batch 64 | forward+backward ms | k/sdpa < 1: the kernel is faster")
    faster = set()
    for name in ("small", "base"):
        cfg = ModelConfig(**PRESETS[name])
        T, head_dim = cfg.n_patches + cfg.max_text_len, cfg.d_model // cfg.n_head
        for label, dtype in DTYPES.items():
            times = time_paths(paths, T, dtype, batch=64, heads=cfg.n_head, head_dim=head_dim)
            kernel, sdpa = times["kernel"][1], times["sdpa"][1]
            print(f"{name:>5} T={T} nh={cfg.n_head} d={head_dim} {label}: kernel {kernel:.3f}  "
                  f"sdpa {sdpa:.3f}  k/sdpa {kernel / sdpa:.2f}")
            if kernel < sdpa:
                faster.add((head_dim, str(dtype)))
    print(f"KERNEL_FASTER on this GPU: {{{', '.join(f'({d}, {t})' for d, t in sorted(faster))}}}"
          + ("" if faster else " (empty: SDPA everywhere)"))


if __name__ == "__main__":
    sys.exit(main())
