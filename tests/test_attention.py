"""Every attention path (attention.py): manual, SDPA and auto against a float64 reference, the tiled PyTorch
twin against exact attention, and attention.cu against both.

    python -m pytest tests/test_attention.py -q              # CPU: the paths, the twin, the fallback, nvcc
    python -m pytest tests/test_attention.py -k gpu -v       # GPU: the kernel itself against SDPA

The twin (attention.flash_attention_reference*) is attention.cu written in PyTorch, loop for loop, so the CPU
tests check the algorithm the kernel runs; the GPU tests check the kernel's translation of it. Both also
run eval.importance() down the kernel's path: vmap(grad(...)) over it, as EWC, MAS and TIR use it.
"""
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types
import warnings
from pathlib import Path

import pytest
import torch

import attention
import data
import eval as ev
import llava
import model
from attention import FlashAttention, attend, flash_attention_reference, flash_attention_reference_backward
from background import background
from background import run as run_in_background
from model import VLM, ModelConfig
from test_model import inputs, tiny

ROOT = Path(__file__).resolve().parent.parent
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(name, got, want, atol, rtol=0.0):
    """|got - want| ≤ atol + rtol·|want| everywhere; a failure reports the max and mean difference."""
    diff = (got.double() - want.double()).abs()
    ok = bool((diff <= atol + rtol * want.double().abs()).all())  # False on any NaN
    assert ok, (f"{name}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g} "
                f"(atol {atol}, rtol {rtol})")


def qkv(B, nh, N, d, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, nh, N, d, generator=gen, device=device, dtype=dtype).requires_grad_()
            for _ in range(3)]


def twin(Br, Bc):
    """The twin's forward and backward with tiles Br × Bc, in FlashAttention's argument order."""
    return (functools.partial(flash_attention_reference, Br=Br, Bc=Bc),
            functools.partial(flash_attention_reference_backward, Br=Br, Bc=Bc))


def exact_logsumexp(q, k, causal):
    """Row log-sum-exp of the masked scores, straight from the definition: what L must hold."""
    N = q.size(-2)
    S = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
    if causal:
        S = S.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    return S.logsumexp(-1)


# ----------------------------------------------------------------------------------------------
# every path against a row-by-row reference in float64

def reference_attention(q, k, v, causal):
    """Row by row in float64: query i (the (Tk-Tq+i)-th position) sees keys 0..Tk-Tq+i when causal."""
    q, k, v = q.double(), k.double(), v.double()
    Tq, Tk = q.size(-2), k.size(-2)
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(Tq):
        last = Tk - Tq + i + 1 if causal else Tk
        scores = q[..., i:i + 1, :] @ k[..., :last, :].transpose(-2, -1)  # (B, nh, 1, last)
        scores = scores / math.sqrt(q.size(-1))
        out[..., i:i + 1, :] = scores.softmax(-1) @ v[..., :last, :]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (1, 9), (3, 9)])
def test_attention_paths_agree_with_a_reference(causal, Tq, Tk):
    gen = torch.Generator().manual_seed(Tq * 100 + Tk)
    q = torch.randn(2, 3, Tq, 8, generator=gen)
    k, v = torch.randn(2, 3, Tk, 8, generator=gen), torch.randn(2, 3, Tk, 8, generator=gen)
    ref = reference_attention(q, k, v, causal)
    outs = {path: attend(q, k, v, causal, path) for path in ("manual", "sdpa", "auto")}
    for path, out in outs.items():
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5), path
    assert torch.allclose(outs["manual"], outs["sdpa"], atol=1e-5, rtol=0)


def test_attention_rejects_an_unknown_path():
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown attention path"):
        attend(q, q, q, True, "flash")
    with pytest.raises(ValueError, match="unknown attention path"):
        ModelConfig(attn="flash")


def test_model_logits_agree_across_attention_paths():
    images, ids = inputs(6)
    with torch.no_grad():
        manual, _ = VLM(tiny(attn="manual"), seed=0).eval()(images, ids)
        sdpa, _ = VLM(tiny(attn="sdpa"), seed=0).eval()(images, ids)
    assert torch.allclose(manual, sdpa, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# CPU: the twin is exact attention, computed tile by tile

TILES = [(32, 32), (4, 8), (8, 4)]  # the kernel's tiles, and unequal ones so that edges fall everywhere


@pytest.mark.parametrize("N", [1, 5, 17, 33])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Br,Bc", TILES)
def test_twin_forward_matches_exact_attention(N, causal, Br, Bc):
    q, k, v = qkv(2, 3, N, 16)
    O, L = flash_attention_reference(q, k, v, causal, Br, Bc)
    assert_close("O", O, attend(q, k, v, causal, "manual"), atol=1e-12)
    assert_close("L", L, exact_logsumexp(q, k, causal), atol=1e-12)


@pytest.mark.parametrize("N", [1, 5, 17, 33])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Br,Bc", TILES)
def test_twin_gradients_match_exact_attention(N, causal, Br, Bc):
    q, k, v = qkv(2, 3, N, 16)
    dO = torch.randn(2, 3, N, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(attend(q, k, v, causal, "manual"), (q, k, v), dO)
    got = torch.autograd.grad(FlashAttention.apply(q, k, v, causal, *twin(Br, Bc))[0], (q, k, v), dO)
    for name, g, w in zip(("dQ", "dK", "dV"), got, want):
        assert_close(name, g, w, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_twin_gradcheck(causal):
    q, k, v = qkv(1, 2, 5, 4)

    def attend(q, k, v):
        return FlashAttention.apply(q, k, v, causal, *twin(2, 3))[0]
    assert torch.autograd.gradcheck(attend, (q, k, v))


def sharp_qkv(B, nh, N, d, dtype, device="cpu", scale=12.0):
    """q, k, v whose scores q·k/√d reach the hundreds: exp() of them overflows float32, so only a softmax
    that subtracts the running row max (m in the kernel) comes out finite and right."""
    q, k, v = qkv(B, nh, N, d, dtype=dtype, device=device)
    with torch.no_grad():
        q *= scale
        k *= scale
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
def test_twin_survives_scores_that_overflow_exp(causal):
    q, k, v = sharp_qkv(2, 2, 37, 16, torch.float32)
    S = q @ k.transpose(-2, -1) / 4
    assert S.abs().max() > 100  # exp(100) is past float32's largest value: without the max, inf / inf
    O, L = flash_attention_reference(q.detach(), k.detach(), v.detach(), causal, Br=8, Bc=8)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    assert_close("O", O, attend(q64, k64, v64, causal, "manual"), atol=1e-4)
    assert_close("L", L, exact_logsumexp(q64, k64, causal), atol=1e-3, rtol=1e-6)


def test_twin_bfloat16_accumulates_in_float32():
    q, k, v = (t.detach().to(torch.bfloat16) for t in qkv(2, 2, 33, 32))
    O, L = flash_attention_reference(q, k, v, True)
    assert O.dtype == torch.bfloat16 and L.dtype == torch.float32
    want = attend(q.float(), k.float(), v.float(), True, "manual")  # the same rounded inputs, in fp32
    assert_close("bf16 O", O, want, atol=2e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_twin_visits_only_the_tiles_it_needs(causal, monkeypatch):
    """Score matrices are at most Br × Bc, and with `causal` no tile above the diagonal is computed."""
    seen, tile_scores = [], attention.tile_scores

    def recording_tile_scores(Qi, Kj, i, j, *rest):
        seen.append((i, j, Qi.size(-2), Kj.size(-2)))
        return tile_scores(Qi, Kj, i, j, *rest)

    monkeypatch.setattr(attention, "tile_scores", recording_tile_scores)
    q, k, v = qkv(1, 1, 40, 8)
    O, L = flash_attention_reference(q, k, v, causal, 8, 8)
    flash_attention_reference_backward(q, k, v, O, L, torch.ones_like(O), causal, 8, 8)
    Tr = 5
    expected = Tr * (Tr + 1) // 2 if causal else Tr * Tr  # per pass: forward, dQ, then dK and dV
    assert len(seen) == 3 * expected
    assert all(rows <= 8 and cols <= 8 for _, _, rows, cols in seen)
    if causal:
        assert all(j <= i for i, j, _, _ in seen)


def reads_raw_memory(fn):
    """fn, after touching each tensor's memory as attention.cu does: a tensor inside vmap or grad has none."""
    def kernel(*args):
        for t in args:
            if isinstance(t, torch.Tensor):
                t.data_ptr()  # raises "Cannot access data pointer of Tensor that doesn't have storage"
        return fn(*args)
    return kernel


def recording(forward, backward, monkeypatch):
    """Make load_cuda_attention return these kernels -> the list of the batch sizes their forward gets."""
    batch_sizes = []

    def recorded_forward(q, k, v, causal):
        batch_sizes.append(q.size(0))
        return forward(q, k, v, causal)
    kernels = types.SimpleNamespace(forward=recorded_forward, backward=backward)
    monkeypatch.setattr(attention, "load_cuda_attention", lambda: kernels)
    return batch_sizes


def importances(attn, measure, device):
    """eval.importance() of a tiny seeded VLM with head size 32 (one the kernel covers), over 6 rows."""
    tok = llava.train_tokenizer([data.TASKS["classify"]], seed=0)
    rows = llava.make_task(data.TASKS["classify"], 8, 4, 0, tok, 48, 40)[0]
    cfg = model.ModelConfig(vocab_size=tok.get_vocab_size(), vit_dim=64, d_model=64, n_head=2, vit_layers=1,
                            n_layer=1, attn=attn)
    vlm = model.VLM(cfg).to(device)
    return ev.importance(vlm, rows, measure, 6, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("measure", ["ewc", "mas"])
def test_importance_through_the_kernel_path_matches_manual_attention(measure, monkeypatch):
    """EWC, MAS and TIR take per-sample gradients with vmap(grad(...)) (eval.importance). Sent down the
    kernel's path, with the twin standing in for attention.cu, attention gives the importances that manual
    attention gives, and the kernels see plain tensors: each call holds every row of the chunk at once."""
    want = importances("manual", measure, "cpu")
    batch_sizes = recording(reads_raw_memory(flash_attention_reference),
                            reads_raw_memory(flash_attention_reference_backward), monkeypatch)
    monkeypatch.setattr(attention, "kernel_fits", lambda q, k: q.size(-2) == k.size(-2))  # CPU tensors too
    got = importances("cuda", measure, "cpu")
    # one call per layer (ViT, decoder), all six rows of the chunk in it; EWC first answers the rows itself
    assert batch_sizes == [6, 6] * (2 if measure == "ewc" else 1)
    assert got.keys() == want.keys()
    for name in want:
        assert_close(name, got[name], want[name], atol=1e-6 * want[name].abs().max().item(), rtol=1e-4)


def as_lists(fn):
    """fn with its tensors returned in a list: pybind11 turns attention.cu's std::vector<Tensor> into one."""
    return lambda *args: list(fn(*args))


def test_kernels_that_return_lists_still_train_every_attention_weight(monkeypatch):
    """The extension's forward and backward return Python lists, not tuples. Autograd takes a list as one
    output with no gradient, so the wrapper must unpack it, or every attn.qkv weight silently stays frozen."""
    recording(as_lists(flash_attention_reference), as_lists(flash_attention_reference_backward), monkeypatch)
    monkeypatch.setattr(attention, "kernel_fits", lambda q, k: q.size(-2) == k.size(-2))  # CPU tensors too
    grads = {}
    for attn in ("cuda", "manual"):  # head size 32: one the kernel covers
        cfg = model.ModelConfig(vocab_size=32, vit_dim=64, d_model=64, n_head=2, vit_layers=1, n_layer=1,
                                attn=attn)
        vlm = model.VLM(cfg)
        images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
        ids = torch.randint(32, (2, 7), generator=torch.Generator().manual_seed(1))
        _, loss = vlm(images, ids, ids)
        loss.backward()
        grads[attn] = {n: p.grad for n, p in vlm.named_parameters() if "attn.qkv" in n}
    assert len(grads["cuda"]) == 4 and all(g is not None for g in grads["cuda"].values()), "no gradient"
    for name, want in grads["manual"].items():
        assert_close(name, grads["cuda"][name], want, atol=1e-6)


def test_auto_takes_the_kernel_only_where_it_was_timed_faster(monkeypatch):
    batch_sizes = recording(flash_attention_reference, flash_attention_reference_backward, monkeypatch)
    monkeypatch.setattr(attention, "kernel_fits", lambda q, k: q.size(-2) == k.size(-2))  # CPU tensors too
    q, k, v = qkv(2, 2, 9, 32, dtype=torch.float32)
    attend(q, k, v, True, "auto")
    assert batch_sizes == []  # no shape timed faster: SDPA
    monkeypatch.setattr(attention, "KERNEL_FASTER", {(32, torch.float32)})
    assert_close("auto", attend(q, k, v, True, "auto"), attend(q, k, v, True, "manual"), atol=1e-5)
    assert batch_sizes == [2]
    attend(*qkv(2, 2, 9, 64, dtype=torch.float32), True, "auto")
    attend(*qkv(2, 2, 9, 32, dtype=torch.float64), True, "auto")
    assert batch_sizes == [2]  # another head size, another dtype: SDPA


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the 'cuda' path builds instead of falling back")
def test_cuda_path_without_cuda_warns_once_and_uses_sdpa():
    attention.load_cuda_attention.cache_clear()
    q, k, v = qkv(2, 2, 9, 32, dtype=torch.float32)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # so that a second warning would be recorded, not hidden
            outs = [attend(q, k, v, True, "cuda") for _ in range(3)]
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "CUDA attention unavailable" in messages[0], messages
        for out in outs:
            assert_close("fallback", out, attend(q, k, v, True, "manual"), atol=1e-6)
        assert model.ModelConfig(attn="cuda").attn == "cuda"
    finally:
        attention.load_cuda_attention.cache_clear()


# The only check of attention.cu that a machine without a GPU can make. -cubin compiles the device code to the
# end (ptxas reports any spill) and has nvcc's front end parse and type-check the host code too, but does not
# hand the host code to gcc: 17 s here instead of 57 s for -c, and a host-side error still fails it. The
# compile runs in the background from the session's start (tests/background.py).
@background
def nvcc_compile(folder):
    """nvcc -cubin on attention.cu -> (the finished nvcc, the cubin), or None where nvcc is not on PATH."""
    if shutil.which("nvcc") is None:
        return None
    from torch.utils import cpp_extension
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    macros = Path(includes[0]) / "c10/cuda/impl/cuda_cmake_macros.h"
    if not macros.exists():  # a CPU wheel ships c10/cuda but not this one file that a CUDA build generates
        (folder / macros.parent.relative_to(includes[0])).mkdir(parents=True)
        macros_here = folder / macros.relative_to(includes[0])
        macros_here.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(folder))
    cmd = ["nvcc", "-cubin", str(ROOT / "attention.cu"), "-o", str(folder / "attention.cubin"),
           "-std=c++20",  # what torch.utils.cpp_extension.load passes for this PyTorch
           "-gencode=arch=compute_80,code=sm_80", "-O3", "-Xptxas", "-warn-spills",
           "-DTORCH_EXTENSION_NAME=nanocit_attention", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *cpp_extension.COMMON_NVCC_FLAGS, *[f"-I{p}" for p in includes]]
    return run_in_background(cmd, timeout=600), folder / "attention.cubin"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_attention_cu_compiles_with_nvcc(nvcc_compile):
    result, cubin = nvcc_compile
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    ours = [line for line in log.splitlines() if re.search(r"attention\.cu[(:]\d+.*warning|spill", line)]
    assert ours == [], "\n".join(ours)  # PyTorch's own headers may warn; attention.cu must not
    assert cubin.stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# GPU: attention.cu against SDPA (in float64, so the reference adds no error of its own)

def cuda_kernels():
    kernels = attention.load_cuda_attention()
    assert kernels is not None, "attention.cu did not build on this GPU machine: see the warning above"
    return kernels


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("N", [1, 17, 64, 100, 1000])
def test_gpu_kernel_matches_sdpa(N, d, causal, dtype):
    kernels = cuda_kernels()
    q, k, v = qkv(2, 3, N, d, dtype=dtype, device="cuda")
    dO = torch.randn(2, 3, N, d, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype)
    O, _ = FlashAttention.apply(q, k, v, causal, kernels.forward, kernels.backward)
    grads = torch.autograd.grad(O, (q, k, v), dO)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    O64 = attend(q64, k64, v64, causal, "sdpa")
    grads64 = torch.autograd.grad(O64, (q64, k64, v64), dO.double())
    fp32 = dtype == torch.float32
    assert_close("O", O, O64, atol=1e-4 if fp32 else 2e-2, rtol=0 if fp32 else 2e-2)
    _, L = kernels.forward(q.detach(), k.detach(), v.detach(), causal)
    L64 = exact_logsumexp(q64.cpu(), k64.cpu(), causal).cuda()
    assert_close("L", L, L64, atol=1e-4)  # fp32 in both cases
    for name, g, w in zip(("dQ", "dK", "dV"), grads, grads64):
        assert_close(name, g, w, atol=1e-3 if fp32 else 2e-2, rtol=0 if fp32 else 2e-2)


@gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_kernel_survives_scores_that_overflow_exp(causal):
    kernels = cuda_kernels()
    q, k, v = sharp_qkv(2, 3, 200, 64, torch.float32, device="cuda", scale=6.0)  # scores in the hundreds
    O, L = kernels.forward(q.detach(), k.detach(), v.detach(), causal)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    assert_close("O", O, attend(q64, k64, v64, causal, "manual"), atol=1e-3)
    assert_close("L", L, exact_logsumexp(q64.cpu(), k64.cpu(), causal).cuda(), atol=1e-2, rtol=1e-5)


@gpu
def test_gpu_kernel_rejects_what_it_does_not_cover():
    kernels = cuda_kernels()
    q = torch.randn(1, 2, 8, 32, device="cuda")
    for bad in (q.half(), torch.randn(1, 2, 8, 48, device="cuda"),
                q.transpose(2, 3).contiguous().transpose(2, 3),
                q.cpu()):
        with pytest.raises(RuntimeError):
            kernels.forward(bad, bad, bad, True)
    with pytest.raises(RuntimeError, match="Tq == Tk"):
        kernels.forward(q, q[:, :, :4].contiguous(), q[:, :, :4].contiguous(), True)


@gpu
def test_gpu_attention_picks_the_kernel_where_told_and_leaves_decoding_to_sdpa():
    kernels = cuda_kernels()
    q, k, v = (t.detach() for t in qkv(2, 2, 50, 64, dtype=torch.float32, device="cuda"))
    O, _ = kernels.forward(q, k, v, True)
    auto = O if (64, torch.float32) in attention.KERNEL_FASTER else attend(q, k, v, True, "sdpa")
    assert torch.equal(attend(q, k, v, True, "auto"), auto)  # the forward kernel is deterministic
    assert torch.equal(attend(q, k, v, True, "cuda"), O)
    q_last = q[:, :, -1:]  # one new query against the whole cache: Tq != Tk
    assert_close("decoding", attend(q_last, k, v, True, "cuda"), O[:, :, -1:], atol=1e-4)


@gpu
@pytest.mark.parametrize("measure", ["ewc", "mas"])
def test_gpu_importance_through_the_kernel_matches_manual_attention(measure, monkeypatch):
    """The CPU test above with attention.cu itself: vmap(grad(...)) over the kernels, as EWC runs it."""
    kernels = cuda_kernels()
    want = importances("manual", measure, "cuda")
    batch_sizes = recording(kernels.forward, kernels.backward, monkeypatch)
    got = importances("cuda", measure, "cuda")
    assert batch_sizes == [6, 6]  # the kernel ran, once per layer, on all six rows together
    for name in want:
        assert_close(name, got[name], want[name], atol=1e-4 * want[name].abs().max().item(), rtol=1e-3)


@gpu
def test_gpu_training_run_with_the_kernel_matches_sdpa(tmp_path):
    """Same seed, same data: a short run with --attn cuda ends where one with --attn sdpa does, within
    noise."""
    cuda_kernels()  # build here first, so that a build failure reads as one, not as a failed run
    results = {}
    for attn in ("cuda", "sdpa"):
        cmd = [sys.executable, "train.py", "--strategy", "naive", "--tasks", "classify,attribute",
               "--steps", "60", "--base-steps", "150", "--n-train", "256", "--n-test", "64",
               "--n-base", "1024", "--d-model", "128", "--vit-dim", "128",
               "--n-head", "4",  # head size 32: one the kernel covers
               "--attn", attn, "--run-dir", str(tmp_path / attn),
               "--cache-dir", str(tmp_path / f"cache-{attn}")]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONWARNINGS": "always"})
        assert run.returncode == 0, run.stderr[-3000:]
        assert "CUDA attention unavailable" not in run.stderr  # the cuda run really used the kernel
        results[attn] = json.loads((tmp_path / attn / "results.json").read_text())["matrix"]
    cuda, sdpa = torch.tensor(results["cuda"]), torch.tensor(results["sdpa"])
    assert sdpa.max() >= 20, f"the run learned too little to compare: {results}"
    # 64 test rows per task: one answer is 1.6 points; floating-point order alone moves a few answers
    assert (cuda - sdpa).abs().max() <= 10, f"accuracy matrices differ: {results}"
