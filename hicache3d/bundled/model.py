"""Image-conditioned flow-matching velocity network of the bundled generator.

Latent
    The ``32^3`` occupancy grid in ``{-1, +1}`` is folded losslessly into a
    ``(8, 16, 16, 16)`` latent by a fixed 2x2x2 space-to-depth (the same
    shape as a sparse-structure latent: few channels on a coarse grid).

Conditioning
    The 2-channel image (silhouette, depth; see :mod:`.shapes`) is *lifted*
    into the grid by projecting every voxel centre of the ``32^3`` grid into
    the fixed orthographic view:

    * ``hull``   - silhouette at the voxel's pixel (visual hull);
    * ``carve``  - hull carved by the depth map (only voxels at or behind the
      visible front surface); equals ``hull`` when depth is unknown;
    * ``offset`` - signed distance behind the front surface (0 without depth);
    * ``has_depth`` - 1 when the depth channel is present.

    These prior volumes are folded to 32 channels at ``16^3`` and
    concatenated to the noisy latent (plus 3 coordinate channels), so from
    the first step the network only has to refine a prior (mostly: decide
    how far each part extends behind its visible front).  The null
    condition for classifier-free guidance is the all-zero image.

Network
    A small 3D conv U-Net (16^3 -> 8^3 -> 4^3 with self-attention at the
    bottleneck), GroupNorm residual blocks with FiLM time conditioning.
    The velocity convention follows rectified flow as used by TRELLIS:
    ``x_t = (1 - t) x_0 + t * eps`` and ``v = eps - x_0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import shapes


@dataclass
class ModelConfig:
    grid: int = shapes.GRID
    image: int = shapes.IMAGE
    latent_channels: int = 8
    channels: Tuple[int, ...] = (32, 64, 96)
    time_dim: int = 128
    attn_heads: int = 4
    groups: int = 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------
# latent <-> occupancy
# ----------------------------------------------------------------------------

def space_to_depth(x: torch.Tensor, f: int = 2) -> torch.Tensor:
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // f, f, h // f, f, w // f, f)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * f ** 3, d // f, h // f, w // f)


def depth_to_space(x: torch.Tensor, f: int = 2) -> torch.Tensor:
    b, c, d, h, w = x.shape
    co = c // f ** 3
    x = x.reshape(b, co, f, f, f, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, co, d * f, h * f, w * f)


def occupancy_to_latent(occ: torch.Tensor) -> torch.Tensor:
    """``(B, G, G, G)`` bool/0-1 occupancy -> ``(B, 8, G/2, G/2, G/2)`` latent in {-1, 1}."""
    x = occ.float()[:, None] * 2.0 - 1.0
    return space_to_depth(x)


def latent_to_grid(z: torch.Tensor) -> torch.Tensor:
    """Latent -> ``(B, G, G, G)`` real-valued grid (occupied where > 0)."""
    return depth_to_space(z)[:, 0]


# ----------------------------------------------------------------------------
# lifting the image into the grid
# ----------------------------------------------------------------------------

class ImageLifter(nn.Module):
    """Projects voxel centres into the fixed view and builds prior volumes."""

    n_channels = 4

    def __init__(self, grid: int = shapes.GRID):
        super().__init__()
        right, up, d = shapes.view_basis()
        p = shapes.grid_points(grid).reshape(-1, 3)
        u = p @ right
        v = p @ up
        s = 1.0 - p @ d  # distance from the camera plane along the ray
        # grid_sample coordinates (align_corners=False): x right, y down
        sample = torch.stack([u, -v], dim=-1).reshape(1, grid, grid * grid, 2)
        self.grid = grid
        self.register_buffer("sample_grid", sample, persistent=False)
        self.register_buffer("voxel_s", s.reshape(1, 1, grid, grid, grid), persistent=False)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        b = cond.shape[0]
        g = self.grid
        grid = self.sample_grid.expand(b, -1, -1, -1)
        sil = F.grid_sample(cond[:, :1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        dep = F.grid_sample(cond[:, 1:2], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        sil = sil.reshape(b, 1, g, g, g).clamp(0, 1)
        dep = dep.reshape(b, 1, g, g, g)
        has_depth = (cond[:, 1].flatten(1).amax(dim=1) > 0).float().view(b, 1, 1, 1, 1)
        valid = (dep > 0).float() * has_depth
        s_front = 2.0 * (1.0 - dep)
        diff = (self.voxel_s - s_front) * valid  # > 0 behind the visible surface
        behind = (diff / (2.0 / g) + 0.5).clamp(0, 1)
        carve = sil * (valid * behind + (1 - valid))
        offset = sil * diff.clamp(-1, 1)
        flag = has_depth.expand(b, 1, g, g, g)
        return torch.cat([sil, carve, offset, flag], dim=1)


# ----------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 * t`` (t in [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.film = nn.Linear(tdim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, c: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tok = self.norm(x).flatten(2).transpose(1, 2)  # (b, n, c)
        q, k, v = self.qkv(tok).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, -1, c)
        return x + self.proj(o).transpose(1, 2).reshape(b, c, d, h, w)


class OccupancyVelocityNet(nn.Module):
    """``v = net(x_t, t, cond)``: x_t ``(B, 8, 16, 16, 16)``, t ``(B,)`` in
    [0, 1], cond ``(B, 2, 64, 64)`` -> velocity of the same shape as x_t.

    Layout (``channels = (c0, c1, c2)``): pointwise stem at 16^3 (c0), 2x2x2
    strided conv to 8^3 (c1) + residual block, strided conv to 4^3 (c2) +
    two residual blocks around a self-attention layer, transposed-conv
    upsampling with skip connections back to 8^3 (residual block) and 16^3
    (one pointwise and one 3x3x3 conv), 3x3x3 output conv (zero-init).
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2 = config.channels
        g, td = config.groups, config.time_dim
        self.lifter = ImageLifter(config.grid)
        lat = config.grid // 2
        cc = torch.linspace(-1, 1, lat)
        coords = torch.stack(torch.meshgrid(cc, cc, cc, indexing="ij"), dim=0)[None]
        self.register_buffer("coords", coords, persistent=False)
        cin = config.latent_channels + ImageLifter.n_channels * 8 + 3
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.stem = nn.Sequential(nn.Conv3d(cin, c0, 1), nn.SiLU(), nn.Conv3d(c0, c0, 1))
        self.down0 = nn.Conv3d(c0, c1, 2, stride=2)
        self.enc1 = ResBlock(c1, c1, td, g)
        self.down1 = nn.Conv3d(c1, c2, 2, stride=2)
        self.mid1 = ResBlock(c2, c2, td, g)
        self.attn = Attention(c2, config.attn_heads, g)
        self.mid2 = ResBlock(c2, c2, td, g)
        self.up1 = nn.ConvTranspose3d(c2, c1, 2, stride=2)
        self.dec1 = ResBlock(2 * c1, c1, td, g)
        self.up0 = nn.ConvTranspose3d(c1, c0, 2, stride=2)
        self.dec0_norm = nn.GroupNorm(g, 2 * c0)
        self.dec0_film = nn.Linear(td, 4 * c0)
        self.dec0_pw = nn.Conv3d(2 * c0, c0, 1)
        self.dec0_conv = nn.Conv3d(c0, c0, 3, padding=1)
        self.out = nn.Conv3d(c0, config.latent_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def condition_volume(self, cond: torch.Tensor) -> torch.Tensor:
        """Lifted prior volumes folded to the latent grid, ``(B, 32, 16, 16, 16)``."""
        return space_to_depth(self.lifter(cond))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        if t.dim() == 0:
            t = t.expand(b)
        emb = self.time_mlp(timestep_embedding(t, self.config.time_dim))
        prior = self.condition_volume(cond.to(x_t.dtype))
        h = torch.cat([x_t, prior, self.coords.expand(b, -1, -1, -1, -1)], dim=1)
        h0 = self.stem(h)
        h1 = self.enc1(self.down0(F.silu(h0)), emb)
        h2 = self.mid1(self.down1(h1), emb)
        h2 = self.mid2(self.attn(h2), emb)
        u1 = self.dec1(torch.cat([self.up1(h2), h1], dim=1), emb)
        u0 = torch.cat([self.up0(u1), h0], dim=1)
        scale, shift = self.dec0_film(emb)[:, :, None, None, None].chunk(2, dim=1)
        u0 = F.silu(self.dec0_norm(u0) * (1 + scale) + shift)
        u0 = F.silu(self.dec0_pw(u0))
        u0 = F.silu(self.dec0_conv(u0))
        return self.out(u0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
