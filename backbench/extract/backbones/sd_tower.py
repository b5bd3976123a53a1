"""The Stable Diffusion encoder as one ``nn.Module``: the parts of a diffusers VAE and UNet that
BoB's feature needs (VAE encoder, UNet time embedding, input convolution, down blocks up to the
last pooled one, middle block), and the prompt's embedding as a buffer. The UNet's up blocks and
the VAE's decoder are left out: they never run, and a frozen backbone should not hold them.

This module imports torch at the top: the ``diffusers:`` source imports it inside its loader.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUPNORM_EPS = 1e-5  # BoB's GroupNorm32 uses torch's default


class DiffusionTower(nn.Module):
    """``forward(x)``: images in [-1, 1] -> (B, sum of pooled channels) features.

    latent = VAE posterior mean x ``vae.config.scaling_factor``; the UNet's down blocks (and
    middle block) at ``timestep`` cross-attending to ``context``; each block in ``pool`` is
    GroupNorm-ed (the UNet's group count, no affine: BoB's GroupNorm as initialised) and
    averaged over positions; the results are concatenated in UNet order.
    """

    def __init__(self, vae: Any, unet: Any, context: torch.Tensor, timestep: int, pool: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else nn.Identity()
        self.scaling = float(vae.config.scaling_factor)
        self.center = bool(unet.config.center_input_sample)
        self.time_proj, self.time_embedding = unet.time_proj, unet.time_embedding
        self.time_embed_act = unet.time_embed_act if unet.time_embed_act is not None else nn.Identity()
        self.conv_in = unet.conv_in
        last = max((int(p[4:]) for p in pool if p != "mid"), default=-1)
        self.down_blocks = nn.ModuleList(unet.down_blocks if "mid" in pool else unet.down_blocks[:last + 1])
        self.mid_block = unet.mid_block if "mid" in pool else None
        self.register_buffer("context", context)
        self.timestep, self.pool = int(timestep), tuple(pool)
        self.groups = int(unet.config.norm_num_groups)
        widths = list(unet.config.block_out_channels)
        self.feature_dim = sum(widths[-1] if p == "mid" else widths[int(p[4:])] for p in pool)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mean (``latent_dist.mean``), scaled as the UNet was trained on it."""
        mean, _ = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.latent(x)
        if self.center:
            h = 2 * h - 1.0
        t = torch.full((h.shape[0],), self.timestep, dtype=torch.long, device=h.device)
        emb = self.time_embed_act(self.time_embedding(self.time_proj(t).to(h.dtype)))
        context = self.context.to(h.dtype).expand(h.shape[0], -1, -1)
        h = self.conv_in(h)
        outs: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.down_blocks):
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            outs[f"down{i}"] = h
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                outs["mid"] = self.mid_block(h, emb, encoder_hidden_states=context)
            else:
                outs["mid"] = self.mid_block(h, emb)
        pooled = [F.group_norm(outs[p].float(), self.groups, eps=GROUPNORM_EPS).mean(dim=(2, 3)) for p in self.pool]
        return torch.cat(pooled, dim=1)
