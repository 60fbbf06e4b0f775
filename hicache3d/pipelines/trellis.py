"""TRELLIS v1 image-to-3D (``trellis.pipelines.TrellisImageTo3DPipeline``, PyPI
``trellis-3d-ms``) from its weights folder.

Weights folder (the ``microsoft/TRELLIS-image-large`` snapshot)::

    pipeline.json        {"name": "TrellisImageTo3DPipeline", "args": {"models": {...},
                          "sparse_structure_sampler": {...}, "slat_sampler": {...},
                          "slat_normalization": {...}, "image_cond_model": "dinov2_vitl14_reg"}}
    ckpts/<model>.json + ckpts/<model>.safetensors   for each model the run needs

A run is the pipeline's own ``run(image, seed, ..., formats=["mesh"])``: DINOv2 condition
(``torch.hub``), the sparse-structure flow (site ``sparse_structure``), the dense
sparse-structure decoder (runs on CPU), the structured-latent flow (site ``slat``), then
``decode_slat``: the mesh decoder ``slat_decoder_mesh`` (FlexiCubes surface extraction,
built for CUDA).  Only the models a mesh needs are loaded (not the Gaussian / radiance
field decoders).  On CPU the mesh decoder is not loaded, and a run stops where
``decode_slat`` looks it up, with ``mesh=None`` and a reason saying so, after both samplers
ran: the latents of both sites are there.

:class:`TrellisFamilyPipeline` holds what TRELLIS.2 (``trellis2.py``) shares with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from ..generate import GenerateError
from ._base import (DecoderModels, DecoderUnavailable, LayoutError, StageOutput, UpstreamPipeline, capture_final,
                    check_files, import_upstream, missing_module_error, read_pipeline_json, spconv_cpu_eval,
                    to_trimesh)



def load_model(models_mod, base: Path, name: str, label: str):
    """``<package>.models.from_pretrained`` on a checked local path; errors name the file."""
    try:
        return models_mod.from_pretrained(str(base))
    except GenerateError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LayoutError(f"{label}: cannot load {name} from {base}.json/.safetensors "
                          f"({type(e).__name__}: {first})") from None


def make_sampler(samplers_mod, spec: Any, key: str, label: str):
    try:
        return getattr(samplers_mod, spec["name"])(**spec.get("args", {}))
    except Exception as e:
        raise LayoutError(f"{label}: pipeline.json {key} is not a sampler of this package "
                          f"({type(e).__name__}: {e})") from None


class TrellisFamilyPipeline(UpstreamPipeline):
    """What TRELLIS v1 and TRELLIS.2 share: the ``pipeline.json`` + ``ckpts/`` layout, the
    selective loading (decoders that cannot run here are left out and stop the run where
    the upstream code first needs them), and the run through the pipeline's own ``run``.
    Subclasses name the class, the models, the samplers and the decoders."""

    label = "TRELLIS"
    package = "trellis"                 # top-level import name
    cls_name = ""
    required_args: tuple = ()
    samplers: Dict[str, str] = {}        # site -> pipeline attribute
    cuda_decoders: Dict[str, str] = {}   # model name -> what it is (needs CUDA)

    def __init__(self, pipeline, networks):
        self.pipeline = pipeline
        self.networks = list(networks)
        self.sites = list(self.samplers)

    # ---------------------------------------------------------------- per family
    @classmethod
    def needed(cls, args: Dict[str, Any]) -> List[str]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def flows(cls, needed: List[str]) -> List[str]:
        return [n for n in needed if "flow_model" in n]

    @classmethod
    def construct(cls, mod, samplers_mod, args, models, label):  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def top_package(cls) -> str:
        return cls.package

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, recipe, folder: Path, device: str):
        label = cls.label
        folder = Path(folder)
        data = read_pipeline_json(folder, label)
        if data.get("name", cls.cls_name) != cls.cls_name:
            raise LayoutError(f"{label}: {folder}/pipeline.json is for {data.get('name')}, not {cls.cls_name} "
                              f"(is this the weights folder of another model?)")
        args = data["args"]
        for key in cls.required_args:
            if key not in args:
                raise LayoutError(f"{label}: {folder}/pipeline.json has no args.{key}")
        needed = cls.needed(args)
        paths = check_files(folder, args["models"], needed, label)
        top, dist = cls.top_package(), recipe.package or cls.package
        mod = import_upstream(cls.module_of(top), label, dist)
        if not hasattr(mod, cls.cls_name):
            raise GenerateError(f"{label}: the installed {top} package has no {cls.cls_name} "
                                f"(another TRELLIS generation? see `hicache3d recipes`)")
        samplers_mod = import_upstream(f"{top}.pipelines.samplers", label, dist)
        models_mod = import_upstream(f"{top}.models", label, dist)
        cuda = str(device).startswith("cuda")
        models = DecoderModels()
        for name in needed:
            if name in cls.cuda_decoders and not cuda:
                models.unavailable[name] = (f"{label}'s {name} ({cls.cuda_decoders[name]}) needs CUDA, "
                                            f"and this run is on {device}")
                continue
            try:
                models[name] = load_model(models_mod, paths[name], name, label)
            except LayoutError as e:
                if name not in cls.cuda_decoders:
                    raise
                models.unavailable[name] = f"{label}'s {name} cannot be loaded here: {str(e).split(': ', 1)[-1]}"
        pipe = cls.construct(mod, samplers_mod, args, models, label)
        pipe.to(device)
        if not cuda:
            for m in pipe.models.values():
                if hasattr(m, "modules"):
                    spconv_cpu_eval(m)
        return cls(pipe, [pipe.models[n] for n in cls.flows(needed)])

    @classmethod
    def module_of(cls, top: str) -> str:  # pragma: no cover
        raise NotImplementedError

    # ---------------------------------------------------------------- running
    def prepare(self, image):
        """The pipeline's own ``preprocess_image``."""
        try:
            return self.pipeline.preprocess_image(image)
        except Exception as e:
            raise GenerateError(f"{self.label} could not preprocess the image ({type(e).__name__}: {e}); "
                                f"give an RGBA image with a transparent background") from None

    def _call(self, payload, steps: Optional[int], seed: int):  # pragma: no cover
        raise NotImplementedError

    def _mesh(self, out):  # pragma: no cover
        raise NotImplementedError

    def run(self, payload, *, steps: Optional[int] = None, seed: int = 0) -> StageOutput:
        latents: Dict[str, Any] = {}
        samplers = {site: getattr(self.pipeline, attr) for site, attr in self.samplers.items()}
        try:
            with capture_final(samplers, latents):
                out = self._call(payload, steps, seed)
        except DecoderUnavailable as e:
            return StageOutput(None, latents, e.reason)
        except ModuleNotFoundError as e:
            raise missing_module_error(e, self.label, "the run") from None
        mesh = self._mesh(out)
        tm = to_trimesh(mesh.vertices, mesh.faces)
        return StageOutput(tm, latents, None if tm is not None else f"{self.label}'s decoder produced no surface")


class TrellisPipeline(TrellisFamilyPipeline):
    """TRELLIS v1 from a weights folder; see the module docstring."""

    label = "TRELLIS"
    cls_name = "TrellisImageTo3DPipeline"
    required_args = ("sparse_structure_sampler", "slat_sampler", "slat_normalization", "image_cond_model")
    samplers = {"sparse_structure": "sparse_structure_sampler", "slat": "slat_sampler"}
    cuda_decoders = {"slat_decoder_mesh": "FlexiCubes surface extraction"}

    @classmethod
    def module_of(cls, top: str) -> str:
        return f"{top}.pipelines.trellis_image_to_3d"

    @classmethod
    def needed(cls, args):
        return ["sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model", "slat_decoder_mesh"]

    @classmethod
    def construct(cls, mod, samplers_mod, args, models, label):
        ss = make_sampler(samplers_mod, args["sparse_structure_sampler"], "sparse_structure_sampler", label)
        sl = make_sampler(samplers_mod, args["slat_sampler"], "slat_sampler", label)
        try:
            pipe = getattr(mod, cls.cls_name)(models=models, sparse_structure_sampler=ss, slat_sampler=sl,
                                              slat_normalization=args["slat_normalization"],
                                              image_cond_model=args["image_cond_model"])
        except Exception as e:
            name = args["image_cond_model"]
            raise GenerateError(
                f"{label}: its image encoder {name} (torch.hub facebookresearch/dinov2) is not available "
                f"here ({type(e).__name__}); fetch it once with network access: python -c \"import torch; "
                f"torch.hub.load('facebookresearch/dinov2', '{name}')\" (cached under TORCH_HOME)") from None
        pipe.sparse_structure_sampler_params = dict(args["sparse_structure_sampler"].get("params", {}))
        pipe.slat_sampler_params = dict(args["slat_sampler"].get("params", {}))
        return pipe

    def _call(self, payload, steps, seed):
        params = {"steps": int(steps)} if steps else {}
        return self.pipeline.run(payload, seed=seed, sparse_structure_sampler_params=dict(params),
                                 slat_sampler_params=dict(params), formats=["mesh"], preprocess_image=False)

    def _mesh(self, out):
        return out["mesh"][0]
