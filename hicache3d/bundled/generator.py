"""The bundled image-to-occupancy generator: shipped weights + sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import shapes
from .model import ModelConfig, OccupancyVelocityNet, latent_to_grid
from .sampler import OccupancyFlowSampler

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "bundled_occ32.safetensors"

DEFAULT_SAMPLING = {"steps": 25, "cfg_strength": 1.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}

ImageLike = Union[str, Path, np.ndarray, torch.Tensor]


def sidecar_path(weights: Union[str, Path]) -> Path:
    return Path(weights).with_suffix(".json")


def save_weights(model: OccupancyVelocityNet, path: Union[str, Path], meta: dict) -> None:
    """Write ``model``'s parameters as safetensors and ``meta`` (plus the model
    config) to the JSON sidecar next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "model": "OccupancyVelocityNet"})
    meta = dict(meta)
    meta["model_config"] = model.config.to_dict()
    sidecar_path(path).write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class GenerationOutput:
    """``occupancy`` ``(B, 32, 32, 32)`` bool, ``probabilities`` in [0, 1]
    (the final state mapped by ``(x + 1) / 2``, clipped), ``latent`` the raw
    final state ``(B, 8, 16, 16, 16)``.  Grid index order ``[x, y, z]`` over
    the cube ``[-1, 1]^3`` (y up)."""

    occupancy: torch.Tensor
    probabilities: torch.Tensor
    latent: torch.Tensor
    network_forwards: int

    def mesh(self, index: int = 0):
        from .metrics import occupancy_to_mesh

        return occupancy_to_mesh(self.occupancy[index])


class BundledGenerator:
    """Small image-to-3D (occupancy) flow-matching generator.

    ``gen = BundledGenerator.from_pretrained()``; ``out = gen(image)``.  The
    sampler is ``gen.sampler`` (an :class:`OccupancyFlowSampler`) and the
    velocity network ``gen.model``.
    """

    def __init__(self, model: OccupancyVelocityNet, sampler: Optional[OccupancyFlowSampler] = None,
                 sampling: Optional[dict] = None, meta: Optional[dict] = None):
        self.model = model.eval()
        self.sampler = sampler if sampler is not None else OccupancyFlowSampler()
        self.sampling = dict(DEFAULT_SAMPLING)
        if sampling:
            self.sampling.update(sampling)
        self.meta = meta or {}

    @classmethod
    def from_pretrained(cls, path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> "BundledGenerator":
        """Load the shipped weights (safetensors, no pickle) and their JSON sidecar."""
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        meta = json.loads(sidecar_path(path).read_text()) if sidecar_path(path).exists() else {}
        config = ModelConfig.from_dict(meta.get("model_config", {}))
        model = OccupancyVelocityNet(config)
        state = load_file(str(path), device=str(device))
        model.load_state_dict(state)
        model.to(device)
        return cls(model, sampling=meta.get("sampling"), meta=meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare_condition(self, image: ImageLike) -> torch.Tensor:
        """``(B, 2, 64, 64)`` condition from a PNG path, an image array
        ``(H, W[, C])`` (silhouette extracted, depth unknown), or an
        already-formatted condition tensor ``(2, 64, 64)`` / ``(B, 2, 64, 64)``."""
        if isinstance(image, torch.Tensor):
            cond = image.float()
            if cond.dim() == 3:
                cond = cond[None]
            if cond.shape[1:] != (2, shapes.IMAGE, shapes.IMAGE):
                raise ValueError(f"condition tensor must be (B, 2, {shapes.IMAGE}, {shapes.IMAGE}), got {tuple(cond.shape)}")
        else:
            cond = shapes.image_to_condition(image)[None]
        return cond.to(self.device)

    def noise(self, batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        c = self.model.config
        lat = c.grid // 2
        return torch.randn((batch, c.latent_channels, lat, lat, lat), generator=g).to(self.device)

    def per_item(self, image: ImageLike, steps: Optional[int] = None, seed: int = 0) -> GenerationOutput:
        """One sampler run per condition of the batch ``image`` (as ``hicache3d generate``
        runs), each with its slice of the batch's noise: the samples of the batched call,
        the outputs concatenated (``network_forwards`` summed over the runs)."""
        cond = self.prepare_condition(image)
        noise = self.noise(cond.shape[0], seed)
        outs = [self(cond[i:i + 1], steps=steps, noise=noise[i:i + 1]) for i in range(cond.shape[0])]
        return GenerationOutput(
            occupancy=torch.cat([o.occupancy for o in outs]),
            probabilities=torch.cat([o.probabilities for o in outs]),
            latent=torch.cat([o.latent for o in outs]),
            network_forwards=sum(int(o.network_forwards) for o in outs),
        )

    @torch.no_grad()
    def __call__(
        self,
        image: ImageLike,
        steps: Optional[int] = None,
        seed: int = 0,
        cfg_strength: Optional[float] = None,
        cfg_interval: Optional[Sequence[float]] = None,
        rescale_t: Optional[float] = None,
        progress: Optional[Callable[[int, int, float], None]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> GenerationOutput:
        s = self.sampling
        cond = self.prepare_condition(image)
        neg = torch.zeros_like(cond)
        if noise is None:
            noise = self.noise(cond.shape[0], seed)
        else:
            c = self.model.config
            want = (cond.shape[0], c.latent_channels) + (c.grid // 2,) * 3
            if tuple(noise.shape) != want:
                raise ValueError(f"noise must be {want} for this condition, got {tuple(noise.shape)}")
            noise = noise.to(self.device, torch.float32)
        out = self.sampler.sample(
            self.model,
            noise,
            cond,
            neg,
            steps=int(steps if steps is not None else s["steps"]),
            cfg_strength=float(cfg_strength if cfg_strength is not None else s["cfg_strength"]),
            cfg_interval=tuple(cfg_interval if cfg_interval is not None else s["cfg_interval"]),
            rescale_t=float(rescale_t if rescale_t is not None else s["rescale_t"]),
            progress=progress,
        )
        grid = latent_to_grid(out.samples)
        return GenerationOutput(
            occupancy=grid > 0,
            probabilities=((grid + 1) / 2).clamp(0, 1),
            latent=out.samples,
            network_forwards=out.network_forwards,
        )
