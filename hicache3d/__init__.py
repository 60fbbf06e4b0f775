"""hicache3d: training-free acceleration of image-to-3D flow-matching generators.

Skips most network calls of a sampler and forecasts the velocity from the cached
outputs of the computed steps, with a polynomial (Taylor, Hermite) or exponential
(DMD / Prony) basis, or ``auto`` selection.

The package imports lazily: ``import hicache3d`` is cheap (it only activates in-place
patches written by ``hicache3d patch``); torch is imported when a name is first used.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "CacheConfig": "hicache3d.config",
    "CacheStats": "hicache3d.cache",
    "VelocityCache": "hicache3d.cache",
    "make_forecaster": "hicache3d.forecast",
    "AdaptiveCFG": "hicache3d.cfg",
    "accelerate": "hicache3d.api",
    "enable": "hicache3d.api",
    "disable": "hicache3d.api",
    "uncached": "hicache3d.patching",
    "generate_folder": "hicache3d.folder",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hicache3d' has no attribute {name!r}")


def __dir__():
    return __all__


from . import _bootstrap  # noqa: E402  (activates in-place patches, if any)

_bootstrap.activate()
