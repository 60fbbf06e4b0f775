"""hicache3d: training-free acceleration of image-to-3D flow-matching generators.

Skips most network calls of a sampler and forecasts the velocity from the cached
outputs of the computed steps, with a polynomial (Taylor, Hermite) or exponential
(DMD / Prony) basis, or ``auto`` selection.
"""
from .cache import CacheStats, VelocityCache
from .config import CacheConfig
from .forecast import make_forecaster

__version__ = "0.1.0"

__all__ = ["CacheConfig", "CacheStats", "VelocityCache", "make_forecaster", "__version__"]
