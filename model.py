"""The tiny vision-language model: a ViT encoder, an MLP projector and a GPT decoder (LLaVA-style).

images (B,3,H,W) -> ViT -> patch features -> projector -> prefix tokens, followed by the text
tokens; the causal decoder predicts the answer, and the loss is on answer tokens only.
Follows nanoGPT (Karpathy) for the decoder and LLaVA 1.5 (Liu et al. 2023) for the projector.
Every attention call goes through attention.attend, whose paths (manual, sdpa, cuda) must agree.
LoRALinear and add_lora put low-rank adapters beside chosen linear layers (Hu et al. 2021).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import ATTENTION_PATHS, attend


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
    n_head: int = arg(8, "heads of 12 dims each: fewer left the spatial task unlearnt (docs/benchmark.md)")
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
        y = attend(q, k, v, self.causal, self.path)
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
