"""Weights folders of tiny random-weight upstream pipelines, in the upstream's own layout,
and the stand-ins their pipeline modules need to import on a CPU-only machine.

Used by ``tests/_pipeline_checks.py`` (one fresh interpreter per family: TRELLIS v1 and
TRELLIS.2 both import as ``trellis``).  Every network is built from the upstream's own
classes (``upstream_harness/*_env.py``), saved with its config as ``ckpts/<name>.json`` +
``ckpts/<name>.safetensors`` and loaded back by the code under test.

Stand-ins (ours, tests only), each for something the sampling path never computes with:

* ``torchvision``: ``transforms.Compose`` / ``transforms.Normalize`` in plain torch (PyPI
  torchvision is a CUDA build; the pipelines only normalise the condition image with it);
* ``rembg``: a module whose ``new_session`` raises (background removal is only used for
  images without alpha; the tests give RGBA images);
* the image encoder: a tiny deterministic module in place of DINOv2 (``torch.hub.load``
  of ``facebookresearch/dinov2`` is answered with it), so no download is attempted.
"""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

DINO_TOKENS, DINO_CHANNELS = 16, 32


def install_torchvision_standin() -> None:
    if "torchvision" in sys.modules:
        return

    class Compose:
        def __init__(self, fns):
            self.fns = list(fns)

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.tensor(mean), torch.tensor(std)

        def __call__(self, x):
            shape = (-1, 1, 1)
            return (x - self.mean.to(x).view(shape)) / self.std.to(x).view(shape)

    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    tv.__path__ = []
    tr = types.ModuleType("torchvision.transforms")
    tr.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    tr.Compose, tr.Normalize = Compose, Normalize
    tv.transforms = tr
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tr


def install_rembg_standin() -> None:
    if "rembg" in sys.modules:
        return
    mod = types.ModuleType("rembg")
    mod.__spec__ = importlib.machinery.ModuleSpec("rembg", None)

    def new_session(*_a, **_k):
        raise RuntimeError("rembg is a test stand-in: give an image with an alpha channel")
    mod.new_session = new_session
    mod.remove = new_session
    sys.modules["rembg"] = mod


class TinyImageEncoder(torch.nn.Module):
    """In place of DINOv2 / DINOv3: ``[B, 3, H, W] -> [B, 16, 32]`` patch tokens (a 4x4
    average pool and a fixed random linear map), depending on the image."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(70_000 + seed)
        self.proj = torch.nn.Linear(3, DINO_CHANNELS)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(DINO_CHANNELS, 3, generator=g))
            self.proj.bias.copy_(torch.randn(DINO_CHANNELS, generator=g) * 0.1)

    def tokens(self, image):
        x = torch.nn.functional.adaptive_avg_pool2d(image.float(), 4)      # [B, 3, 4, 4]
        return self.proj(x.flatten(2).transpose(1, 2))                     # [B, 16, 32]

    def forward(self, image, is_training=False):
        return {"x_prenorm": self.tokens(image)}


def answer_torch_hub_with_tiny_dino() -> None:
    """``torch.hub.load('facebookresearch/dinov2', ...)`` returns :class:`TinyImageEncoder`."""
    original = torch.hub.load

    def load(repo, model, *args, **kwargs):
        if repo == "facebookresearch/dinov2":
            return TinyImageEncoder()
        return original(repo, model, *args, **kwargs)
    torch.hub.load = load


def rgba_disc(path: Path, size: int = 96) -> Path:
    """A test image: an orange disc on a transparent background."""
    from PIL import Image
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    a = np.zeros((size, size, 4), np.uint8)
    a[inside] = (230, 120, 40, 255)
    a[..., 1] += (xx % 7 == 0).astype(np.uint8) * 20 * inside
    Image.fromarray(a, "RGBA").save(path)
    return path


def _save(folder: Path, rel: str, name: str, args: dict, model) -> None:
    from safetensors.torch import save_file
    base = folder / rel
    base.parent.mkdir(parents=True, exist_ok=True)
    (base.parent / (base.name + ".json")).write_text(json.dumps({"name": name, "args": args}))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()} if model is not None \
        else {"unused": torch.zeros(1)}
    save_file(state, str(base.parent / (base.name + ".safetensors")))


def _build(ctor, seed: int):
    from upstream_harness._common import rerandomize_zero_params
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
    rerandomize_zero_params(model, torch.Generator().manual_seed(10_000 + seed))
    return model.eval()


def _calibrate_occupancy(decoder, z, share: float) -> None:
    """Shift the decoder's last bias so that about ``share`` of ``z``'s voxels are occupied
    (a random decoder otherwise marks half the grid, which makes the sparse stage slow)."""
    conv = decoder.out_layer[-1]
    with torch.no_grad():
        logits = decoder(z).flatten()
        conv.bias -= torch.quantile(logits, 1 - share)


# ------------------------------------------------------------------------------ TRELLIS v1

V1_SS_FLOW = dict(resolution=16, in_channels=8, model_channels=64, cond_channels=DINO_CHANNELS, out_channels=8,
                  num_blocks=1, num_heads=4, mlp_ratio=2, patch_size=2, pe_mode="ape", qk_rms_norm=True)
V1_SLAT_FLOW = dict(resolution=16, in_channels=8, model_channels=64, cond_channels=DINO_CHANNELS, out_channels=8,
                    num_blocks=1, num_heads=4, mlp_ratio=2, patch_size=2, num_io_res_blocks=1,
                    io_block_channels=[32], pe_mode="ape", qk_rms_norm=True)
V1_SS_DEC = dict(out_channels=1, latent_channels=8, num_res_blocks=1, channels=[16], num_res_blocks_middle=1)
V1_MESH_DEC = dict(resolution=64, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12,
                   mlp_ratio=4, attn_mode="swin", window_size=8, use_fp16=True,
                   representation_config={"use_color": True})
V1_PARAMS = {"ss": {"steps": 12, "cfg_strength": 7.5, "cfg_interval": [0.5, 0.95], "rescale_t": 3.0},
             "slat": {"steps": 12, "cfg_strength": 3.0, "cfg_interval": [0.5, 0.95], "rescale_t": 3.0}}


def write_trellis_v1(folder: Path, seed: int = 0) -> Path:
    """A TRELLIS-image-large-shaped weights folder with tiny models (``trellis_env`` active).
    ``ckpts/slat_dec_mesh`` holds the mesh decoder's published config and a placeholder
    tensor: the mesh decoder is never constructed on CPU (FlexiCubes needs CUDA)."""
    from upstream_harness import trellis_env as T
    T.activate()
    from trellis.models.sparse_structure_flow import SparseStructureFlowModel
    from trellis.models.sparse_structure_vae import SparseStructureDecoder
    from trellis.models.structured_latent_flow import SLatFlowModel
    folder.mkdir(parents=True, exist_ok=True)
    ss = _build(lambda: SparseStructureFlowModel(**V1_SS_FLOW), seed)
    dec = _build(lambda: SparseStructureDecoder(**V1_SS_DEC), seed + 1)
    z = T.sample_ss(T.make_sampler("interval"), ss, steps=6).samples
    _calibrate_occupancy(dec, z, 0.06)
    from upstream_harness import _standins
    with _standins.flash_attn_installed():
        slat = _build(lambda: SLatFlowModel(**V1_SLAT_FLOW), seed + 2)
    _save(folder, "ckpts/ss_flow", "SparseStructureFlowModel", V1_SS_FLOW, ss)
    _save(folder, "ckpts/ss_dec", "SparseStructureDecoder", V1_SS_DEC, dec)
    _save(folder, "ckpts/slat_flow", "SLatFlowModel", V1_SLAT_FLOW, slat)
    _save(folder, "ckpts/slat_dec_mesh", "SLatMeshDecoder", V1_MESH_DEC, None)
    sampler = lambda p: {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5}, "params": p}
    g = torch.Generator().manual_seed(80_000 + seed)
    cfg = {"name": "TrellisImageTo3DPipeline", "args": {
        "models": {"sparse_structure_decoder": "ckpts/ss_dec", "sparse_structure_flow_model": "ckpts/ss_flow",
                   "slat_decoder_mesh": "ckpts/slat_dec_mesh", "slat_flow_model": "ckpts/slat_flow"},
        "sparse_structure_sampler": sampler(V1_PARAMS["ss"]), "slat_sampler": sampler(V1_PARAMS["slat"]),
        "slat_normalization": {"mean": (torch.randn(8, generator=g) * 0.1).tolist(),
                               "std": (1 + torch.rand(8, generator=g)).tolist()},
        "image_cond_model": "dinov2_vitl14_reg"}}
    (folder / "pipeline.json").write_text(json.dumps(cfg, indent=1))
    return folder


def activate_trellis_v1() -> None:
    """``trellis_env`` plus the pipeline module's import-time stand-ins and the tiny DINOv2."""
    from upstream_harness import _standins, trellis_env as T
    T.activate()
    install_torchvision_standin()
    install_rembg_standin()
    answer_torch_hub_with_tiny_dino()
    with _standins.flash_attn_installed():
        import trellis.pipelines.trellis_image_to_3d  # noqa: F401


# ------------------------------------------------------------------------------ TRELLIS.2

def _placeholder_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__path__ = []
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _unavailable(what: str):
    class Unavailable:
        def __init__(self, *_a, **_k):
            raise RuntimeError(f"{what} is a test stand-in")

        @classmethod
        def from_pretrained(cls, *_a, **_k):
            raise RuntimeError(f"{what} is a test stand-in")
    Unavailable.__name__ = what.rsplit(".", 1)[-1]
    return Unavailable


def install_trellis2_import_standins() -> None:
    """Modules ``trellis2_image_to_3d`` imports at import time but a CPU sampling run never
    calls: ``transformers`` (DINOv3 / BiRefNet classes: the tests use a tiny encoder),
    ``cumesh`` and ``flex_gemm.ops.grid_sample`` (mesh / texture post-processing of the
    CUDA decoders, never reached on CPU), and ``torchvision.transforms``."""
    install_torchvision_standin()
    if "transformers" not in sys.modules:
        sys.modules["transformers"] = _placeholder_module(
            "transformers", DINOv3ViTModel=_unavailable("transformers.DINOv3ViTModel"),
            AutoModelForImageSegmentation=_unavailable("transformers.AutoModelForImageSegmentation"))
    if "cumesh" not in sys.modules:
        sys.modules["cumesh"] = _placeholder_module("cumesh")
    if "flex_gemm" not in sys.modules:
        def grid_sample_3d(*_a, **_k):
            raise RuntimeError("flex_gemm is a test stand-in")
        gs = _placeholder_module("flex_gemm.ops.grid_sample", grid_sample_3d=grid_sample_3d)
        ops = _placeholder_module("flex_gemm.ops", grid_sample=gs)
        sys.modules.update({"flex_gemm": _placeholder_module("flex_gemm", ops=ops), "flex_gemm.ops": ops,
                            "flex_gemm.ops.grid_sample": gs})


class TinyDinoV3:
    """In place of ``image_feature_extractor.DinoV3FeatureExtractor``: list of PIL images
    -> ``[B, 16, 32]`` tokens (:class:`TinyImageEncoder`)."""

    def __init__(self, model_name: str, image_size: int = 512):
        self.model_name, self.image_size = model_name, image_size
        self.model = TinyImageEncoder()

    def to(self, device):
        self.model.to(device)

    def cpu(self):
        self.model.cpu()

    def cuda(self):  # pragma: no cover
        self.model.cuda()

    @torch.no_grad()
    def __call__(self, images):
        x = torch.stack([torch.from_numpy(np.array(i.convert("RGB").resize((64, 64)), np.float32) / 255)
                         .permute(2, 0, 1) for i in images])
        return self.model.tokens(x)


def activate_trellis2() -> None:
    from upstream_harness import trellis2_env as T
    T.activate()
    install_trellis2_import_standins()
    import trellis.modules.image_feature_extractor as fe
    import trellis.pipelines.trellis2_image_to_3d  # noqa: F401
    fe.DinoV3FeatureExtractor = TinyDinoV3


V2_COMMON = dict(num_blocks=1, mlp_ratio=2, pe_mode="rope", share_mod=True, initialization="scaled",
                 qk_rms_norm=True, qk_rms_norm_cross=True, dtype="float32")
V2_SS_FLOW = dict(V2_COMMON, resolution=16, in_channels=8, out_channels=8, model_channels=32, num_heads=2,
                  cond_channels=DINO_CHANNELS)
V2_SHAPE_FLOW = dict(V2_COMMON, resolution=32, in_channels=32, out_channels=32, model_channels=64, num_heads=4,
                     cond_channels=DINO_CHANNELS)
V2_TEX_FLOW = dict(V2_SHAPE_FLOW, in_channels=64)
V2_SS_DEC = dict(out_channels=1, latent_channels=8, num_res_blocks=1, channels=[16, 8], num_res_blocks_middle=1)
V2_PARAMS = {
    "sparse_structure_sampler": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7,
                                 "guidance_interval": [0.6, 1.0], "rescale_t": 5.0},
    "shape_slat_sampler": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.5,
                           "guidance_interval": [0.6, 1.0], "rescale_t": 3.0},
    "tex_slat_sampler": {"steps": 12, "guidance_strength": 1.0, "guidance_rescale": 0.0,
                         "guidance_interval": [0.6, 0.9], "rescale_t": 3.0},
}


def write_trellis2(folder: Path, seed: int = 0, pipeline_type: str = "512") -> Path:
    """A TRELLIS.2-4B-shaped weights folder with tiny models (``trellis2_env`` active).  The
    shape / texture decoders get their published class names and a placeholder tensor:
    they are never constructed on CPU (FlexGEMM / O-Voxel / CuMesh need CUDA)."""
    from upstream_harness import trellis2_env as T
    T.activate()
    from trellis.models.sparse_structure_flow import SparseStructureFlowModel
    from trellis.models.sparse_structure_vae import SparseStructureDecoder
    from trellis.models.structured_latent_flow import SLatFlowModel
    folder.mkdir(parents=True, exist_ok=True)
    ss = _build(lambda: SparseStructureFlowModel(**V2_SS_FLOW), seed)
    dec = _build(lambda: SparseStructureDecoder(**V2_SS_DEC), seed + 1)
    z = T.sample_ss(T.make_sampler("interval"), ss, steps=4).samples
    _calibrate_occupancy(dec, z, 0.02)
    _save(folder, "ckpts/ss_flow", "SparseStructureFlowModel", V2_SS_FLOW, ss)
    _save(folder, "ckpts/ss_dec", "SparseStructureDecoder", V2_SS_DEC, dec)
    models = {"sparse_structure_flow_model": "ckpts/ss_flow", "sparse_structure_decoder": "ckpts/ss_dec",
              "shape_slat_decoder": "ckpts/shape_dec", "tex_slat_decoder": "ckpts/tex_dec"}
    for i, res in enumerate(("512", "1024")):
        _save(folder, f"ckpts/shape_flow_{res}", "SLatFlowModel", V2_SHAPE_FLOW,
              _build(lambda: SLatFlowModel(**V2_SHAPE_FLOW), seed + 2 + 2 * i))
        _save(folder, f"ckpts/tex_flow_{res}", "SLatFlowModel", V2_TEX_FLOW,
              _build(lambda: SLatFlowModel(**V2_TEX_FLOW), seed + 3 + 2 * i))
        models[f"shape_slat_flow_model_{res}"] = f"ckpts/shape_flow_{res}"
        models[f"tex_slat_flow_model_{res}"] = f"ckpts/tex_flow_{res}"
    _save(folder, "ckpts/shape_dec", "FlexiDualGridVaeDecoder", {"resolution": 256, "model_channels": [512]}, None)
    _save(folder, "ckpts/tex_dec", "SparseUnetVaeDecoder", {"out_channels": 6, "model_channels": [512]}, None)
    g = torch.Generator().manual_seed(90_000 + seed)
    norm = lambda: {"mean": (torch.randn(32, generator=g) * 0.1).tolist(),
                    "std": (1 + torch.rand(32, generator=g)).tolist()}
    sampler = lambda k: {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
                         "params": V2_PARAMS[k]}
    cfg = {"name": "Trellis2ImageTo3DPipeline", "args": {
        "models": models, **{k: sampler(k) for k in V2_PARAMS},
        "shape_slat_normalization": norm(), "tex_slat_normalization": norm(),
        "image_cond_model": {"name": "DinoV3FeatureExtractor",
                             "args": {"model_name": "facebook/dinov3-vitl16-pretrain-lvd1689m"}},
        "default_pipeline_type": pipeline_type}}
    (folder / "pipeline.json").write_text(json.dumps(cfg, indent=1))
    return folder


# ------------------------------------------------------------------------------ SAM 3D

SAM3D_MODELS = ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_gs", "slat_decoder_mesh")


def write_sam3d(folder: Path, seed: int = 0) -> Path:
    """A facebook/sam-3d-objects-shaped folder: ``checkpoints/pipeline.yaml`` naming the
    inference pipeline and ``<model>.yaml`` + ``<model>.ckpt`` per model.  The two
    generators' checkpoints hold the tiny real generators' weights (``sam3d_env``) under the
    ``_base_models.generator.`` prefix the pipeline strips; the configs name their classes.
    (The pipeline's constructor is CUDA-only, so nothing here is loaded on CPU: the folder
    serves the layout checks and the CPU stop.)"""
    from upstream_harness import sam3d_env as S
    S.activate()
    ck = folder / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    built = {"ss_generator": S.build_ss_generator(seed), "slat_generator": S.build_slat_generator(seed + 1)}
    lines = ["_target_: sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap",
             "device: cuda", "dtype: float32", "compile_model: false"]
    for name in SAM3D_MODELS:
        gen = built.get(name)
        target = "sam3d_objects.model.backbone.generator.shortcut.model.ShortCut" if gen is not None \
            else "sam3d_objects.model.backbone.tdfy_dit.models.placeholder"
        (ck / f"{name}.yaml").write_text(f"module:\n  generator:\n    backbone:\n      _target_: {target}\n")
        state = {f"_base_models.generator.{k}": v for k, v in gen.state_dict().items()} if gen is not None else {}
        torch.save({"state_dict": state}, ck / f"{name}.ckpt")
        lines += [f"{name}_config_path: {name}.yaml", f"{name}_ckpt_path: {name}.ckpt"]
    (ck / "pipeline.yaml").write_text("\n".join(lines) + "\n")
    return folder
