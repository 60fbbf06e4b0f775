"""Adapters: how to hook one family of samplers (the code behind recipes' ``adapter``)."""
from __future__ import annotations

from typing import Dict, Type

from .base import Adapter

_ADAPTERS: Dict[str, str] = {
    "generic": "hicache3d.patches.generic:GenericAdapter",
    "hunyuan3d": "hicache3d.patches.hunyuan3d:Hunyuan3DAdapter",
    "sam3d": "hicache3d.patches.sam3d:SAM3DAdapter",
    "fast_sam3d": "hicache3d.patches.sam3d:FastSAM3DAdapter",
    "trellis": "hicache3d.patches.trellis:TrellisAdapter",
}


def adapter_class(name: str) -> Type[Adapter]:
    if name not in _ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {', '.join(sorted(_ADAPTERS))}")
    mod, cls = _ADAPTERS[name].split(":")
    return getattr(__import__(mod, fromlist=[cls]), cls)
