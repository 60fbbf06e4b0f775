"""Run the real SAM 3D Objects generators (vendored by PyPI ``sam3d==0.1.2``) on CPU with tiny models.

``sam3d`` ships Meta's ``sam3d_objects`` package under ``sam3d/third_party/meta``;
``activate()`` puts that folder on ``sys.path`` so the code imports as ``sam3d_objects.*``
(exactly as upstream), with ``LIDRA_SKIP_INIT=true`` (skips ``sam3d_objects.init``).

Real upstream code exercised:

* generators: ``sam3d_objects.model.backbone.generator.shortcut.model.ShortCut`` (a
  ``FlowMatching`` subclass), its ``generate`` -> ``generate_iter`` ->
  ``self._solver.solve_iter`` (``flow_matching.solver.Euler``) -> ``_generate_dynamics``;
* guidance: ``generator.classifier_free_guidance.ClassifierFreeGuidance`` as the
  generator's ``reverse_fn`` (``add_flag`` unconditional handling for the sparse
  structure, ``zeros`` for the structured latent, as the inference pipeline sets them);
* networks: ``tdfy_dit.models.mot_sparse_structure_flow.SparseStructureFlowTdfyWrapper``
  (multi-modal DiT with ``mm_latent.Latent`` input/output maps: 5 latents, the 4 pose
  latents sharing one transformer stream) and
  ``tdfy_dit.models.structured_latent_flow.SLatFlowModelTdfyWrapper`` (sparse, spconv).

Stand-ins: an empty package module for ``sam3d_objects.model.backbone.tdfy_dit.models``
(its ``__init__`` imports the Gaussian / mesh decoders, which need kaolin, nvdiffrast,
...), and a CPU ``flash_attn`` while the sparse attention modules are imported.

Not run: condition embedders (DINOv2, point-map encoders), decoders, the
``InferencePipeline`` class (CUDA-only in its constructor).  The generators get a
pre-embedded condition tensor, as the pipeline passes them (``get_condition_input``
runs the embedder outside the generator).

Tiny sizes (published model in brackets): SS width 32 [1024], 2 heads [16], 1 block
[24]; shape latent [B, 4096, 8] (16^3 grid) [same], pose latents [B, 1, 6/3/3/1]
[same]; SLat width 64 [1024], 1 block [24], io channels [32] [[128]], patch 2,
feats [1, N, 8] [same]; condition 16 tokens x 32 [DINO tokens x 1024].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import _standins
from ._common import (count_calls, ensure_installed, keep_spconv_in_train_mode, package_dir, prepend_sys_path,
                      rerandomize_zero_params)

__all__ = [
    "activate", "build_ss_generator", "build_slat_generator", "make_cond", "make_coords", "ss_latent_shape",
    "generate_ss", "generate_slat", "solve", "time_grid", "expected_calls", "count_calls", "TINY",
    "PIPELINE_DEFAULTS", "SS_LATENTS",
]

TINY = {"cond_tokens": 16, "cond_channels": 32, "ss_width": 32, "slat_width": 64, "slat_resolution": 64}

# Latent names and per-token channels of the sparse-structure generator (token counts:
# shape 16^3 = 4096, each pose latent 1).
SS_LATENTS = {"shape": 8, "6drotation_normalized": 6, "scale": 3, "translation": 3, "translation_scale": 1}

# InferencePipeline defaults (sam3d_objects/pipeline/inference_pipeline.py).
PIPELINE_DEFAULTS = {
    "ss": {"steps": 25, "rescale_t": 3, "cfg_strength": 7, "cfg_interval": (0, 500)},
    "slat": {"steps": 25, "rescale_t": 3, "cfg_strength": 5, "cfg_interval": (0, 500)},
}

ENV = {
    "LIDRA_SKIP_INIT": "true",  # sam3d_objects/__init__ otherwise runs sam3d_objects.init
    "ATTN_BACKEND": "sdpa",
    "SPARSE_BACKEND": "spconv",
    "SPARSE_ATTN_BACKEND": "flash_attn",
    "SPCONV_ALGO": "native",
}

_ACTIVE = None


def meta_root() -> Path:
    """The folder holding ``sam3d_objects`` (vendored by ``sam3d``, or a source checkout)."""
    return package_dir("sam3d", ensure_installed("sam3d") / "sam3d" / "third_party" / "meta"
                       / "sam3d_objects").parent


def activate() -> Path:
    """Install (once) and import the SAM 3D generator code; returns the install folder. Idempotent."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    target = ensure_installed("sam3d")
    root = meta_root()
    prepend_sys_path(target)
    prepend_sys_path(root)
    for key, value in ENV.items():
        os.environ[key] = value
    _standins.empty_package("sam3d_objects.model.backbone.tdfy_dit.models",
                            root / "sam3d_objects" / "model" / "backbone" / "tdfy_dit" / "models")
    import sam3d_objects.model.backbone.generator.shortcut.model  # noqa: F401
    import sam3d_objects.model.backbone.generator.classifier_free_guidance  # noqa: F401
    import sam3d_objects.model.backbone.tdfy_dit.models.mot_sparse_structure_flow  # noqa: F401
    import sam3d_objects.model.backbone.tdfy_dit.models.mm_latent  # noqa: F401
    # The sparse attention modules bind ``flash_attn`` at import time.
    with _standins.flash_attn_installed():
        import sam3d_objects.model.backbone.tdfy_dit.modules.sparse.attention  # noqa: F401
        import sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_flow  # noqa: F401
    _ACTIVE = target
    return target


def _seeded(seed: int, ctor):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = ctor()
    rerandomize_zero_params(module, torch.Generator().manual_seed(10_000 + seed))
    return module


def build_ss_generator(seed: int = 0, *, steps: int = PIPELINE_DEFAULTS["ss"]["steps"],
                       rescale_t: float = PIPELINE_DEFAULTS["ss"]["rescale_t"],
                       cfg_strength: float = PIPELINE_DEFAULTS["ss"]["cfg_strength"],
                       cfg_interval=PIPELINE_DEFAULTS["ss"]["cfg_interval"]):
    """Tiny sparse-structure generator: ``ShortCut(reverse_fn=ClassifierFreeGuidance(SparseStructureFlowTdfyWrapper))``.

    Configured as ``InferencePipeline.sample_sparse_structure`` leaves it (not distilled):
    ``no_shortcut=True`` (d = 0), ``reverse_fn.unconditional_handling="add_flag"`` with the
    backbone's ``force_zeros_cond=True`` (the unconditional pass zeroes the condition), strength
    7 applied while ``1000 t`` is in [0, 500]; Euler solver; 25 steps, ``rescale_t`` 3.
    Returns the generator (eval mode); the network is ``generator.reverse_fn.backbone``.
    """
    activate()
    from sam3d_objects.model.backbone.generator.classifier_free_guidance import ClassifierFreeGuidance
    from sam3d_objects.model.backbone.generator.shortcut.model import ShortCut
    from sam3d_objects.model.backbone.tdfy_dit.models.mm_latent import (
        Latent, LearntPositionEmbedder, ShapePositionEmbedder)
    from sam3d_objects.model.backbone.tdfy_dit.models.mot_sparse_structure_flow import (
        SparseStructureFlowTdfyWrapper)

    w = TINY["ss_width"]

    def ctor():
        mapping = {
            name: Latent(ch, w, ShapePositionEmbedder(w, 16, 1) if name == "shape" else LearntPositionEmbedder(w, 1))
            for name, ch in SS_LATENTS.items()
        }
        backbone = SparseStructureFlowTdfyWrapper(
            latent_mapping=mapping,
            latent_share_transformer={"pose": [n for n in SS_LATENTS if n != "shape"]},
            in_channels=8, model_channels=w, cond_channels=TINY["cond_channels"], out_channels=8, num_blocks=1,
            num_heads=2, mlp_ratio=2, pe_mode="ape", qk_rms_norm=True, qk_rms_norm_cross=True,
            is_shortcut_model=True, force_zeros_cond=True,
        )
        guidance = ClassifierFreeGuidance(backbone, strength=cfg_strength, interval=list(cfg_interval),
                                          unconditional_handling="add_flag")
        return ShortCut(reverse_fn=guidance, inference_steps=steps, rescale_t=rescale_t, no_shortcut=True,
                        solver_method="euler")

    return _seeded(seed, ctor).eval()


def build_slat_generator(seed: int = 0, *, steps: int = PIPELINE_DEFAULTS["slat"]["steps"],
                         rescale_t: float = PIPELINE_DEFAULTS["slat"]["rescale_t"],
                         cfg_strength: float = PIPELINE_DEFAULTS["slat"]["cfg_strength"],
                         cfg_interval=PIPELINE_DEFAULTS["slat"]["cfg_interval"]):
    """Tiny structured-latent generator: ``ShortCut(reverse_fn=ClassifierFreeGuidance(SLatFlowModelTdfyWrapper))``.

    ``no_shortcut=True``, ``zeros`` unconditional handling (cond tensor zeroed; the numpy
    coords argument is kept), strength 5 while ``1000 t`` in [0, 500].  The network takes a
    dense ``[1, N, 8]`` latent plus the coords (numpy ``[N, 4]``) as the last positional
    condition argument and returns ``[1, N, 8]``.
    """
    activate()
    from sam3d_objects.model.backbone.generator.classifier_free_guidance import ClassifierFreeGuidance
    from sam3d_objects.model.backbone.generator.shortcut.model import ShortCut
    from sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_flow import SLatFlowModelTdfyWrapper

    def ctor():
        with _standins.flash_attn_installed():
            backbone = SLatFlowModelTdfyWrapper(
                resolution=TINY["slat_resolution"], in_channels=8, model_channels=TINY["slat_width"],
                cond_channels=TINY["cond_channels"], out_channels=8, num_blocks=1, num_heads=4, mlp_ratio=2,
                patch_size=2, num_io_res_blocks=1, io_block_channels=[32], pe_mode="ape", qk_rms_norm=True,
                is_shortcut_model=True,
            )
        guidance = ClassifierFreeGuidance(backbone, strength=cfg_strength, interval=list(cfg_interval),
                                          unconditional_handling="zeros")
        return ShortCut(reverse_fn=guidance, inference_steps=steps, rescale_t=rescale_t, no_shortcut=True,
                        solver_method="euler")

    gen = _seeded(seed, ctor).eval()
    keep_spconv_in_train_mode(gen)
    return gen


# --------------------------------------------------------------------------- inputs


def make_cond(batch: int = 1, seed: int = 0):
    """Embedded condition tokens ``[B, 16, 32]`` (what the pipeline's condition embedder returns)."""
    g = torch.Generator().manual_seed(20_000 + seed)
    return torch.randn(batch, TINY["cond_tokens"], TINY["cond_channels"], generator=g)


def ss_latent_shape(batch: int = 1) -> dict:
    """``x_shape`` dict ``{name: (B, tokens, channels)}`` as ``sample_sparse_structure`` builds it."""
    return {name: (batch, 4096 if name == "shape" else 1, ch) for name, ch in SS_LATENTS.items()}


def make_coords(seed: int = 0, n_target: int = 300, resolution: int = TINY["slat_resolution"]):
    """Random voxel coords ``[N, 4]`` int32 numpy (batch column 0), unique and sorted."""
    rng = np.random.default_rng(40_000 + seed)
    xyz = np.unique(rng.integers(0, resolution, size=(n_target, 3)), axis=0)
    return np.concatenate([np.zeros((xyz.shape[0], 1), dtype=np.int32), xyz.astype(np.int32)], axis=1)


# --------------------------------------------------------------------------- running


def time_grid(steps: int, rescale_t: float):
    """The ``t`` sequence of ``ShortCut._prepare_t_and_d`` (t = 0 is noise, 1 is data)."""
    t = np.linspace(0, 1, steps + 1)
    if rescale_t:
        t = t / (1 + (rescale_t - 1) * (1 - t))
    return t


def expected_calls(steps: int, rescale_t: float, cfg_interval=(0, 500), cfg_strength: float = 7.0) -> int:
    """Backbone forwards of one generation: 2 at steps whose ``1000 t`` (float32) is in the interval
    (when strength > 0), else 1."""
    if cfg_strength <= 0:
        return steps
    lo, hi = cfg_interval
    n = 0
    for t in time_grid(steps, rescale_t)[:-1]:
        tt = float(torch.tensor([t * 1000.0], dtype=torch.float32))
        n += 2 if lo <= tt <= hi else 1
    return n


def generate_ss(generator, cond=None, *, batch: int = 1, seed: int = 0, steps: int | None = None):
    """One real ``generator(x_shape_dict, device, cond)`` call (``Base.forward`` -> ``generate`` ->
    ``generate_iter`` -> ``Euler`` ``solve_iter``), under ``torch.no_grad()`` as in the pipeline,
    with the initial noise drawn from a forked global RNG seeded with ``seed``.
    Returns the final dict ``{shape: [B, 4096, 8], 6drotation_normalized: [B, 1, 6], scale,
    translation: [B, 1, 3], translation_scale: [B, 1, 1]}``."""
    if cond is None:
        cond = make_cond(batch, seed)
    return _generate(generator, ss_latent_shape(cond.shape[0]), (cond,), seed, steps)


def generate_slat(generator, coords=None, cond=None, *, seed: int = 0, steps: int | None = None):
    """One real ``generator((1, N, 8), device, cond, coords)`` call (as ``sample_slat``); returns ``[1, N, 8]``."""
    if coords is None:
        coords = make_coords(seed)
    if cond is None:
        cond = make_cond(1, seed)
    return _generate(generator, (1, coords.shape[0], 8), (cond, coords), seed, steps)


def _generate(generator, x_shape, cond_args, seed, steps):
    prev = generator.inference_steps
    if steps is not None:
        generator.inference_steps = steps
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return generator(x_shape, torch.device("cpu"), *cond_args)
    finally:
        generator.inference_steps = prev


def solve(generator, x_init, *cond_args, steps: int | None = None):
    """Drive the solver directly: ``generator._solver.solve(generator._generate_dynamics, x_init,
    t_seq, d, *cond_args)`` with ``t_seq, d = generator._prepare_t_and_d()`` (what ``generate_iter``
    does, minus the noise draw).  ``x_init`` is a tensor or a dict of tensors."""
    prev = generator.inference_steps
    if steps is not None:
        generator.inference_steps = steps
    try:
        t_seq, d = generator._prepare_t_and_d()
        with torch.no_grad():
            return generator._solver.solve(generator._generate_dynamics, x_init, t_seq, d, *cond_args)
    finally:
        generator.inference_steps = prev
