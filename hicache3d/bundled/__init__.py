"""Bundled small image-to-3D flow-matching generator (CPU, no download).

>>> from hicache3d.bundled import BundledGenerator
>>> gen = BundledGenerator.from_pretrained()
>>> out = gen("object.png", steps=25, seed=0)   # out.occupancy: (1, 32, 32, 32) bool
"""

from .generator import DEFAULT_WEIGHTS, BundledGenerator, GenerationOutput
from .model import ModelConfig, OccupancyVelocityNet
from .sampler import OccupancyFlowSampler, SampleOutput, rescaled_timesteps

__all__ = [
    "BundledGenerator",
    "GenerationOutput",
    "DEFAULT_WEIGHTS",
    "ModelConfig",
    "OccupancyVelocityNet",
    "OccupancyFlowSampler",
    "SampleOutput",
    "rescaled_timesteps",
]
