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
field decoders).  On CPU the mesh decoder is not loaded, and a run stops at
``decode_slat`` with ``mesh=None`` and a reason saying so, after both samplers ran: the
latents of both sites are there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ..generate import GenerateError
from ._base import (DecoderUnavailable, LayoutError, StageOutput, UpstreamPipeline, capture_final,
                    check_files, import_upstream, read_pipeline_json, spconv_cpu_eval, to_trimesh)

NEEDED = ("sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model", "slat_decoder_mesh")
MESH_DECODER = "slat_decoder_mesh"
FLOWS = ("sparse_structure_flow_model", "slat_flow_model")
# site -> pipeline attribute holding its sampler (as the recipe's [samplers] table)
SAMPLERS = {"sparse_structure": "sparse_structure_sampler", "slat": "slat_sampler"}


def load_model(models_mod, base: Path, name: str, label: str):
    """``trellis.models.from_pretrained`` on a checked local path; errors name the file."""
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
        raise LayoutError(f"{label}: pipeline.json {key} is not a sampler of this TRELLIS "
                          f"({type(e).__name__}: {e})") from None


class TrellisPipeline(UpstreamPipeline):
    """TRELLIS v1 from a weights folder; see the module docstring."""

    label = "TRELLIS"
    module = "trellis.pipelines.trellis_image_to_3d"
    cls_name = "TrellisImageTo3DPipeline"
    sites = list(SAMPLERS)

    def __init__(self, pipeline, networks, decoder_reason: Optional[str]):
        self.pipeline = pipeline
        self.networks = list(networks)
        self.decoder_reason = decoder_reason

    @classmethod
    def load(cls, recipe, folder: Path, device: str) -> "TrellisPipeline":
        label = cls.label
        folder = Path(folder)
        data = read_pipeline_json(folder, label)
        if data.get("name", cls.cls_name) != cls.cls_name:
            raise LayoutError(f"{label}: {folder}/pipeline.json is for {data.get('name')}, not {cls.cls_name} "
                              f"(is this the weights folder of another model?)")
        args = data["args"]
        for key in ("sparse_structure_sampler", "slat_sampler", "slat_normalization", "image_cond_model"):
            if key not in args:
                raise LayoutError(f"{label}: {folder}/pipeline.json has no args.{key}")
        paths = check_files(folder, args["models"], NEEDED, label)
        mod = import_upstream(cls.module, label, recipe.package or "trellis")
        samplers_mod = import_upstream("trellis.pipelines.samplers", label, recipe.package or "trellis")
        models_mod = import_upstream("trellis.models", label, recipe.package or "trellis")
        cuda = str(device).startswith("cuda")
        models, reason = {}, None
        for name in NEEDED:
            if name == MESH_DECODER and not cuda:
                reason = (f"{label}'s mesh decoder ({MESH_DECODER}: FlexiCubes surface extraction) needs "
                          f"CUDA, and this run is on {device}")
                continue
            try:
                models[name] = load_model(models_mod, paths[name], name, label)
            except LayoutError as e:
                if name != MESH_DECODER:
                    raise
                reason = f"{label}'s mesh decoder cannot be loaded here: {str(e).split(': ', 1)[-1]}"
        Pipe = getattr(mod, cls.cls_name)
        ss = make_sampler(samplers_mod, args["sparse_structure_sampler"], "sparse_structure_sampler", label)
        sl = make_sampler(samplers_mod, args["slat_sampler"], "slat_sampler", label)
        try:
            pipe = Pipe(models=models, sparse_structure_sampler=ss, slat_sampler=sl,
                        slat_normalization=args["slat_normalization"], image_cond_model=args["image_cond_model"])
        except Exception as e:
            name = args["image_cond_model"]
            raise GenerateError(
                f"{label}: its image encoder {name} (torch.hub facebookresearch/dinov2) is not available "
                f"here ({type(e).__name__}); fetch it once with network access: python -c \"import torch; "
                f"torch.hub.load('facebookresearch/dinov2', '{name}')\" (cached under TORCH_HOME)") from None
        pipe.sparse_structure_sampler_params = dict(args["sparse_structure_sampler"].get("params", {}))
        pipe.slat_sampler_params = dict(args["slat_sampler"].get("params", {}))
        pipe.to(device)
        if not cuda:
            for m in pipe.models.values():
                spconv_cpu_eval(m)
        return cls(pipe, [pipe.models[n] for n in FLOWS], reason)

    # ------------------------------------------------------------------ running
    def prepare(self, image):
        """The pipeline's own ``preprocess_image`` (alpha crop, or rembg without alpha)."""
        try:
            return self.pipeline.preprocess_image(image)
        except Exception as e:
            raise GenerateError(f"{self.label} could not preprocess the image ({type(e).__name__}: {e}); "
                                f"give an RGBA image with a transparent background") from None

    def _samplers(self) -> Dict[str, Any]:
        return {site: getattr(self.pipeline, attr) for site, attr in SAMPLERS.items()}

    def _stop_at_decoder(self, method: str):
        reason = self.decoder_reason

        def stop(*_a, **_k):
            raise DecoderUnavailable(reason)
        self.pipeline.__dict__[method] = stop

    def run(self, payload, *, steps: Optional[int] = None, seed: int = 0) -> StageOutput:
        latents: Dict[str, Any] = {}
        params = {"steps": int(steps)} if steps else {}
        if self.decoder_reason:
            self._stop_at_decoder("decode_slat")
        try:
            with capture_final(self._samplers(), latents):
                out = self.pipeline.run(payload, seed=seed, sparse_structure_sampler_params=dict(params),
                                        slat_sampler_params=dict(params), formats=["mesh"],
                                        preprocess_image=False)
        except DecoderUnavailable as e:
            return StageOutput(None, latents, e.reason)
        finally:
            self.pipeline.__dict__.pop("decode_slat", None)
        mesh = out["mesh"][0]
        tm = to_trimesh(mesh.vertices, mesh.faces)
        return StageOutput(tm, latents, None if tm is not None else f"{self.label}'s decoder produced no surface")
