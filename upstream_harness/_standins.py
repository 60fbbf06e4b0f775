"""Small stand-ins that let upstream sampler code import and run on a CPU-only torch.

Every object here is our own minimal code.  Each one replaces something that the
upstream *sampling* path never uses for real, but that sits on an import path (or a
dispatch branch) we cannot avoid.  Nothing here changes the numerics of the samplers
or the networks under test, except the flash-attention stand-in, which computes the
same attention with ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from pathlib import Path

import torch

_TORCHVISION_LIB = None


def register_torchvision_op_schemas() -> None:
    """Declare the ``torchvision::nms`` / ``torchvision::qnms`` operator schemas.

    Replaces: the C++ operator registrations of torchvision's ``_C`` extension.
    Why: PyPI's Linux torchvision wheels are CUDA builds; on a CPU-only torch their
    ``_C`` library fails to load, and ``torchvision/_meta_registrations.py`` then
    dies at import with ``operator torchvision::nms does not exist`` while
    registering fake kernels for those two ops.  Declaring the schemas (no kernel)
    lets ``import torchvision`` succeed; nothing in the samplers calls nms.
    Idempotent, and a no-op when a working torchvision already defined them.
    """
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None:
        return
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # a real torchvision build already registered the ops
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB = lib  # keep the library object alive: it owns the registrations


def install_pymeshlab_stub() -> None:
    """Put a ``pymeshlab`` placeholder module into ``sys.modules``.

    Replaces: PyMeshLab (a large binary wheel with Qt dependencies).
    Why: ``hy3dgen.shapegen.postprocessors`` imports it at module level and uses
    ``pymeshlab.MeshSet`` in annotations, and ``hy3dgen.shapegen`` imports the
    postprocessors eagerly.  The mesh clean-up helpers (FloaterRemover, FaceReducer,
    ...) are optional post-processing that the pipeline never calls; calling
    ``MeshSet()`` on the stand-in raises.
    """
    if "pymeshlab" in sys.modules:
        return
    mod = types.ModuleType("pymeshlab")
    mod.__doc__ = "Placeholder for PyMeshLab (upstream_harness stand-in; not functional)."

    class MeshSet:  # noqa: D401 - placeholder
        """Placeholder type; PyMeshLab is not available in the test environment."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("pymeshlab is stubbed out in upstream_harness; mesh post-processing is unavailable")

    mod.MeshSet = MeshSet
    mod.Mesh = MeshSet
    mod.__spec__ = importlib.machinery.ModuleSpec("pymeshlab", None)
    sys.modules["pymeshlab"] = mod


def empty_package(name: str, path: Path) -> types.ModuleType:
    """Register an empty package module ``name`` whose ``__path__`` is ``path``.

    Replaces: the package's own ``__init__.py``.
    Why: some upstream packages import their whole world in ``__init__`` (renderers,
    CUDA rasterisers, decoders).  Registering the package object with the right
    ``__path__`` lets ``import pkg.sub.module`` find the real submodules on disk
    while skipping that ``__init__``.
    """
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__file__ = None
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    mod.__spec__ = spec
    mod.__package__ = name
    sys.modules[name] = mod
    if "." in name:
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, mod)
    return mod


# --------------------------------------------------------------------------- flash_attn


def _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False):
    """Attention over packed variable-length sequences, one SDPA call per segment.

    ``q``: [Tq, H, D], ``k``/``v``: [Tk, H, D] (rows of all sequences stacked);
    ``cu_seqlens_*``: int32 prefix sums of the per-sequence lengths (length B+1).
    """
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    for i in range(len(cq) - 1):
        qs = q[cq[i]:cq[i + 1]].transpose(0, 1)  # [H, Lq, D]
        ks = k[ck[i]:ck[i + 1]].transpose(0, 1)
        vs = v[ck[i]:ck[i + 1]].transpose(0, 1)
        if ks.shape[0] != qs.shape[0]:  # grouped-query attention
            rep = qs.shape[0] // ks.shape[0]
            ks = ks.repeat_interleave(rep, dim=0)
            vs = vs.repeat_interleave(rep, dim=0)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
        out[cq[i]:cq[i + 1]] = o.transpose(0, 1)
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    return _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    k, v = kv.unbind(dim=1)  # kv: [Tk, 2, H, D]
    return _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen=None, dropout_p=0.0, softmax_scale=None,
                                     causal=False, **kwargs):
    q, k, v = qkv.unbind(dim=1)  # qkv: [T, 3, H, D]
    return _varlen_sdpa(q, k, v, cu_seqlens, cu_seqlens, softmax_scale, causal)


def _dense(q, k, v, softmax_scale=None, causal=False):
    # flash_attn dense layout is [B, L, H, D]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale)
    return o.transpose(1, 2)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    return _dense(q, k, v, softmax_scale, causal)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    k, v = kv.unbind(dim=2)  # kv: [B, L, 2, H, D]
    return _dense(q, k, v, softmax_scale, causal)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    q, k, v = qkv.unbind(dim=2)  # qkv: [B, L, 3, H, D]
    return _dense(q, k, v, softmax_scale, causal)


def make_flash_attn_module() -> types.ModuleType:
    """Build a ``flash_attn`` module whose functions run on CPU.

    Replaces: the ``flash-attn`` CUDA extension.
    Why: the TRELLIS sparse transformers dispatch sparse (variable-length) attention
    only to ``xformers`` or ``flash_attn``; neither exists for CPU.  This module
    provides the same call signatures (varlen qkv/kv-packed and unpacked, dense
    variants), computing exact softmax attention segment by segment with
    ``scaled_dot_product_attention``.  Dropout is ignored (inference only).
    """
    mod = types.ModuleType("flash_attn")
    mod.__doc__ = "CPU stand-in for flash_attn (upstream_harness): per-segment scaled_dot_product_attention."
    mod.__version__ = "0.0.0+cpu-standin"
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    for fn in (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
               flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func):
        setattr(mod, fn.__name__, fn)
    return mod


@contextlib.contextmanager
def flash_attn_installed():
    """Temporarily expose the ``flash_attn`` stand-in in ``sys.modules``."""
    previous = sys.modules.get("flash_attn")
    sys.modules["flash_attn"] = make_flash_attn_module()
    try:
        yield sys.modules["flash_attn"]
    finally:
        if previous is None:
            sys.modules.pop("flash_attn", None)
        else:
            sys.modules["flash_attn"] = previous


def install_flash_attn() -> types.ModuleType:
    """Permanently expose the ``flash_attn`` stand-in (for code that imports it lazily)."""
    mod = sys.modules.get("flash_attn")
    if mod is None or getattr(mod, "__version__", "") != "0.0.0+cpu-standin":
        mod = make_flash_attn_module()
        sys.modules["flash_attn"] = mod
    return mod
