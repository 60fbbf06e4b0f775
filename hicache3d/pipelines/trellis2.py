"""TRELLIS.2 image-to-3D (``Trellis2ImageTo3DPipeline``; PyPI ``trellis-3d-python``, which
installs it as ``trellis``, or a source checkout importable as ``trellis2``) from its
weights folder.

Weights folder (the ``microsoft/TRELLIS.2-4B`` snapshot)::

    pipeline.json   {"name": "Trellis2ImageTo3DPipeline", "args": {"models": {...},
                     "sparse_structure_sampler" / "shape_slat_sampler" / "tex_slat_sampler":
                     {"name", "args", "params"}, "shape_slat_normalization",
                     "tex_slat_normalization", "image_cond_model": {"name", "args"},
                     "default_pipeline_type": "512" | "1024" | "1024_cascade" | "1536_cascade"}}
    ckpts/<model>.json + ckpts/<model>.safetensors   for each model of that pipeline type

A run is the pipeline's own ``run(image, seed, ..., pipeline_type)``: the image condition
(DINOv3, from the hub), the sparse-structure flow (site ``sparse_structure``), its dense
decoder (runs on CPU), the shape flow (site ``shape_slat``; the cascades run it twice, with
the shape decoder's upsampler in between), the texture flow (site ``tex_slat``), then
``decode_latent``: the shape decoder (FlexiDualGrid VAE: FlexGEMM sparse convolutions,
mesh extraction with O-Voxel / CuMesh) and the texture decoder, CUDA only.

On CPU neither of the two decoders is loaded: a ``512`` / ``1024`` run stops at
``decode_latent`` after all three samplers ran, a cascade stops at its upsampler after the
first shape run; both with ``mesh=None`` and the reason.  (The pipeline module itself
imports CuMesh and FlexGEMM: where they are not installed at all, loading stops with that
message before any sampler runs.)
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict

from ..generate import GenerateError
from ._base import LayoutError
from .trellis import TrellisFamilyPipeline, make_sampler

PIPELINE_TYPES = {
    "512": ["shape_slat_flow_model_512", "tex_slat_flow_model_512"],
    "1024": ["shape_slat_flow_model_1024", "tex_slat_flow_model_1024"],
    "1024_cascade": ["shape_slat_flow_model_512", "shape_slat_flow_model_1024", "tex_slat_flow_model_1024"],
    "1536_cascade": ["shape_slat_flow_model_512", "shape_slat_flow_model_1024", "tex_slat_flow_model_1024"],
}
SAMPLER_KEYS = ("sparse_structure_sampler", "shape_slat_sampler", "tex_slat_sampler")


class Trellis2Pipeline(TrellisFamilyPipeline):
    """TRELLIS.2 from a weights folder; see the module docstring.  ``pipeline_type``: the
    folder's ``default_pipeline_type`` unless set on the class or instance."""

    label = "TRELLIS.2"
    cls_name = "Trellis2ImageTo3DPipeline"
    required_args = SAMPLER_KEYS + ("shape_slat_normalization", "tex_slat_normalization", "image_cond_model")
    samplers = {"sparse_structure": "sparse_structure_sampler", "shape_slat": "shape_slat_sampler",
                "tex_slat": "tex_slat_sampler"}
    cuda_decoders = {
        "shape_slat_decoder": "FlexiDualGrid VAE: FlexGEMM sparse convolutions, O-Voxel / CuMesh mesh extraction",
        "tex_slat_decoder": "sparse-UNet VAE on FlexGEMM sparse convolutions, guided by the shape decoder",
    }
    pipeline_type = None

    @classmethod
    def top_package(cls) -> str:
        # a source checkout imports as trellis2; PyPI trellis-3d-python installs it as trellis
        return "trellis2" if importlib.util.find_spec("trellis2") is not None else "trellis"

    @classmethod
    def module_of(cls, top: str) -> str:
        return f"{top}.pipelines.trellis2_image_to_3d"

    @classmethod
    def _type(cls, args) -> str:
        t = str(cls.pipeline_type or args.get("default_pipeline_type", "1024_cascade"))
        if t not in PIPELINE_TYPES:
            raise LayoutError(f"{cls.label}: pipeline type {t!r} is none of {', '.join(PIPELINE_TYPES)}")
        return t

    @classmethod
    def needed(cls, args):
        return (["sparse_structure_flow_model", "sparse_structure_decoder"] + PIPELINE_TYPES[cls._type(args)]
                + ["shape_slat_decoder", "tex_slat_decoder"])

    @classmethod
    def construct(cls, mod, samplers_mod, args, models, label):
        samplers = {k: make_sampler(samplers_mod, args[k], k, label) for k in SAMPLER_KEYS}
        spec = args["image_cond_model"]
        name = spec.get("name") if isinstance(spec, dict) else spec
        repo = (spec.get("args") or {}).get("model_name", name) if isinstance(spec, dict) else name
        extractor = getattr(importlib.import_module(mod.__name__.rsplit(".", 2)[0] + ".modules.image_feature_extractor"),
                            str(name), None)
        if extractor is None:
            raise LayoutError(f"{label}: pipeline.json image_cond_model {name!r} is not an image feature "
                              f"extractor of this TRELLIS.2")
        try:
            encoder = extractor(**(spec.get("args") or {}))
        except Exception as e:
            raise GenerateError(
                f"{label}: its image encoder {repo} is not available here ({type(e).__name__}); "
                f"pre-download it on a machine with access: `huggingface-cli download {repo}` "
                f"(then copy the folder, or set HF_HOME)") from None
        pipe = getattr(mod, cls.cls_name)(
            models=models, **samplers,
            **{f"{k}_params": dict(args[k].get("params", {})) for k in SAMPLER_KEYS},
            shape_slat_normalization=args["shape_slat_normalization"],
            tex_slat_normalization=args["tex_slat_normalization"], image_cond_model=encoder,
            low_vram=bool(args.get("low_vram", False)), default_pipeline_type=cls._type(args))
        return pipe

    def _call(self, payload, steps, seed):
        params: Dict[str, Any] = {"steps": int(steps)} if steps else {}
        return self.pipeline.run(payload, seed=seed, sparse_structure_sampler_params=dict(params),
                                 shape_slat_sampler_params=dict(params), tex_slat_sampler_params=dict(params),
                                 preprocess_image=False)

    def _mesh(self, out):
        return out[0]

    def prepare(self, image):
        """The pipeline's own ``preprocess_image``; it crops by the alpha channel, which this
        TRELLIS.2 build requires (it has no background removal)."""
        if image.mode != "RGBA":
            raise GenerateError(f"{self.label} needs an RGBA image with a transparent background "
                                f"(this one is {image.mode}); remove the background first")
        return super().prepare(image)
