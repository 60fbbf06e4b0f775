"""Run the real Hunyuan3D-2 shape pipeline (PyPI ``hy3dgen==2.0.2``) on CPU with a tiny model.

``build_pipeline(model_dir)`` writes a model folder in the exact on-disk layout of the
published checkpoints (``<HY3DGEN_MODELS>/<repo>/<subfolder>/config.yaml`` +
``model.fp16.safetensors`` with ``model.`` / ``vae.`` / ``conditioner.`` key prefixes),
filled with seeded random weights of the upstream classes at a tiny size, and loads it
with the real ``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained`` (offline: the loader
only downloads when the folder is missing).

Tiny configuration (real mini model in brackets):

* denoiser ``hy3dgen.shapegen.models.Hunyuan3DDiT``: hidden 64 [1024], 4 heads [16],
  depth 1 + 1 single [8 + 16], in_channels 64 [64], context 32 [1536];
* VAE ``ShapeVAE``: 16 latents [512] x 64 channels [64], width 32, 1 decoder layer;
* conditioner ``SingleImageEncoder`` / ``DinoImageEncoder`` from a ``Dinov2Config``
  dict (hidden 32, 1 layer, 2 heads, image 56, patch 14 -> 16 patches + CLS = 17 tokens)
  [1536 hidden, 518 image, 1370 tokens];
* ``ImageProcessorV2`` size 64, ``FlowMatchEulerDiscreteScheduler`` 1000 train steps.

Network-call shapes with the tiny model: latents ``[B, 16, 64]``; with CFG the model
sees ``[2B, 16, 64]`` and ``cond['main']`` of ``[2B, 17, 32]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import _standins
from ._common import (CHECKOUT, count_calls, ensure_installed, package_dir, prepend_sys_path,
                      rerandomize_zero_params)

__all__ = [
    "activate", "build_pipeline", "write_model_dir", "run", "make_test_image", "count_calls",
    "REPO_ID", "SUBFOLDER", "TURBO_SUBFOLDER", "TINY",
]

# Names used for the on-disk layout; they mirror the published mini model.
REPO_ID = "tencent/Hunyuan3D-2mini"
SUBFOLDER = "hunyuan3d-dit-v2-mini"
TURBO_SUBFOLDER = "hunyuan3d-dit-v2-mini-turbo"

TINY = {
    "latents": 16,
    "channels": 64,
    "hidden": 64,
    "heads": 4,
    "dino_hidden": 32,
    "dino_image": 56,
    "processor_size": 64,
}

_ACTIVE = False


def shapegen() -> str:
    """The import name of the shape-generation package: ``hy3dgen.shapegen`` (PyPI), or the
    package name of a source checkout (Hunyuan3D-2.1 names it ``hy3dshape``)."""
    return package_dir("hy3dgen", Path("hy3dgen/shapegen")).name if "hy3dgen" in CHECKOUT else "hy3dgen.shapegen"


def _shapegen(sub: str):
    import importlib
    return importlib.import_module(f"{shapegen()}.{sub}")


def activate() -> Path:
    """Install (once) and make ``hy3dgen`` importable; returns the install folder. Idempotent."""
    global _ACTIVE
    target = ensure_installed("hy3dgen")
    if _ACTIVE:
        return target
    prepend_sys_path(target)
    _standins.register_torchvision_op_schemas()
    _standins.install_pymeshlab_stub()
    os.environ.setdefault("HY3DGEN_DEBUG", "0")  # its timer uses CUDA events when 1
    __import__(shapegen())  # fail early, with the real import chain

    _ACTIVE = True
    return target


def _config(turbo: bool) -> dict:
    t = TINY
    dino = {
        "hidden_size": t["dino_hidden"],
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "image_size": t["dino_image"],
        "patch_size": 14,
        "layerscale_value": 1.0,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }
    return {
        "model": {
            "target": f"{shapegen()}.models.Hunyuan3DDiT",
            "params": {
                "in_channels": t["channels"],
                "context_in_dim": t["dino_hidden"],
                "hidden_size": t["hidden"],
                "mlp_ratio": 2.0,
                "num_heads": t["heads"],
                "depth": 1,
                "depth_single_blocks": 1,
                "axes_dim": [t["hidden"] // t["heads"]],
                "theta": 10000,
                "qkv_bias": True,
                "guidance_embed": bool(turbo),
            },
        },
        "vae": {
            "target": f"{shapegen()}.models.ShapeVAE",
            "params": {
                "num_latents": t["latents"],
                "embed_dim": t["channels"],
                "num_freqs": 8,
                "include_pi": False,
                "heads": 2,
                "width": 32,
                "num_decoder_layers": 1,
                "qkv_bias": False,
                "qk_norm": True,
                "scale_factor": 1.0,
            },
        },
        "conditioner": {
            "target": f"{shapegen()}.models.SingleImageEncoder",
            "params": {
                "main_image_encoder": {
                    "type": "DinoImageEncoder",
                    "kwargs": {"config": dino, "image_size": t["dino_image"], "use_cls_token": True},
                }
            },
        },
        "scheduler": {
            "target": f"{shapegen()}.schedulers.FlowMatchEulerDiscreteScheduler",
            "params": {"num_train_timesteps": 1000},
        },
        "image_processor": {
            "target": f"{shapegen()}.preprocessors.ImageProcessorV2",
            "params": {"size": t["processor_size"], "border_ratio": 0.15},
        },
    }


def write_model_dir(model_dir, *, turbo: bool = False, seed: int = 0) -> Path:
    """Write ``<model_dir>/<REPO_ID>/<subfolder>/{config.yaml, model.fp16.safetensors}``.

    Weights are the upstream classes' own initialisation drawn under ``torch.manual_seed(seed)``
    (global RNG state is saved and restored), then any all-zero parameter is re-randomised.
    Tensors are stored in float32 (the file name is what the loader looks for).
    Returns the subfolder path.
    """
    activate()
    import yaml
    from safetensors.torch import save_file
    instantiate_from_config = _shapegen("pipelines").instantiate_from_config

    cfg = _config(turbo)
    folder = Path(model_dir) / REPO_ID / (TURBO_SUBFOLDER if turbo else SUBFOLDER)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(10_000 + seed)
    tensors = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for part in ("model", "vae", "conditioner"):
            module = instantiate_from_config(cfg[part])
            rerandomize_zero_params(module, gen)
            if part == "vae":
                _spread_occupancy(module, gen)
            for key, value in module.state_dict().items():
                tensors[f"{part}.{key}"] = value.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(folder / "model.fp16.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


@torch.no_grad()
def _spread_occupancy(vae, gen: torch.Generator) -> None:
    """Make the random occupancy field cross 0 inside the box, so marching cubes finds a surface.

    Scales up the geometry decoder's output projection and zeroes its bias: the decoded
    field then varies in sign over space for any latent (a random-weight field with a
    bias usually has one sign everywhere, and the upstream surface extractor returns
    ``None`` when marching cubes finds no level set).
    """
    proj = vae.geo_decoder.output_proj
    proj.weight.mul_(20.0)
    proj.bias.zero_()


def build_pipeline(model_dir, *, turbo: bool = False, seed: int = 0, device: str = "cpu",
                   dtype: torch.dtype = torch.float32):
    """Write a tiny model under ``model_dir`` and load it with the real pipeline loader.

    Sets ``HY3DGEN_MODELS=model_dir`` and calls
    ``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(REPO_ID, subfolder=..., device, dtype)``.
    ``turbo=True``: the denoiser has ``guidance_embed=True`` (guidance-distilled): the
    pipeline then makes one un-doubled network call per step and feeds the guidance
    scale through ``guidance=``.
    """
    activate()
    Hunyuan3DDiTFlowMatchingPipeline = _shapegen("pipelines").Hunyuan3DDiTFlowMatchingPipeline

    write_model_dir(model_dir, turbo=turbo, seed=seed)
    os.environ["HY3DGEN_MODELS"] = str(Path(model_dir))
    pipe = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
        REPO_ID,
        subfolder=TURBO_SUBFOLDER if turbo else SUBFOLDER,
        device=device,
        dtype=dtype,
        use_safetensors=True,
        variant="fp16",
    )
    return pipe


def make_test_image(size: int = 64, shape: str = "disc"):
    """A small RGBA PIL image: an opaque coloured shape on a transparent background."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2.0
    if shape == "disc":
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= (0.35 * size) ** 2
    elif shape == "square":
        mask = (abs(yy - c) <= 0.3 * size) & (abs(xx - c) <= 0.3 * size)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = (xx * 255 // max(size - 1, 1)).astype(np.uint8)
    rgba[..., 1] = 96
    rgba[..., 2] = (yy * 255 // max(size - 1, 1)).astype(np.uint8)
    rgba[..., 3] = np.where(mask, 255, 0).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


# Default call arguments for a fast CPU run (pipeline defaults in brackets).
RUN_DEFAULTS = {
    "guidance_scale": 5.0,  # [5.0]
    "octree_resolution": 16,  # [384]: 17^3 grid points for the volume decoder
    "num_chunks": 8000,  # [8000]: query points per geo-decoder call (one call at res 16)
    "mc_level": 0.0,  # [0.0]
    "box_v": 1.01,  # [1.01]
    "output_type": "trimesh",  # or "latent" to skip VAE decode + marching cubes
    "enable_pbar": False,
}


def run(pipeline, image=None, steps: int = 5, seed: int = 0, **kw):
    """Call the real pipeline once: ``pipeline(image=..., num_inference_steps=steps, generator=..., **kw)``.

    Defaults (``RUN_DEFAULTS``): guidance_scale 5.0, octree_resolution 16, num_chunks 8000,
    mc_level 0.0, box_v 1.01, output_type "trimesh", enable_pbar False; ``generator`` is a
    CPU ``torch.Generator`` seeded with ``seed``.  Returns what the pipeline returns: a
    list with one ``trimesh.Trimesh`` per image (``None`` where marching cubes found no
    surface), or the latents ``[B, 16, 64]`` with ``output_type="latent"``.
    """
    if image is None:
        image = make_test_image()
    args = dict(RUN_DEFAULTS)
    args.update(kw)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipeline(image=image, num_inference_steps=steps, generator=generator, **args)
