"""SAM 3D Objects (``sam3d_objects.pipeline.InferencePipeline`` / ``InferencePipelinePointMap``;
vendored by PyPI ``sam3d``, or a source checkout) from its weights folder.

Weights folder (the ``facebook/sam-3d-objects`` snapshot, or the folder ``sam3d``'s
``download_models`` deploys)::

    checkpoints/pipeline.yaml      hydra config: _target_ the inference pipeline, and
                                   <model>_config_path / <model>_ckpt_path relative to it
    checkpoints/ss_generator.yaml + .ckpt, slat_generator.*, ss_decoder.*,
    slat_decoder_mesh.*, slat_decoder_gs.*, ...

(``pipeline.yaml`` is looked for in the folder itself, in ``checkpoints/`` and in
``checkpoints/hf/``.)  Loading is the upstream's own: ``hydra.utils.instantiate`` of that
config with ``workspace_dir`` set to its folder, as ``sam3d``'s ``ObjectsInference`` does.
A run is the pipeline's own ``run(rgba, None, seed, ...)``: condition embedding, the
sparse-structure generator (site ``sparse_structure``), the dense SS decoder, the
structured-latent generator (site ``slat``), ``decode_slat`` (mesh and Gaussian decoders)
and the GLB post-processing (here without mesh clean-up or texture baking); the mesh is
the mesh decoder's own output.

**CUDA only.**  The pipeline's constructor selects and loads onto the GPU
(``torch.cuda.current_device()``, safetensors loaded to ``"cuda"``), and its decoders and
GLB export need CUDA renderers; on a machine without CUDA loading stops, after the
folder's layout was checked, with that message: no sampler can run there.  (The two
generators themselves are pure torch: ``hicache3d patch --model sam3d`` / ``accelerate``
accelerate them wherever they run.)
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..generate import GenerateError
from ._base import LayoutError, StageOutput, UpstreamPipeline, import_upstream, missing_module_error, to_trimesh

CONFIG_NAMES = ("pipeline.yaml", "checkpoints/pipeline.yaml", "checkpoints/hf/pipeline.yaml")
PIPELINES = ("InferencePipeline", "InferencePipelinePointMap")
GENERATORS = {"sparse_structure": "ss_generator", "slat": "slat_generator"}   # site -> models key
REQUIRED = ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_mesh")


def find_config(folder: Path, label: str) -> Path:
    for rel in CONFIG_NAMES:
        if (folder / rel).is_file():
            return folder / rel
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise LayoutError(f"{label}: {folder} has no {' / '.join(CONFIG_NAMES)} (found: {found}); the weights "
                      f"folder is the facebook/sam-3d-objects snapshot")


def check_config(config, path: Path, label: str) -> None:
    """The pipeline class and every referenced config / checkpoint file exist."""
    target = str(config.get("_target_", ""))
    if target.rsplit(".", 1)[-1] not in PIPELINES:
        raise LayoutError(f"{label}: {path} is a config for {target or 'nothing'!r}, not a SAM 3D Objects "
                          f"inference pipeline ({' / '.join(PIPELINES)})")
    base, missing = path.parent, []
    for model in REQUIRED:
        for kind in ("config", "ckpt"):
            key = f"{model}_{kind}_path"
            if not config.get(key):
                missing.append(f"{key} (not set in {path.name})")
    for key in sorted(str(k) for k in config.keys()):
        if key.endswith(("_config_path", "_ckpt_path")) and config.get(key):
            if not (base / str(config.get(key))).is_file():
                missing.append(str(config.get(key)))
    if missing:
        raise LayoutError(f"{label}: {base} lacks {', '.join(missing)}")


class _Generators:
    """What :func:`hicache3d.accelerate` is handed for a SAM 3D pipeline: its two
    generators under the attribute names the ``sam3d`` adapter looks for (the pipeline
    keeps them in its ``models`` table)."""

    def __init__(self, models):
        self.ss_generator = models["ss_generator"]
        self.slat_generator = models["slat_generator"]


class SAM3DPipeline(UpstreamPipeline):
    """SAM 3D Objects from a weights folder; see the module docstring."""

    label = "SAM 3D"
    sites = list(GENERATORS)

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self._generators = _Generators(pipeline.models)
        self.networks = [pipeline.models[k].reverse_fn.backbone for k in GENERATORS.values()]

    @property
    def target(self):
        return self._generators

    @staticmethod
    def _import_objects(package: str, label: str):
        """``sam3d_objects`` importable: a source checkout, or PyPI ``sam3d``'s vendored copy
        (put on ``sys.path`` by its own ``loaders.add_vendored_meta_to_syspath``)."""
        if importlib.util.find_spec("sam3d_objects") is None:
            if importlib.util.find_spec("sam3d") is None:
                raise GenerateError(f"{label}: neither sam3d_objects nor the {package} package is "
                                    f"importable; install {package} first")
            loaders = import_upstream("sam3d.loaders", label, package)
            loaders.add_vendored_meta_to_syspath()

    @classmethod
    def load(cls, recipe, folder: Path, device: str) -> "SAM3DPipeline":
        label = cls.label
        folder = Path(folder)
        path = find_config(folder, label)
        package = recipe.package or "sam3d"
        omegaconf = import_upstream("omegaconf", label, package)
        try:
            config = omegaconf.OmegaConf.load(str(path))
        except Exception as e:
            raise LayoutError(f"{label}: {path} is not a readable YAML config ({type(e).__name__}: {e})") from None
        check_config(config, path, label)
        if not str(device).startswith("cuda"):
            raise GenerateError(
                f"{label}: the inference pipeline ({config.get('_target_')}) loads every model onto CUDA and its "
                f"decoders need CUDA renderers, so it cannot run on {device}; the weights folder {folder} is "
                f"complete: run on a CUDA machine")
        cls._import_objects(package, label)
        hydra_utils = import_upstream("hydra.utils", label, package)
        config.workspace_dir = str(path.parent.resolve())
        config.device = str(device)
        if "compile_model" in config:
            config.compile_model = False
        try:
            with _cuda_device(device):
                pipe = hydra_utils.instantiate(config)
        except ModuleNotFoundError as e:
            raise missing_module_error(e, label, "loading the pipeline") from None
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise GenerateError(f"{label}: loading the pipeline from {path} failed ({type(e).__name__}: {first})") \
                from None
        return cls(pipe)

    def prepare(self, image):
        """The RGBA array the pipeline takes: the object's mask is the alpha channel."""
        import numpy as np
        if image.mode != "RGBA":
            raise GenerateError(f"{self.label} needs an RGBA image whose alpha channel is the object's mask "
                                f"(this one is {image.mode})")
        return np.array(image)

    def run(self, payload, *, steps: Optional[int] = None, seed: int = 0) -> StageOutput:
        latents: Dict[str, Any] = {}
        hooks = []
        for site, key in GENERATORS.items():
            def keep(_m, _inp, out, _site=site):
                latents[_site] = out
            hooks.append(self.pipeline.models[key].register_forward_hook(keep))
        kwargs = dict(stage1_only=False, with_mesh_postprocess=False, with_texture_baking=False,
                      with_layout_postprocess=False, use_vertex_color=True)
        if steps:
            kwargs.update(stage1_inference_steps=int(steps), stage2_inference_steps=int(steps))
        accepted = inspect.signature(self.pipeline.run).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        try:
            out = self.pipeline.run(payload, None, seed, **kwargs)
        except ModuleNotFoundError as e:
            raise missing_module_error(e, self.label, "the run") from None
        finally:
            for h in hooks:
                h.remove()
        meshes: List[Any] = out.get("mesh") or []
        if not meshes:
            return StageOutput(None, latents, f"{self.label}'s pipeline returned no mesh")
        tm = to_trimesh(meshes[0].vertices, meshes[0].faces)
        return StageOutput(tm, latents, None if tm is not None else f"{self.label}'s mesh decoder produced no surface")


def _cuda_device(device: str):
    """Make ``device`` the current CUDA device while the pipeline loads (its constructor
    loads onto the current device)."""
    import torch
    return torch.cuda.device(torch.device(device))
