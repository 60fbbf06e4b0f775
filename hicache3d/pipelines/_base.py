"""What every upstream pipeline wrapper shares: the interface, layout checks, imports
with clear errors, capturing each site's final latent, and the decoder stop."""
from __future__ import annotations

import contextlib
import importlib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional

from ..generate import GenerateError

__all__ = ["LayoutError", "StageOutput", "UpstreamPipeline", "DecoderUnavailable", "DecoderModels",
           "missing_module_error", "CUDA_ONLY",
           "import_upstream", "read_pipeline_json", "check_files", "capture_final", "to_trimesh",
           "spconv_cpu_eval"]

# packages that ship CUDA kernels only: a missing one is named as such in errors
CUDA_ONLY = {
    "cumesh": "CuMesh (CUDA mesh ops)",
    "flex_gemm": "FlexGEMM (CUDA sparse convolution / grid sampling)",
    "o_voxel": "O-Voxel (CUDA voxel ops)",
    "nvdiffrast": "nvdiffrast (CUDA rasteriser)",
    "kaolin": "Kaolin (CUDA 3D ops)",
    "diff_gaussian_rasterization": "diff-gaussian-rasterization (CUDA)",
    "flash_attn": "flash-attn (CUDA attention)",
    "xformers": "xformers (CUDA attention)",
    "pytorch3d": "PyTorch3D (CUDA renderer ops)",
}


class LayoutError(GenerateError):
    """A weights folder does not have the layout the upstream loader reads."""


class DecoderUnavailable(Exception):
    """Raised inside a run where a decoder cannot run here; the run keeps its latents and
    reports ``reason`` instead of a mesh."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecoderModels(dict):
    """The pipeline's ``models`` table where decoders that cannot run here were left out:
    looking one of them up (wherever the upstream run does it: mid-run for a cascade's
    upsampler, at the end for the mesh decoder) raises :class:`DecoderUnavailable` with
    the reason recorded for it."""

    def __init__(self, *args, unavailable: Optional[Mapping[str, str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unavailable = dict(unavailable or {})

    def __missing__(self, key):
        if key in self.unavailable:
            raise DecoderUnavailable(self.unavailable[key])
        raise KeyError(key)


def missing_module_error(e: ModuleNotFoundError, label: str, where: str) -> GenerateError:
    """A module the upstream imports lazily (inside a run) is missing: one clear line."""
    missing = (e.name or "").split(".")[0]
    what = f" ({CUDA_ONLY[missing]}, CUDA only)" if missing in CUDA_ONLY else ""
    return GenerateError(f"{label}: {where} needs the module {missing!r}{what}, which is not installed here")


@dataclass
class StageOutput:
    """What one run of an upstream pipeline produced: the mesh (or ``None`` and the one-line
    ``reason``) and ``latents``: the final latent of every site's sampler, in site order."""

    mesh: Any
    latents: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None


class UpstreamPipeline:
    """One loaded upstream pipeline (subclasses per family).

    ``pipeline``: the upstream object; ``target``: what :func:`hicache3d.accelerate` is handed
    (the pipeline itself unless a family says otherwise);
    ``networks``: the flow networks (every real forward of a sampler goes through one);
    ``sites``: the recipe sites in the order a run reaches them."""

    label = "upstream"
    pipeline: Any
    networks: List[Any]
    sites: List[str]

    @classmethod
    def load(cls, recipe, folder: Path, device: str) -> "UpstreamPipeline":  # pragma: no cover
        raise NotImplementedError

    def prepare(self, image) -> Any:  # pragma: no cover - per family
        """The pipeline's input from a PIL image (the upstream's own preprocessing)."""
        raise NotImplementedError

    def run(self, payload, *, steps: Optional[int] = None, seed: int = 0) -> StageOutput:  # pragma: no cover
        raise NotImplementedError

    @property
    def target(self) -> Any:
        """The object :func:`hicache3d.accelerate` is handed (the pipeline, by default)."""
        return self.pipeline


def import_upstream(name: str, label: str, package: str) -> types.ModuleType:
    """Import an upstream module; a failure is one clear line naming what is missing (and
    whether it is a CUDA-only package)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing in CUDA_ONLY:
            raise GenerateError(f"{label}: {name} imports {missing} ({CUDA_ONLY[missing]}), which needs "
                                f"a CUDA machine with it installed; it is not importable here") from None
        if missing == name.split(".")[0]:
            raise GenerateError(f"{label}: {name} is not importable; install {package} first") from None
        raise GenerateError(f"{label}: {name} needs the module {e.name!r}, which is not installed "
                            f"(install {package}'s requirements)") from None
    except ImportError as e:
        raise GenerateError(f"{label}: importing {name} failed ({e})") from None


def read_pipeline_json(folder: Path, label: str, config: str = "pipeline.json") -> Dict[str, Any]:
    """``args`` of ``folder/pipeline.json`` (the TRELLIS layout), checked."""
    p = folder / config
    if not p.is_file():
        found = ", ".join(sorted(q.name for q in folder.iterdir())[:8]) or "nothing"
        raise LayoutError(f"{label}: {folder} has no {config} (found: {found}); the weights folder is "
                          f"the model repo's snapshot: {config} plus ckpts/*.json and ckpts/*.safetensors")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LayoutError(f"{label}: {p} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("args"), dict) \
            or not isinstance(data["args"].get("models"), dict):
        raise LayoutError(f"{label}: {p} has no args.models table (not a pipeline.json of this model)")
    return data


def check_files(folder: Path, models: Mapping[str, str], needed: Iterable[str], label: str,
                config: str = "pipeline.json") -> Dict[str, Path]:
    """``{name: folder/<path>}`` for every needed model, each of which must have its
    ``<path>.json`` and ``<path>.safetensors``; the error lists everything missing."""
    out, missing = {}, []
    for name in needed:
        if name not in models:
            missing.append(f"{name} (not listed in {config})")
            continue
        base = folder / str(models[name])
        for suffix in (".json", ".safetensors"):
            if not base.with_name(base.name + suffix).is_file():
                missing.append(f"{models[name]}{suffix}")
        out[name] = base
    if missing:
        raise LayoutError(f"{label}: {folder} lacks {', '.join(missing)}")
    return out


@contextlib.contextmanager
def capture_final(samplers: Mapping[str, Any], store: Dict[str, Any], method: str = "sample",
                  final: Callable[[Any], Any] = lambda out: out.samples) -> Iterator[None]:
    """While open, every call of ``sampler.<method>`` records ``final(result)`` as
    ``store[site]`` (the last call wins: a cascade's second run).  The call goes through
    the object's class at call time, so a patch applied by ``accelerate`` is seen."""
    installed = []
    for site, obj in samplers.items():
        def wrapper(*args, _obj=obj, _site=site, **kwargs):
            out = getattr(type(_obj), method)(_obj, *args, **kwargs)
            store[_site] = final(out)
            return out
        obj.__dict__[method] = wrapper
        installed.append(obj)
    try:
        yield
    finally:
        for obj in installed:
            obj.__dict__.pop(method, None)


def to_trimesh(vertices, faces):
    """A ``trimesh.Trimesh`` from vertex / face tensors (or arrays); ``None`` if empty."""
    import numpy as np
    import trimesh
    v = vertices.detach().float().cpu().numpy() if hasattr(vertices, "detach") else np.asarray(vertices)
    f = faces.detach().cpu().numpy() if hasattr(faces, "detach") else np.asarray(faces)
    if v.size == 0 or f.size == 0:
        return None
    return trimesh.Trimesh(vertices=v, faces=f.astype(np.int64), process=False)


def spconv_cpu_eval(module) -> int:
    """spconv's CPU kernels reject the fused bias its convolutions use in eval mode; in
    train mode the same bias is added as a separate op (the convolutions have no dropout
    or batch statistics, so the result is the same).  Pins every spconv convolution of
    ``module`` to train mode; returns how many.  Only for CPU runs."""
    try:
        import spconv.pytorch as spc
    except Exception:
        return 0
    n = 0

    def _train(self, mode=True):
        self.training = True
        return self

    for m in module.modules():
        if isinstance(m, spc.conv.SparseConvolution):
            m.training = True
            m.train = types.MethodType(_train, m)
            n += 1
    return n
