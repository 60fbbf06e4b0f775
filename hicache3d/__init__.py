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


def _serve_subpackages_from_checkout() -> None:
    """In a source checkout, ``hicache3d.patches`` and ``hicache3d.recipes`` live in the
    ``patches/`` and ``recipes/`` folders beside this package (pyproject's ``package-dir``).
    Serve them from this checkout, so a checkout put first on ``sys.path`` never mixes with
    the sub-packages of another, installed copy.  A no-op in an installed wheel."""
    import os
    import sys
    from importlib.util import spec_from_file_location

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subs = {f"{__name__}.{n}": os.path.join(root, n) for n in ("patches", "recipes")}
    if not (os.path.isfile(os.path.join(root, "pyproject.toml"))
            and all(os.path.isfile(os.path.join(d, "__init__.py")) for d in subs.values())):
        return

    class _CheckoutFinder:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname not in subs:
                return None
            return spec_from_file_location(fullname, os.path.join(subs[fullname], "__init__.py"),
                                           submodule_search_locations=[subs[fullname]])

    if not any(getattr(f, "__name__", "") == "_CheckoutFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder)


_serve_subpackages_from_checkout()

from . import _bootstrap  # noqa: E402  (activates in-place patches, if any)

_bootstrap.activate()
