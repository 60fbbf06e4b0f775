"""Run the real TRELLIS v1 flow samplers (PyPI ``trellis-3d-ms==0.1.0``) on CPU with tiny models.

Real upstream code exercised: ``trellis.pipelines.samplers.flow_euler``
(``FlowEulerSampler``, ``FlowEulerCfgSampler``, ``FlowEulerGuidanceIntervalSampler`` and
their CFG mixins), ``trellis.models.SparseStructureFlowModel`` / ``SLatFlowModel`` with
all their transformer / sparse modules, and ``trellis.modules.sparse.SparseTensor`` on
the ``spconv`` CPU backend.

Stand-ins (see ``_standins``): empty package modules for ``trellis`` and
``trellis.pipelines`` (their ``__init__`` imports renderers needing CUDA packages), and
a CPU ``flash_attn`` (sparse attention only dispatches to xformers / flash_attn).

TRELLIS v1 and TRELLIS.2 are both importable as ``trellis``: ``activate()`` refuses to
run in a process where the other one is already imported.

Tiny sizes (real TRELLIS-image-large in brackets): SS flow resolution 16 [16], 8
channels [8], width 64 [1024], 1 block [24], 4 heads [16], patch 2 [1] (512 tokens
[4096]); SLat flow width 64 [1024], 1 block [24], io block channels [32] [[128]],
patch 2 [2], 8 feature channels [8]; condition 16 tokens x 32 [1374 x 1024].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import _standins
from ._common import (count_calls, keep_spconv_in_train_mode, prepare_trellis_package,
                      rerandomize_zero_params)

__all__ = [
    "activate", "build_ss_flow", "build_slat_flow", "make_sampler", "make_cond", "make_ss_noise",
    "make_coords", "make_slat_noise", "sample_ss", "sample_slat", "t_pairs", "expected_calls",
    "count_calls", "TINY", "PIPELINE_DEFAULTS",
]

TINY = {
    "resolution": 16,
    "channels": 8,
    "model_channels": 64,
    "cond_channels": 32,
    "cond_tokens": 16,
    "num_heads": 4,
}

# Sampler settings of the published TRELLIS-image-large pipeline.json.
PIPELINE_DEFAULTS = {
    "ss": {"steps": 25, "cfg_strength": 7.5, "cfg_interval": (0.5, 0.95), "rescale_t": 3.0},
    "slat": {"steps": 25, "cfg_strength": 3.0, "cfg_interval": (0.5, 0.95), "rescale_t": 3.0},
    "sigma_min": 1e-5,
}

ENV = {
    "ATTN_BACKEND": "sdpa",  # dense attention: torch SDPA
    "SPARSE_BACKEND": "spconv",  # SparseTensor container + sparse convolutions
    "SPARSE_ATTN_BACKEND": "flash_attn",  # the only choice besides xformers (stand-in)
    "SPCONV_ALGO": "native",  # the only spconv algorithm with a CPU implementation
}

_ACTIVE = None


def activate() -> Path:
    """Install (once) and import the TRELLIS v1 samplers/models; returns the install folder."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    target = prepare_trellis_package("trellis", "TRELLIS v1", ENV)
    # The sparse attention modules bind ``flash_attn`` at import time; the stand-in is only
    # needed while they are imported (transformers, for one, probes sys.modules for it).
    with _standins.flash_attn_installed():
        import trellis.pipelines.samplers  # noqa: F401
        import trellis.models.sparse_structure_flow  # noqa: F401
        import trellis.models.structured_latent_flow  # noqa: F401
        import trellis.modules.sparse.attention  # noqa: F401
        from trellis.modules import sparse as sp

        sp.SparseTensor  # noqa: B018  (resolve the lazy attribute now)
    _ACTIVE = target
    return target


# --------------------------------------------------------------------------- models


def _seeded_build(seed: int, ctor):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
    rerandomize_zero_params(model, torch.Generator().manual_seed(10_000 + seed))
    return model.eval()


def build_ss_flow(seed: int = 0, **overrides):
    """Tiny ``trellis.models.sparse_structure_flow.SparseStructureFlowModel`` (eval mode).

    ``forward(x [B, 8, 16, 16, 16], t [B] (= 1000 t), cond [B, 16, 32]) -> [B, 8, 16, 16, 16]``.
    """
    activate()
    from trellis.models.sparse_structure_flow import SparseStructureFlowModel

    t = TINY
    kw = dict(resolution=t["resolution"], in_channels=t["channels"], model_channels=t["model_channels"],
              cond_channels=t["cond_channels"], out_channels=t["channels"], num_blocks=1,
              num_heads=t["num_heads"], mlp_ratio=2, patch_size=2, pe_mode="ape", qk_rms_norm=True)
    kw.update(overrides)
    return _seeded_build(seed, lambda: SparseStructureFlowModel(**kw))


def build_slat_flow(seed: int = 0, **overrides):
    """Tiny ``trellis.models.structured_latent_flow.SLatFlowModel`` (eval mode, spconv convs pinned to train).

    ``forward(x: SparseTensor feats [N, 8] coords [N, 4], t [B], cond [B, 16, 32]) -> SparseTensor [N, 8]``.
    Keeps the real architecture's shape: a sparse res-block + 2x down-sampling input stage
    (``io_block_channels=[32]``, ``patch_size=2``), transformer blocks, skip + up-sampling.
    """
    activate()
    from trellis.models.structured_latent_flow import SLatFlowModel

    t = TINY
    kw = dict(resolution=t["resolution"], in_channels=t["channels"], model_channels=t["model_channels"],
              cond_channels=t["cond_channels"], out_channels=t["channels"], num_blocks=1,
              num_heads=t["num_heads"], mlp_ratio=2, patch_size=2, num_io_res_blocks=1,
              io_block_channels=[32], pe_mode="ape", qk_rms_norm=True)
    kw.update(overrides)
    model = _seeded_build(seed, lambda: SLatFlowModel(**kw))
    keep_spconv_in_train_mode(model)
    return model


# --------------------------------------------------------------------------- samplers


def make_sampler(kind: str = "interval", sigma_min: float = PIPELINE_DEFAULTS["sigma_min"]):
    """``kind``: ``"plain"`` -> FlowEulerSampler, ``"cfg"`` -> FlowEulerCfgSampler,
    ``"interval"`` -> FlowEulerGuidanceIntervalSampler (what the published pipelines use)."""
    activate()
    from trellis.pipelines import samplers

    cls = {"plain": samplers.FlowEulerSampler, "cfg": samplers.FlowEulerCfgSampler,
           "interval": samplers.FlowEulerGuidanceIntervalSampler}[kind]
    return cls(sigma_min=sigma_min)


def make_cond(batch: int = 1, seed: int = 0, tokens: int = TINY["cond_tokens"], channels: int = TINY["cond_channels"]):
    """``{"cond": [B, tokens, C] random, "neg_cond": zeros like it}`` (the pipeline's ``get_cond`` layout)."""
    g = torch.Generator().manual_seed(20_000 + seed)
    cond = torch.randn(batch, tokens, channels, generator=g)
    return {"cond": cond, "neg_cond": torch.zeros_like(cond)}


def make_ss_noise(batch: int = 1, seed: int = 0):
    t = TINY
    g = torch.Generator().manual_seed(30_000 + seed)
    return torch.randn(batch, t["channels"], t["resolution"], t["resolution"], t["resolution"], generator=g)


def make_coords(batch: int = 1, seed: int = 0, occupancy: float = 0.08, resolution: int = TINY["resolution"]):
    """Random occupied voxels ``[N, 4]`` int32 ``(batch, x, y, z)``, batch-contiguous (like
    ``argwhere(decoder(z_s) > 0)`` in the pipeline)."""
    g = torch.Generator().manual_seed(40_000 + seed)
    parts = []
    for b in range(batch):
        occ = torch.rand(resolution, resolution, resolution, generator=g) < occupancy
        xyz = torch.nonzero(occ).int()
        parts.append(torch.cat([torch.full((xyz.shape[0], 1), b, dtype=torch.int32), xyz], dim=1))
    return torch.cat(parts, dim=0)


def make_slat_noise(coords=None, batch: int = 1, seed: int = 0, channels: int = TINY["channels"]):
    """``SparseTensor(feats=randn [N, channels], coords=coords)`` (as ``sample_slat`` builds its noise)."""
    activate()
    from trellis.modules import sparse as sp

    if coords is None:
        coords = make_coords(batch, seed)
    g = torch.Generator().manual_seed(50_000 + seed)
    return sp.SparseTensor(feats=torch.randn(coords.shape[0], channels, generator=g), coords=coords)


def t_pairs(steps: int, rescale_t: float):
    """The ``(t, t_prev)`` pairs ``FlowEulerSampler.sample`` iterates over (t = 1 is noise)."""
    t_seq = np.linspace(1, 0, steps + 1)
    t_seq = rescale_t * t_seq / (1 + (rescale_t - 1) * t_seq)
    return [(float(t_seq[i]), float(t_seq[i + 1])) for i in range(steps)]


def expected_calls(kind: str, steps: int, rescale_t: float = 3.0, cfg_interval=(0.5, 0.95)) -> int:
    """Network forwards one ``sample`` call makes: plain 1/step, cfg 2/step, interval 2 inside the interval."""
    if kind == "plain":
        return steps
    if kind == "cfg":
        return 2 * steps
    lo, hi = cfg_interval
    return sum(2 if lo <= t <= hi else 1 for t, _ in t_pairs(steps, rescale_t))


def _sampler_kwargs(sampler, cond: dict, stage: str, steps: int, rescale_t, cfg_strength, cfg_interval) -> dict:
    from trellis.pipelines import samplers

    d = PIPELINE_DEFAULTS[stage]
    kw = {"steps": steps, "rescale_t": d["rescale_t"] if rescale_t is None else rescale_t, "verbose": False}
    kw["cond"] = cond["cond"]
    if isinstance(sampler, (samplers.FlowEulerCfgSampler, samplers.FlowEulerGuidanceIntervalSampler)):
        kw["neg_cond"] = cond["neg_cond"]
        kw["cfg_strength"] = d["cfg_strength"] if cfg_strength is None else cfg_strength
    if isinstance(sampler, samplers.FlowEulerGuidanceIntervalSampler):
        kw["cfg_interval"] = tuple(d["cfg_interval"] if cfg_interval is None else cfg_interval)
    return kw


def sample_ss(sampler, model, batch: int = 1, steps: int = 12, *, seed: int = 0, noise=None, cond=None,
              rescale_t=None, cfg_strength=None, cfg_interval=None, **extra):
    """One real ``sampler.sample(model, noise, cond=..., [neg_cond, cfg_strength, cfg_interval], steps, rescale_t)``
    for the sparse-structure stage.  Defaults: the published pipeline settings (rescale_t 3,
    cfg 7.5 on [0.5, 0.95]).  Returns the sampler's ``edict(samples, pred_x_t, pred_x_0)``;
    ``samples`` is ``[B, 8, 16, 16, 16]``."""
    if noise is None:
        noise = make_ss_noise(batch, seed)
    if cond is None:
        cond = make_cond(batch, seed)
    kw = _sampler_kwargs(sampler, cond, "ss", steps, rescale_t, cfg_strength, cfg_interval)
    kw.update(extra)
    return sampler.sample(model, noise, **kw)


def sample_slat(sampler, model, batch: int = 1, steps: int = 12, *, seed: int = 0, noise=None, coords=None,
                cond=None, rescale_t=None, cfg_strength=None, cfg_interval=None, **extra):
    """Same for the structured-latent stage: noise is a ``SparseTensor`` over ``coords``.
    Returns the sampler's edict; ``samples`` is a ``SparseTensor`` with ``feats [N, 8]``."""
    if noise is None:
        noise = make_slat_noise(coords, batch=batch, seed=seed)
    if cond is None:
        cond = make_cond(batch, seed)
    kw = _sampler_kwargs(sampler, cond, "slat", steps, rescale_t, cfg_strength, cfg_interval)
    kw.update(extra)
    return sampler.sample(model, noise, **kw)
