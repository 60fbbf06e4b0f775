"""Run the real TRELLIS.2 flow samplers (PyPI ``trellis-3d-python==0.1.30``) on CPU with tiny models.

``trellis-3d-python`` vendors TRELLIS.2 under the import name ``trellis`` (the same name
as TRELLIS v1): ``activate()`` refuses to run in a process where v1 is imported.

Real upstream code exercised: ``trellis.pipelines.samplers.flow_euler``
(``FlowEulerSampler`` / ``FlowEulerCfgSampler`` / ``FlowEulerGuidanceIntervalSampler`` with
``guidance_strength``, ``guidance_interval``, ``guidance_rescale``),
``trellis.models.SparseStructureFlowModel`` and ``SLatFlowModel`` (shape and texture
stages; the texture model takes ``concat_cond``), ``trellis.modules.sparse.SparseTensor``
with ``SPARSE_CONV_BACKEND=none`` (the flow models have no sparse convolutions).

Not run: the VAE decoders (sparse-structure decoder, shape / texture SC-VAEs) and the
image pipeline class; they need CUDA-only packages (``cumesh``, ``flex_gemm``,
``o_voxel``, nvdiffrast) or DINOv3 weights.  Stages are therefore driven directly.

Stand-ins: empty package modules for ``trellis`` / ``trellis.pipelines`` and a CPU
``flash_attn`` that must *stay* in ``sys.modules`` (TRELLIS.2 imports it lazily inside
the sparse attention function, at every call).

Tiny sizes (published TRELLIS.2-4B in brackets): SS flow resolution 16 [16] (4096 dense
tokens), 8 channels [8], width 32 [1536], 2 heads [12], 1 block [30]; shape SLat flow
32 channels [32], width 64 [1536], 4 heads [12], 1 block [30]; texture SLat flow
in 64 = 32 noise + 32 shape [64], out 32 [32]; condition 16 tokens x 32 [~1029 x 1024].
All use rotary position encoding, shared adaLN and QK RMS norm as the published models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import _standins
from ._common import count_calls, prepare_trellis_package, rerandomize_zero_params

__all__ = [
    "activate", "build_ss_flow", "build_shape_flow", "build_tex_flow", "make_sampler", "make_cond",
    "make_ss_noise", "make_coords", "make_slat_noise", "make_tex_noise", "sample_ss", "sample_shape",
    "sample_tex", "t_pairs", "expected_calls", "count_calls", "TINY", "PIPELINE_DEFAULTS",
]

TINY = {
    "resolution": 16,  # sparse-structure latent grid
    "slat_resolution": 32,  # coordinate range of the sparse stages
    "ss_channels": 8,
    "slat_channels": 32,
    "cond_channels": 32,
    "cond_tokens": 16,
}

# Sampler settings of the published TRELLIS.2 pipeline.json (all three use
# FlowEulerGuidanceIntervalSampler(sigma_min=1e-5)).
PIPELINE_DEFAULTS = {
    "ss": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7, "guidance_interval": (0.6, 1.0),
           "rescale_t": 5.0},
    "shape": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.5, "guidance_interval": (0.6, 1.0),
              "rescale_t": 3.0},
    "tex": {"steps": 12, "guidance_strength": 1.0, "guidance_rescale": 0.0, "guidance_interval": (0.6, 0.9),
            "rescale_t": 3.0},
    "sigma_min": 1e-5,
}

ENV = {
    "ATTN_BACKEND": "sdpa",  # dense attention: torch SDPA
    "SPARSE_CONV_BACKEND": "none",  # SparseTensor without a conv library (flow models need none)
    "SPARSE_ATTN_BACKEND": "flash_attn",  # sparse attention only supports xformers / flash_attn(_3)
}

_ACTIVE = None


def activate() -> Path:
    """Install (once) and import the TRELLIS.2 samplers/models; returns the install folder."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    target = prepare_trellis_package("trellis2", "TRELLIS.2", ENV)
    _standins.install_flash_attn()
    import trellis.pipelines.samplers  # noqa: F401
    import trellis.models.sparse_structure_flow  # noqa: F401
    import trellis.models.structured_latent_flow  # noqa: F401
    from trellis.modules import sparse as sp

    sp.SparseTensor  # noqa: B018
    _ACTIVE = target
    return target


# --------------------------------------------------------------------------- models


def _seeded_build(seed: int, ctor):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
    rerandomize_zero_params(model, torch.Generator().manual_seed(10_000 + seed))
    return model.eval()


_COMMON = dict(num_blocks=1, mlp_ratio=2, pe_mode="rope", share_mod=True, initialization="scaled",
               qk_rms_norm=True, qk_rms_norm_cross=True, dtype="float32")


def build_ss_flow(seed: int = 0, **overrides):
    """Tiny ``SparseStructureFlowModel``: ``forward(x [B, 8, 16, 16, 16], t [B] (= 1000 t), cond [B, 16, 32])``."""
    activate()
    from trellis.models.sparse_structure_flow import SparseStructureFlowModel

    t = TINY
    kw = dict(_COMMON, resolution=t["resolution"], in_channels=t["ss_channels"], out_channels=t["ss_channels"],
              model_channels=32, num_heads=2, cond_channels=t["cond_channels"])
    kw.update(overrides)
    return _seeded_build(seed, lambda: SparseStructureFlowModel(**kw))


def build_shape_flow(seed: int = 0, **overrides):
    """Tiny shape ``SLatFlowModel``: ``forward(x: SparseTensor feats [N, 32], t [B], cond [B, 16, 32]) -> SparseTensor [N, 32]``."""
    activate()
    from trellis.models.structured_latent_flow import SLatFlowModel

    t = TINY
    kw = dict(_COMMON, resolution=t["slat_resolution"], in_channels=t["slat_channels"],
              out_channels=t["slat_channels"], model_channels=64, num_heads=4, cond_channels=t["cond_channels"])
    kw.update(overrides)
    return _seeded_build(seed, lambda: SLatFlowModel(**kw))


def build_tex_flow(seed: int = 0, **overrides):
    """Tiny texture ``SLatFlowModel``: ``forward(x [N, 32], t, cond, concat_cond=shape_slat [N, 32])``;
    it concatenates ``concat_cond`` to ``x`` on the feature axis (in_channels 64) and predicts 32 channels."""
    activate()
    from trellis.models.structured_latent_flow import SLatFlowModel

    t = TINY
    kw = dict(_COMMON, resolution=t["slat_resolution"], in_channels=2 * t["slat_channels"],
              out_channels=t["slat_channels"], model_channels=64, num_heads=4, cond_channels=t["cond_channels"])
    kw.update(overrides)
    return _seeded_build(seed, lambda: SLatFlowModel(**kw))


# --------------------------------------------------------------------------- inputs


def make_sampler(kind: str = "interval", sigma_min: float = PIPELINE_DEFAULTS["sigma_min"]):
    """``"plain"`` / ``"cfg"`` / ``"interval"`` (the one the published pipeline uses at all three sites)."""
    activate()
    from trellis.pipelines import samplers

    cls = {"plain": samplers.FlowEulerSampler, "cfg": samplers.FlowEulerCfgSampler,
           "interval": samplers.FlowEulerGuidanceIntervalSampler}[kind]
    return cls(sigma_min=sigma_min)


def make_cond(batch: int = 1, seed: int = 0, tokens: int = TINY["cond_tokens"], channels: int = TINY["cond_channels"]):
    """``{"cond": [B, tokens, C], "neg_cond": zeros}`` (``get_cond`` layout).  Unlike v1, TRELLIS.2's
    ``_inference_model`` does not broadcast a batch-1 cond: give one row per sample."""
    g = torch.Generator().manual_seed(20_000 + seed)
    cond = torch.randn(batch, tokens, channels, generator=g)
    return {"cond": cond, "neg_cond": torch.zeros_like(cond)}


def make_ss_noise(batch: int = 1, seed: int = 0):
    t = TINY
    g = torch.Generator().manual_seed(30_000 + seed)
    return torch.randn(batch, t["ss_channels"], t["resolution"], t["resolution"], t["resolution"], generator=g)


def make_coords(batch: int = 1, seed: int = 0, occupancy: float = 0.02, resolution: int = TINY["slat_resolution"]):
    """Random occupied voxels ``[N, 4]`` int32 ``(batch, x, y, z)``, batch-contiguous."""
    g = torch.Generator().manual_seed(40_000 + seed)
    parts = []
    for b in range(batch):
        occ = torch.rand(resolution, resolution, resolution, generator=g) < occupancy
        xyz = torch.nonzero(occ).int()
        parts.append(torch.cat([torch.full((xyz.shape[0], 1), b, dtype=torch.int32), xyz], dim=1))
    return torch.cat(parts, dim=0)


def make_slat_noise(coords=None, batch: int = 1, seed: int = 0, channels: int = TINY["slat_channels"]):
    """``SparseTensor(feats=randn [N, channels], coords)`` (what ``sample_shape_slat`` builds)."""
    activate()
    from trellis.modules.sparse import SparseTensor

    if coords is None:
        coords = make_coords(batch, seed)
    g = torch.Generator().manual_seed(50_000 + seed)
    return SparseTensor(feats=torch.randn(coords.shape[0], channels, generator=g), coords=coords)


def make_tex_noise(shape_slat, seed: int = 0, channels: int = TINY["slat_channels"]):
    """``shape_slat.replace(feats=randn [N, channels])`` (what ``sample_tex_slat`` builds)."""
    g = torch.Generator().manual_seed(60_000 + seed)
    return shape_slat.replace(feats=torch.randn(shape_slat.coords.shape[0], channels, generator=g))


# --------------------------------------------------------------------------- sampling


def t_pairs(steps: int, rescale_t: float):
    """``(t, t_prev)`` pairs of ``FlowEulerSampler.sample`` (t = 1 is noise; Python floats)."""
    t_seq = np.linspace(1, 0, steps + 1)
    t_seq = (rescale_t * t_seq / (1 + (rescale_t - 1) * t_seq)).tolist()
    return [(t_seq[i], t_seq[i + 1]) for i in range(steps)]


def _forwards_at(guidance_strength: float) -> int:
    return 1 if guidance_strength in (0, 1) else 2


def expected_calls(kind: str, steps: int, rescale_t: float, guidance_strength: float = 7.5,
                   guidance_interval=(0.0, 1.0)) -> int:
    """Network forwards in one ``sample`` call.  The CFG mixin short-circuits
    ``guidance_strength`` 1 (cond only) and 0 (neg only) to one forward; outside the
    interval the interval mixin passes ``guidance_strength=1``."""
    if kind == "plain":
        return steps
    if kind == "cfg":
        return steps * _forwards_at(guidance_strength)
    lo, hi = guidance_interval
    return sum(_forwards_at(guidance_strength) if lo <= t <= hi else 1 for t, _ in t_pairs(steps, rescale_t))


def _kwargs(sampler, cond: dict, stage: str, steps, overrides: dict) -> dict:
    from trellis.pipelines import samplers

    d = dict(PIPELINE_DEFAULTS[stage])
    d.update({k: v for k, v in overrides.items() if v is not None})
    kw = {"steps": steps if steps is not None else d["steps"], "rescale_t": d["rescale_t"], "verbose": False,
          "cond": cond["cond"]}
    if isinstance(sampler, (samplers.FlowEulerCfgSampler, samplers.FlowEulerGuidanceIntervalSampler)):
        kw["neg_cond"] = cond["neg_cond"]
        kw["guidance_strength"] = d["guidance_strength"]
        kw["guidance_rescale"] = d["guidance_rescale"]
    if isinstance(sampler, samplers.FlowEulerGuidanceIntervalSampler):
        kw["guidance_interval"] = tuple(d["guidance_interval"])
    return kw


def sample_ss(sampler, model, batch: int = 1, steps: int = 12, *, seed: int = 0, noise=None, cond=None,
              rescale_t=None, guidance_strength=None, guidance_rescale=None, guidance_interval=None, **extra):
    """One real ``sampler.sample(model, noise [B, 8, 16, 16, 16], cond=, neg_cond=, guidance_strength=,
    guidance_rescale=, guidance_interval=, steps=, rescale_t=)``; defaults = published SS settings."""
    if noise is None:
        noise = make_ss_noise(batch, seed)
    if cond is None:
        cond = make_cond(noise.shape[0], seed)
    kw = _kwargs(sampler, cond, "ss", steps, dict(rescale_t=rescale_t, guidance_strength=guidance_strength,
                                                  guidance_rescale=guidance_rescale,
                                                  guidance_interval=guidance_interval))
    kw.update(extra)
    return sampler.sample(model, noise, **kw)


def sample_shape(sampler, model, batch: int = 1, steps: int = 12, *, seed: int = 0, noise=None, coords=None,
                 cond=None, rescale_t=None, guidance_strength=None, guidance_rescale=None, guidance_interval=None,
                 **extra):
    """Shape-SLat stage: noise ``SparseTensor`` feats ``[N, 32]``; defaults = published shape settings."""
    if noise is None:
        noise = make_slat_noise(coords, batch=batch, seed=seed)
    if cond is None:
        cond = make_cond(noise.shape[0], seed)
    kw = _kwargs(sampler, cond, "shape", steps, dict(rescale_t=rescale_t, guidance_strength=guidance_strength,
                                                     guidance_rescale=guidance_rescale,
                                                     guidance_interval=guidance_interval))
    kw.update(extra)
    return sampler.sample(model, noise, **kw)


def sample_tex(sampler, model, shape_slat, steps: int = 12, *, seed: int = 0, noise=None, cond=None,
               rescale_t=None, guidance_strength=None, guidance_rescale=None, guidance_interval=None, **extra):
    """Texture-SLat stage: ``sampler.sample(model, noise, concat_cond=shape_slat, cond=..., ...)``;
    defaults = published texture settings (guidance_strength 1 -> one forward per step)."""
    if noise is None:
        noise = make_tex_noise(shape_slat, seed)
    if cond is None:
        cond = make_cond(noise.shape[0], seed)
    kw = _kwargs(sampler, cond, "tex", steps, dict(rescale_t=rescale_t, guidance_strength=guidance_strength,
                                                   guidance_rescale=guidance_rescale,
                                                   guidance_interval=guidance_interval))
    kw["concat_cond"] = shape_slat
    kw.update(extra)
    return sampler.sample(model, noise, **kw)
