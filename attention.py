"""Attention, one function with several paths that must agree: manual, PyTorch's SDPA, and attention.cu.

    attend(q, k, v, causal, path)   # path: auto | manual | sdpa | cuda; model.py calls nothing else

'manual' is the formula, written out; 'sdpa' is torch's fused kernel; 'cuda' is this project's own
FlashAttention-2 kernels (attention.cu), reached through an autograd Function. Below them, the kernel's
twin: attention.cu written in PyTorch, loop for loop, which the CPU tests run in the kernel's place.
Follows Dao 2023 (FlashAttention-2, arXiv 2307.08691) and flash-attention-minimal's notation.
"""
import functools
import math

import torch
import torch.nn.functional as F

ATTENTION_PATHS = ("auto", "manual", "sdpa", "cuda")
CUDA_HEAD_DIMS = (32, 64, 128)  # the head sizes attention.cu is compiled for
# (head size, dtype) where tools/bench_attention.py timed attention.cu's forward + backward faster than SDPA
# at a preset's shape: 'auto' takes the kernel only there. Steps this short are launch-bound, and SDPA
# runs on tensor cores; until a GPU has shown otherwise, none.
KERNEL_FASTER = set()


def kernel_fits(q, k):
    """Whether attention.cu covers q, k (see `attend`). A CPU test replaces it to route the twin here."""
    return (q.is_cuda and q.size(-2) == k.size(-2) and q.size(-1) in CUDA_HEAD_DIMS
            and q.dtype in (torch.float32, torch.bfloat16))


def attend(q, k, v, causal, path="auto"):
    """softmax(q kᵀ / √hs) v for q (B, nh, Tq, hs) and k, v (B, nh, Tk, hs) -> (B, nh, Tq, hs).

    With `causal`, query i sees keys up to its own position, counting the queries as the last Tq
    of the Tk positions: this covers training (Tq == Tk) and KV-cached decoding (Tq == 1).
    'cuda' runs attention.cu where it applies: CUDA tensors, Tq == Tk, a head size in CUDA_HEAD_DIMS,
    float32 or bfloat16. Elsewhere, e.g. decoding with a cache, it uses SDPA. 'auto' runs the kernel only
    where it also was timed faster (KERNEL_FASTER), else SDPA.
    """
    Tq, Tk = q.size(-2), k.size(-2)
    fits = kernel_fits(q, k)
    if path == "cuda" or (path == "auto" and fits and (q.size(-1), q.dtype) in KERNEL_FASTER):
        kernels = load_cuda_attention()  # (end of file) None, after one warning, where it cannot be built
        if kernels is not None and fits:
            q, k, v = (t.contiguous() for t in (q, k, v))  # the kernel reads rows at stride hs
            return FlashAttention.apply(q, k, v, causal, kernels.forward, kernels.backward)[0]  # O, not L
        path = "sdpa"  # a shape or dtype the kernel was not written for, or no kernel at all
    if path in ("auto", "sdpa"):
        if causal and Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if not causal or Tq == 1:  # one new query sees every cached key: no mask needed
            return F.scaled_dot_product_attention(q, k, v)
        path = "manual"  # a causal chunk of queries against a longer cache: let the twin do it
    if path == "manual":
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
        if causal:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            att = att.masked_fill(~mask, float("-inf"))
        return att.softmax(dim=-1) @ v  # (B, nh, Tq, hs)
    raise ValueError(f"unknown attention path {path!r}; choose from {', '.join(ATTENTION_PATHS)}")



# ----------------------------------------------------------------------------------------------
# the CUDA path: attention.cu, its PyTorch twin, and the autograd Function over either
#
# FlashAttention-2 (Dao 2023, arXiv 2307.08691) never builds the N×N score matrix. It walks over
# tiles of Br queries × Bc keys and keeps, per query row, a running max m and a running sum l of
# the softmax. It saves only the row log-sum-exp L, from which the backward rebuilds each tile of
# probabilities. The twin below is attention.cu in PyTorch, loop for loop (a CUDA thread block is
# one iteration of an outer loop): read it before the kernel, and test the kernel against it.

def key_tiles(i, N, Br, Bc, causal):
    """How many key tiles query tile i sees: all of them, or with `causal` those up to its last row."""
    return (min((i + 1) * Br, N) - 1) // Bc + 1 if causal else math.ceil(N / Bc)


def first_query_tile(j, Br, Bc, causal):
    """The first query tile that sees key tile j: with `causal`, tiles ending before it see none of it."""
    return j * Bc // Br if causal else 0


def tile_scores(Qi, Kj, i, j, Br, Bc, causal):
    """S = Qi Kjᵀ / √d for tile (i, j), with the keys a causal query may not see set to -inf."""
    S = Qi @ Kj.transpose(-2, -1) / math.sqrt(Qi.size(-1))  # (B, nh, rows in tile, cols in tile)
    if causal:
        rows = torch.arange(i * Br, i * Br + S.size(-2), device=S.device)
        cols = torch.arange(j * Bc, j * Bc + S.size(-1), device=S.device)
        S = S.masked_fill(cols > rows[:, None], float("-inf"))
    return S


def flash_attention_reference(q, k, v, causal, Br=32, Bc=32):
    """attention.cu's forward in PyTorch: q, k, v (B, nh, N, d) -> O (B, nh, N, d), L (B, nh, N).

    A slice past N gives a shorter tile: the same as the kernel's zero-filled, masked rows.
    bfloat16 inputs are accumulated in float32, as in the kernel; L is in that accumulation type.
    """
    N = q.size(-2)
    acc = torch.promote_types(q.dtype, torch.float32)
    O = torch.empty_like(q)
    L = q.new_empty(q.shape[:-1], dtype=acc)
    for i in range(math.ceil(N / Br)):  # for i = 0 .. Tr-1 (in CUDA: one thread block each)
        rows = slice(i * Br, (i + 1) * Br)
        Qi = q[..., rows, :].to(acc)  # (B, nh, Br, d)
        m = torch.full(Qi.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # running row max
        l = torch.zeros_like(m)  # running row sum of exp(S - m)
        Oi = torch.zeros_like(Qi)  # unnormalised output rows
        # for j:  S = Qi Kjᵀ/√d;  m' = max(m, rowmax S);  P̃ = exp(S - m');
        #         l = e^(m-m') l + rowsum P̃;  Oi = e^(m-m') Oi + P̃ Vj;  m = m'
        for j in range(key_tiles(i, N, Br, Bc, causal)):
            Kj, Vj = (t[..., j * Bc:(j + 1) * Bc, :].to(acc) for t in (k, v))  # (B, nh, Bc, d)
            S = tile_scores(Qi, Kj, i, j, Br, Bc, causal)
            m_new = torch.maximum(m, S.amax(-1))  # finite: key 0 is visible to every row
            P = torch.exp(S - m_new[..., None])
            alpha = torch.exp(m - m_new)  # rescales what was summed under the old max
            l = alpha * l + P.sum(-1)
            Oi = alpha[..., None] * Oi + P @ Vj
            m = m_new
        O[..., rows, :] = (Oi / l[..., None]).to(q.dtype)  # Oi = Oi / l
        L[..., rows] = m + torch.log(l)  # Li = m + log l
    return O, L


def flash_attention_reference_backward(q, k, v, O, L, dO, causal, Br=32, Bc=32):
    """attention.cu's backward in PyTorch -> dQ, dK, dV, holding one Br×Bc tile of P at a time.

    For O = P V with P = softmax(S): dV = Pᵀ dO, dP = dO Vᵀ, and the softmax Jacobian gives
    dS = P ∘ (dP - D) with D = rowsum(dP ∘ P) = rowsum(dO ∘ O), one number per query row.
    Like the kernels it makes two passes, so no two blocks ever write the same rows: dQ by query
    tiles, then dK and dV by key tiles. Each pass rebuilds P = exp(S - L) from the saved L.
    """
    N = q.size(-2)
    acc = torch.promote_types(q.dtype, torch.float32)
    D = (dO.to(acc) * O.to(acc)).sum(-1)  # (B, nh, N); in CUDA, pass 1 computes it for pass 2
    dQ, dK, dV = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    Tr, Tc = math.ceil(N / Br), math.ceil(N / Bc)
    for i in range(Tr):  # pass 1, attention_backward_dq_kernel
        rows = slice(i * Br, (i + 1) * Br)
        Qi, dOi = q[..., rows, :].to(acc), dO[..., rows, :].to(acc)
        Li, Di = L[..., rows, None], D[..., rows, None]
        dQi = torch.zeros_like(Qi)
        # for j:  P = exp(Qi Kjᵀ/√d - Li);  dP = dOi Vjᵀ;  dS = P ∘ (dP - Di);  dQi += dS Kj / √d
        for j in range(key_tiles(i, N, Br, Bc, causal)):
            Kj, Vj = (t[..., j * Bc:(j + 1) * Bc, :].to(acc) for t in (k, v))
            P = torch.exp(tile_scores(Qi, Kj, i, j, Br, Bc, causal) - Li)
            dS = P * (dOi @ Vj.transpose(-2, -1) - Di)
            dQi += dS @ Kj
        dQ[..., rows, :] = (dQi / math.sqrt(q.size(-1))).to(q.dtype)  # every tile's 1/√d, applied once
    for j in range(Tc):  # pass 2, attention_backward_dkdv_kernel
        cols = slice(j * Bc, (j + 1) * Bc)
        Kj, Vj = k[..., cols, :].to(acc), v[..., cols, :].to(acc)
        dKj, dVj = torch.zeros_like(Kj), torch.zeros_like(Vj)
        # for i:  P = exp(Qi Kjᵀ/√d - Li);  dVj += Pᵀ dOi;
        #         dS = P ∘ (dOi Vjᵀ - Di);  dKj += dSᵀ Qi / √d
        for i in range(first_query_tile(j, Br, Bc, causal), Tr):
            rows = slice(i * Br, (i + 1) * Br)
            Qi, dOi = q[..., rows, :].to(acc), dO[..., rows, :].to(acc)
            Li, Di = L[..., rows, None], D[..., rows, None]
            P = torch.exp(tile_scores(Qi, Kj, i, j, Br, Bc, causal) - Li)
            dVj += P.transpose(-2, -1) @ dOi
            dS = P * (dOi @ Vj.transpose(-2, -1) - Di)
            dKj += dS.transpose(-2, -1) @ Qi
        dK[..., cols, :], dV[..., cols, :] = (dKj / math.sqrt(q.size(-1))).to(k.dtype), dVj.to(v.dtype)
    return dQ, dK, dV


def fold_vmapped(t, dim, size):
    """A vmapped tensor as vmap rules see it, its vmapped dim at `dim` (None: shared by every call), ->
    one contiguous batch (size·B, ...): the kernels then run once over all the calls' rows together."""
    t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)  # (size, B, ...)
    return t.reshape(size * t.size(1), *t.shape[2:]).contiguous()


class FlashAttention(torch.autograd.Function):
    """Autograd over a tiled forward/backward pair (attention.cu's kernels or their twin) -> O, L.

    Written in torch.func's form (a forward without ctx, setup_context, a vmap rule), because EWC, MAS
    and TIR take per-sample gradients with vmap(grad(...)). The kernels read raw memory, which a tensor
    inside vmap does not have, so the vmap rule folds the vmapped dim into the batch and calls them once.
    The backward is itself a Function with such a rule: under vmap(grad(...)) it gets vmapped tensors too.
    """

    @staticmethod
    def forward(q, k, v, causal, forward, backward):
        O, L = forward(q, k, v, causal)  # L: all the softmax the backward needs, N numbers a row
        return O, L  # a tuple: autograd takes a list (what pybind11 makes of attention.cu's) as one output

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, _, backward = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.mark_non_differentiable(output[1])  # L is bookkeeping: no gradient flows back through it
        ctx.causal, ctx.tiled_backward = causal, backward

    @staticmethod
    def backward(ctx, dO, dL):
        dQ, dK, dV = FlashAttentionBackward.apply(*ctx.saved_tensors, dO, ctx.causal, ctx.tiled_backward)
        return dQ, dK, dV, None, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, causal, forward, backward):
        q, k, v = (fold_vmapped(t, dim, info.batch_size) for t, dim in zip((q, k, v), in_dims))
        O, L = FlashAttention.apply(q, k, v, causal, forward, backward)  # (size*B, nh, N, d), (size*B, nh, N)
        return (O.view(info.batch_size, -1, *O.shape[1:]), L.view(info.batch_size, -1, *L.shape[1:])), (0, 0)


class FlashAttentionBackward(torch.autograd.Function):
    """The tiled backward as a Function of its own, for its vmap rule; it has no derivative itself."""

    @staticmethod
    def forward(q, k, v, O, L, dO, causal, backward):
        return tuple(backward(q, k, v, O, L, dO.contiguous(), causal))  # dQ, dK, dV

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # nothing to save: a second derivative is refused below

    @staticmethod
    def backward(ctx, dQ, dK, dV):
        raise RuntimeError("the tiled attention backward has no derivative of its own (no double backward)")

    @staticmethod
    def vmap(info, in_dims, q, k, v, O, L, dO, causal, backward):
        tensors = [fold_vmapped(t, dim, info.batch_size) for t, dim in zip((q, k, v, O, L, dO), in_dims)]
        grads = FlashAttentionBackward.apply(*tensors, causal, backward)
        return tuple(g.view(info.batch_size, -1, *g.shape[1:]) for g in grads), (0, 0, 0)


@functools.cache  # once per process: a failed build warns once and is not retried on every call
def load_cuda_attention():
    """Compile attention.cu for this GPU into build/attention -> the extension, or None after a warning."""
    import os  # only the CUDA path builds anything, so only it imports the build tools
    import warnings

    from torch.utils import cpp_extension
    if not torch.cuda.is_available() or torch.version.cuda is None:
        reason = "no CUDA device, or a PyTorch built without CUDA"
    elif cpp_extension.CUDA_HOME is None:
        reason = "nvcc not found; install the CUDA toolkit or set CUDA_HOME"
    elif not cpp_extension.is_ninja_available():
        reason = "ninja not found; pip install ninja"
    else:
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # this GPU only; a user's wins
        here = os.path.dirname(os.path.abspath(__file__))
        folder = os.path.join(here, "build", "attention")  # fixed, so later runs reuse the build
        os.makedirs(folder, exist_ok=True)
        print(f"compiling attention.cu for sm_{major}{minor} in {folder} (a minute the first time, then "
              "cached)")
        try:
            return cpp_extension.load("nanocit_attention", [os.path.join(here, "attention.cu")],
                                      build_directory=folder, extra_cuda_cflags=["-O3"])
        except Exception as e:  # compiler error, missing header, an nvcc that does not know this GPU...
            reason = f"building attention.cu failed: {e}"
    warnings.warn(f"CUDA attention unavailable ({reason}); using SDPA instead", stacklevel=3)
    return None
