"""Upstream image-to-3D pipelines driven by ``hicache3d generate`` (and ``tune``).

One module per family, each with one class of the same shape::

    pipe = load_pipeline(recipe, folder, device)   # an UpstreamPipeline
    payload = pipe.prepare(pil_image)               # the upstream's own preprocessing
    out = pipe.run(payload, steps=12, seed=0)        # -> StageOutput
    out.mesh      # trimesh.Trimesh, or None when a decoder cannot run here
    out.reason    # why there is no mesh (one line), else None
    out.latents   # {site: final latent of that site's sampler}, whatever the decoders did

``pipe.pipeline`` is the upstream pipeline object (what :func:`hicache3d.accelerate`
patches) and ``pipe.networks`` the flow networks whose forwards are the network calls.

Loading reads the upstream's own weights folder layout (``pipeline.json`` naming
``ckpts/<name>.json`` + ``ckpts/<name>.safetensors`` for TRELLIS v1 / TRELLIS.2,
``pipeline.yaml`` + checkpoints for SAM 3D) and checks it before any upstream code runs,
so a wrong folder is a clear error, never a hub download attempt from inside the
upstream loader.
"""
from __future__ import annotations

from ._base import LayoutError, StageOutput, UpstreamPipeline

__all__ = ["LayoutError", "StageOutput", "UpstreamPipeline", "load_pipeline", "FAMILIES"]

# recipe name -> "module:Class" of this package (imported only when used)
FAMILIES = {
    "trellis": "trellis:TrellisPipeline",
    "trellis2": "trellis2:Trellis2Pipeline",
    "sam3d": "sam3d:SAM3DPipeline",
}


def pipeline_class(recipe) -> type:
    """The :class:`UpstreamPipeline` subclass for ``recipe`` (by family / name)."""
    import importlib
    key = str(recipe.extra.get("family") or recipe.name) if recipe.adapter == "trellis" else recipe.adapter
    if key not in FAMILIES:
        raise KeyError(key)
    mod, cls = FAMILIES[key].split(":")
    return getattr(importlib.import_module(f".{mod}", __name__), cls)


def load_pipeline(recipe, folder, device: str) -> UpstreamPipeline:
    """Check ``folder``'s layout, import the upstream code, and load the pipeline."""
    return pipeline_class(recipe).load(recipe, folder, device)
