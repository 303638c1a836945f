"""The tiny vision-language model: a ViT encoder, an MLP projector and a GPT decoder (LLaVA-style).

images (B,3,H,W) -> ViT -> patch features -> projector -> prefix tokens, followed by the text
tokens; the causal decoder predicts the answer, and the loss is on answer tokens only.
Follows nanoGPT (Karpathy) for the decoder and LLaVA 1.5 (Liu et al. 2023) for the projector.
Every attention call goes through `attention`, whose paths (manual, sdpa, cuda) must agree.
LoRALinear and add_lora put low-rank adapters beside chosen linear layers (Hu et al. 2021).
"""
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def arg(default, why):
    """A config field whose reason doubles as its --help text (train.py builds the CLI from it)."""
    return field(default=default, metadata={"help": why})


@dataclass
class ModelConfig:
    image_size: int = arg(48, "3x3 grid of 16 px cells: big enough to draw a glyph legibly")
    patch_size: int = arg(16, "one patch per grid cell -> only 9 image tokens, cheap on a CPU")
    vit_dim: int = arg(96, "width of the vision encoder")
    vit_layers: int = arg(2, "two layers suffice to tell 5 shapes and 5 colours apart")
    d_model: int = arg(96, "width of the decoder; small so a step takes milliseconds on a CPU")
    n_layer: int = arg(2, "decoder depth: enough to bind question words to image tokens")
    n_head: int = arg(8, "heads of 12 dims each: 4 of 24 left spatial at 83 % on seed 0")
    vocab_size: int = arg(128, "overwritten by the tokenizer's size at run time")
    max_text_len: int = arg(40, "longest [BOS] instruction [SEP] answer [EOS] row, in tokens")
    attn: str = arg("auto", "attention path: auto | manual | sdpa | cuda (auto: sdpa, or attention.cu "
                    "where its bench timed it faster)")

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is no multiple of patch_size {self.patch_size}")
        if self.d_model % self.n_head or self.vit_dim % self.n_head:
            raise ValueError(f"d_model {self.d_model} and vit_dim {self.vit_dim} must divide by n_head "
                             f"{self.n_head}")
        if self.attn not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention path {self.attn!r}; choose from "
                             f"{', '.join(ATTENTION_PATHS)}")
        self.n_patches = (self.image_size // self.patch_size) ** 2  # derived: image tokens per example


PRESETS = {  # model sizes; train.py has the matching training presets
    "tiny": dict(),  # the defaults above: the whole study on a laptop CPU
    "small": dict(image_size=64, patch_size=16, vit_dim=256, vit_layers=4, d_model=256, n_layer=6, n_head=8),
    "base": dict(image_size=96, patch_size=16, vit_dim=384, vit_layers=6, d_model=512, n_layer=8, n_head=8),
}


# ----------------------------------------------------------------------------------------------
# attention: one function, several paths that must agree

ATTENTION_PATHS = ("auto", "manual", "sdpa", "cuda")
CUDA_HEAD_DIMS = (32, 64, 128)  # the head sizes attention.cu is compiled for
# (head size, dtype) where tests/bench_attention.py timed attention.cu's forward + backward faster than SDPA
# at a preset's shape: 'auto' takes the kernel only there. Steps this short are launch-bound, and SDPA
# runs on tensor cores; until a GPU has shown otherwise, none.
KERNEL_FASTER = set()


def kernel_fits(q, k):
    """Whether attention.cu covers q, k (see `attention`). A CPU test replaces it to route the twin here."""
    return (q.is_cuda and q.size(-2) == k.size(-2) and q.size(-1) in CUDA_HEAD_DIMS
            and q.dtype in (torch.float32, torch.bfloat16))


def attention(q, k, v, causal, path="auto"):
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


class SelfAttention(nn.Module):
    """Multi-head self-attention; with a `cache` dict it appends this call's keys and values to it."""

    def __init__(self, dim, n_head, causal, path):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.n_head, self.causal, self.path = n_head, causal, path

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # decoding: keys and values of earlier positions are reused, not recomputed
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = attention(q, k, v, self.causal, self.path)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim, n_head, causal, path):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_head, causal, path)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class VisionEncoder(nn.Module):
    """ViT: cut the image into patches, embed each linearly, add positions, run bidirectional blocks."""

    def __init__(self, cfg):
        super().__init__()
        self.p = cfg.patch_size
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.vit_dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_patches, cfg.vit_dim))
        blocks = (Block(cfg.vit_dim, cfg.n_head, False, cfg.attn) for _ in range(cfg.vit_layers))
        self.blocks = nn.ModuleList(blocks)
        self.ln = nn.LayerNorm(cfg.vit_dim)

    def forward(self, images):
        B, C, H, W = images.shape
        p = self.p
        x = images.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        x = self.patch_embed(x.reshape(B, (H // p) * (W // p), C * p * p)) + self.pos  # (B, N, vit_dim)
        for block in self.blocks:
            x = block(x)
        return self.ln(x)


class VLM(nn.Module):
    """Vision encoder -> projector -> causal decoder over [image prefix, text]."""

    def __init__(self, cfg, seed=0):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.projector = nn.Sequential(nn.Linear(cfg.vit_dim, cfg.d_model), nn.GELU(),
                                       nn.Linear(cfg.d_model, cfg.d_model))  # LLaVA 1.5's two-layer MLP
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_patches + cfg.max_text_len, cfg.d_model)
        blocks = (Block(cfg.d_model, cfg.n_head, True, cfg.attn) for _ in range(cfg.n_layer))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2: fewer parameters
        gen = torch.Generator().manual_seed(seed)  # a seeded stream, not torch's global one
        for name, p in self.named_parameters():
            if name.endswith("bias") or name.startswith("ln") or ".ln" in name:
                continue  # LayerNorm gains stay 1, biases 0
            # Linear layers: std 1/√fan_in keeps signals (and gradients to the ViT) at unit scale; a
            # flat 0.02, right for GPT-2's 768 dims, starves a 96-dim projector. Embeddings: 0.02,
            # which, tied to the output head, gives small logits at init -> loss ≈ ln(vocab).
            std = 0.02 if name in ("tok_emb.weight", "pos_emb.weight", "vision.pos") else p.size(1) ** -0.5
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):  # GPT-2: residual branches
                depth = cfg.vit_layers if name.startswith("vision") else cfg.n_layer
                std /= math.sqrt(2 * depth)  # by depth
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def image_prefix(self, images, seen=None):
        """(B, 3, H, W) -> (B, n_patches, d_model) prefix tokens. `seen` is the vision tower's output for
        these images when the caller has it already (a frozen tower: train.py's train_steps)."""
        return self.projector(self.vision(images) if seen is None else seen)

    def decode(self, x, start=0, caches=None):
        """Run the decoder on embeddings x (B, T, d) at positions start.. -> logits (B, T, vocab)."""
        x = x + self.pos_emb(torch.arange(start, start + x.size(1), device=x.device))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))

    def forward(self, images, ids, targets=None, seen=None):
        """images (B,3,H,W), ids (B,T), targets (B,T) with -100 where no loss -> (logits (B,T,V), loss).
        seen: the vision tower's output for the images, if known (see image_prefix)."""
        x = torch.cat([self.image_prefix(images, seen), self.tok_emb(ids)], dim=1)  # (B, P+T, d)
        logits = self.decode(x)[:, self.cfg.n_patches:]  # slice off the image prefix: (B, T, V)
        loss = None
        if targets is not None:
            flat = logits.reshape(-1, logits.size(-1))  # (B·T, V)
            loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, images, ids, max_new_tokens, eos_id=None):
        """Greedy decoding with a KV cache. ids (B, T) are prompts of equal length -> new ids (B, n).

        Stops early once every row has produced `eos_id`; tokens after a row's EOS are junk.
        """
        caches = [dict() for _ in self.blocks]
        x = torch.cat([self.image_prefix(images), self.tok_emb(ids)], dim=1)  # (B, P+T, d)
        logits = self.decode(x, 0, caches)  # prefill: fills every layer's cache
        pos, out = x.size(1), []
        done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)  # (B,)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            if pos >= self.pos_emb.num_embeddings:
                break  # out of positions: the row is as long as the model can read
            logits = self.decode(self.tok_emb(nxt)[:, None], pos, caches)  # one new token per row
            pos += 1
        return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------
# LoRA: a trainable low-rank update beside a frozen linear layer (Hu et al. 2021, arXiv 2106.09685)

LORA_SITES = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "projector")  # names add_lora understands


class LoRALinear(nn.Module):
    """y = x Wᵀ + b + (α/r)·x Aᵀ Bᵀ: a frozen linear layer plus a trainable rank-r update.

    A (r, in) starts random and B (out, r) starts at zero, so a fresh adapter leaves the layer's
    output exactly as it was. merge() folds the update into W, for inference at the base layer's
    cost, and unmerge() takes it out again. Neither happens implicitly: loralib merges inside
    eval(), so a model saved after evaluation silently carries the update in its base weights.
    """

    def __init__(self, base, rank, alpha, gen):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the base layer's own tensors: state-dict names stay
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        # unit-scale x Aᵀ
        A = torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scaling, self.merged = alpha / rank, False  # α/r: changing r keeps the update's size

    def delta(self):
        """The update as a full matrix, (α/r)·B A: (out, in)."""
        return self.scaling * self.lora_B @ self.lora_A

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:  # W already holds the update
            return y
        return y + self.scaling * (x @ self.lora_A.t()) @ self.lora_B.t()  # two thin products, no (out, in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta()
            self.merged = False


def add_lora(model, targets, rank, alpha, seed):
    """Wrap the named linear layers of a VLM in LoRALinear -> every LoRA parameter of the model.

    targets name layers inside each decoder block ('attn.qkv', 'attn.proj', 'mlp.0', 'mlp.2'), or
    'projector' for both layers of the projector. A layer that is wrapped already is left alone,
    so calling this again (the next task) only returns the adapters.
    """
    gen = torch.Generator().manual_seed(seed)
    sites = [(block, t) for block in model.blocks for t in targets if t != "projector"]
    sites += [(model.projector, "0"), (model.projector, "2")] if "projector" in targets else []
    for parent, path in sites:
        owner_name, _, leaf = path.rpartition(".")
        owner = parent.get_submodule(owner_name)  # '' is the parent itself
        if not isinstance(getattr(owner, leaf), LoRALinear):
            setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha, gen))
    return [p for name, p in model.named_parameters() if ".lora_" in name]


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
