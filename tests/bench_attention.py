"""Time attention.cu against manual attention and SDPA on one GPU, side by side.

    python tests/bench_attention.py

Causal attention, fp32, batch 4 × 8 heads, head size 64, T from 128 to 4096. Each path is warmed up,
then timed with CUDA events. TFLOP/s counts useful work in the FlashAttention papers' convention:
4·T²·d per head for the forward, halved by the causal mask, and 2.5 times that for the backward.
Without a CUDA device it prints one line and exits 0 (the CPU tests cover the twin instead).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import FlashAttention, attention, load_cuda_attention  # noqa: E402

BATCH, HEADS, HEAD_DIM = 4, 8, 64
LENGTHS = (128, 256, 512, 1024, 2048, 4096)


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


def main():
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device, nothing to time (tests/test_attention.py checks the twin on CPU)")
        return 0
    kernels = load_cuda_attention()
    if kernels is None:
        print("bench_attention: attention.cu did not build; see the warning above")
        return 1
    paths = {"kernel": lambda q, k, v: FlashAttention.apply(q, k, v, True, kernels.forward, kernels.backward),
             "sdpa": lambda q, k, v: attention(q, k, v, True, "sdpa"),
             "manual": lambda q, k, v: attention(q, k, v, True, "manual")}
    print(f"{torch.cuda.get_device_name()} | causal, fp32, B={BATCH}, nh={HEADS}, d={HEAD_DIM} | "
          f"'× sdpa' = time / SDPA's time at the same T")
    print(f"{'T':>5} {'path':>7} | {'fwd ms':>8} {'TFLOP/s':>7} {'× sdpa':>7} | "
          f"{'fwd+bwd ms':>10} {'TFLOP/s':>7} {'× sdpa':>7}")
    for T in LENGTHS:
        q, k, v = (torch.randn(BATCH, HEADS, T, HEAD_DIM, device="cuda", requires_grad=True) for _ in range(3))
        dO = torch.randn_like(q)
        forward_flop = 4 * BATCH * HEADS * T * T * HEAD_DIM / 2  # two matmuls over half the T×T scores
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
        for name, (forward, both) in times.items():
            print(f"{T:>5} {name:>7} | {forward:>8.3f} {forward_flop / forward / 1e9:>7.2f} "
                  f"{forward / times['sdpa'][0]:>7.2f} | {both:>10.3f} {3.5 * forward_flop / both / 1e9:>7.2f} "
                  f"{both / times['sdpa'][1]:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
