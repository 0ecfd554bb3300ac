"""A SLIP model written from SLIP's published architecture, for the conversion tests.

Not SLIP's code: a model with the same parameter names and forward pass as
facebookresearch/SLIP's ``SLIP`` class (docs/slip.md, "SLIP's checkpoints"): a timm
VisionTransformer with ``num_classes=0`` under ``visual``; an OpenAI-CLIP text
transformer (sequence-first ``nn.MultiheadAttention`` blocks with ``ln_1``,
``ln_2``, ``mlp.c_fc``/QuickGELU/``mlp.c_proj``, causal mask) under
``transformer.resblocks``; ``token_embedding``, ``positional_embedding``,
``ln_final``; projection matrices ``image_projection``/``text_projection``
used as ``x @ W``; ``logit_scale``; and the SimCLR head ``image_mlp``.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class ReferenceSLIP(nn.Module):
    def __init__(self, visual: nn.Module, vision_width: int, embed_dim: int = 512, context_length: int = 77,
                 vocab_size: int = 49408, text_width: int = 512, text_heads: int = 8, text_layers: int = 12,
                 mlp_dim: int = 4096, out_dim: int = 256, with_head: bool = True):
        super().__init__()
        self.visual = visual
        self.transformer = TextTransformer(text_width, text_layers, text_heads)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.image_projection = nn.Parameter(torch.empty(vision_width, embed_dim))
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        if with_head:
            self.image_mlp = nn.Sequential(OrderedDict([
                ("layer1", nn.Linear(vision_width, mlp_dim)), ("bn1", nn.BatchNorm1d(mlp_dim)), ("relu1", nn.ReLU()),
                ("layer2", nn.Linear(mlp_dim, mlp_dim)), ("bn2", nn.BatchNorm1d(mlp_dim)), ("relu2", nn.ReLU()),
                ("layer3", nn.Linear(mlp_dim, out_dim))]))
        self.context_length = context_length

    def randomize(self, seed: int = 0) -> "ReferenceSLIP":
        """Random values everywhere (norm gains near 1, BN statistics too), so no parameter goes untested."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                if name.endswith("weight") and p.ndim == 1:   # LayerNorm / BatchNorm gains
                    p.add_(1.0)
            self.logit_scale.fill_(2.9)
            for name, b in self.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
                elif name.endswith("running_var"):
                    b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        return self

    def encode_image(self, image):
        return self.visual(image) @ self.image_projection

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        mask = torch.full((self.context_length, self.context_length), float("-inf")).triu_(1)
        x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def logits(self, image, text):
        i = F.normalize(self.encode_image(image), dim=-1)
        t = F.normalize(self.encode_text(text), dim=-1)
        return self.logit_scale.exp() * i @ t.T


def save_slip_checkpoint(model: ReferenceSLIP, path, arch: str, epoch: int = 40) -> None:
    """SLIP's checkpoint layout: DDP ``module.`` keys, argparse args, optimiser and scaler state."""
    state = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    args = argparse.Namespace(model=arch, ssl_mlp_dim=4096, ssl_emb_dim=256, ssl_scale=1.0, ssl_temp=0.1,
                              dataset="cc3m", betas=(0.9, 0.98), dist_url="env://", gpu=0, distributed=True)
    torch.save({"epoch": epoch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0, "_growth_tracker": 10}, "best_acc1": 23.0, "args": args}, path)
