"""Image -> mesh with a recipe's generator: the bundled one by default, or an installed
upstream generator with its weights (a local folder or the hub).

Network calls are counted on the network itself (a forward pre-hook on the module every
real forward runs through), never from the cache schedule, and a reference run
(``cache=False``) runs inside :func:`hicache3d.patching.uncached`, so it is the model's
own result even while an in-place patch is active.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from .bundled.shapes import IMAGE_SUFFIXES

__all__ = ["GenerateError", "Generator", "Result", "IMAGE_SUFFIXES", "default_device",
           "list_images", "load_image", "check_image"]


class GenerateError(RuntimeError):
    """Generation cannot run as asked; the message says why and what to do."""


@dataclass
class Result:
    """One generation: ``network_calls`` are forwards of the network counted as they
    happen; ``skipped_calls`` the sampler steps whose velocity was forecast (0 uncached);
    ``seconds`` the generation only (the image was decoded before)."""

    mesh: Any
    seconds: float
    network_calls: int
    skipped_calls: int
    stats: Dict[str, Any] = field(default_factory=dict)
    #: upstream pipelines (TRELLIS v1 / TRELLIS.2 / SAM 3D): the final latent of each
    #: site's sampler, and why ``mesh`` is None when a decoder could not run here
    latents: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None


def default_device(local_rank: int = 0) -> str:
    """``cuda:LOCAL_RANK`` where CUDA is available, else ``cpu``."""
    import torch
    if torch.cuda.is_available():
        return f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    return "cpu"


def unknown_model_message(model: str) -> str:
    from .recipe import known_recipes
    names = sorted(known_recipes())
    close = difflib.get_close_matches(model, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"unknown model {model!r}; known models: {', '.join(names)} (see `hicache3d recipes`)."
            + hint)


def resolve_weights(recipe, weights: Optional[str]) -> Path:
    """A local weights folder: ``weights`` if given, else the recipe's hub repo through
    huggingface_hub's cache (downloading only when online)."""
    if weights:
        p = Path(weights)
        if not p.exists():
            raise GenerateError(f"--weights {weights}: no such folder")
        if not p.is_dir():
            raise GenerateError(f"--weights {weights} is a file; {recipe.name} takes the folder "
                                f"holding {recipe.weights}/{recipe.weights_subfolder or ''}")
        return p
    if not recipe.weights:
        raise GenerateError(f"recipe {recipe.name!r} names no weights repo; pass --weights DIR")
    try:
        from huggingface_hub import snapshot_download
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        kw = {"allow_patterns": [f"{recipe.weights_subfolder}/*"]} if recipe.weights_subfolder else {}
        return Path(snapshot_download(recipe.weights, local_files_only=offline, **kw))
    except Exception as e:
        raise GenerateError(
            f"the weights of {recipe.name} ({recipe.weights}) are not available here ({type(e).__name__}). "
            f"Pre-download them on a machine with access: `huggingface-cli download {recipe.weights}` "
            f"(then copy the folder, or set HF_HOME), or pass --weights DIR") from None


def _hunyuan_model_path(recipe, folder: Path, explicit: bool) -> str:
    """The ``model_path`` to hand to ``from_pretrained`` so that it loads from ``folder``
    whatever ``HY3DGEN_MODELS`` says: an absolute path (the loader joins it onto its base
    folder, and an absolute path wins the join).  ``folder`` is either a models folder
    (``folder/<repo>/<subfolder>``, the ``HY3DGEN_MODELS`` layout) or a snapshot of the
    repo (``folder/<subfolder>``)."""
    sub = recipe.weights_subfolder or ""
    where = f"--weights {folder}" if explicit else f"the downloaded weights ({folder})"
    if explicit and not any(folder.iterdir()):
        raise GenerateError(f"{where} is an empty folder; it must hold {recipe.weights}/{sub}/ "
                            f"(or {sub}/) with config.yaml and the model safetensors")
    for base in (folder / recipe.weights, folder):
        if (base / sub).is_dir():
            if not (base / sub / "config.yaml").is_file():
                raise GenerateError(f"{where}: {base / sub} has no config.yaml")
            return str(base.resolve())
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8])
    raise GenerateError(f"{where} holds neither {recipe.weights}/{sub}/ nor {sub}/ "
                        f"(found: {found})")


def _bundled_weights(weights: str) -> Path:
    """Check a ``--weights`` path for the bundled model: a safetensors file (or a folder
    holding exactly one)."""
    p = Path(weights)
    if not p.exists():
        raise GenerateError(f"--weights {weights}: no such file (the bundled model takes a "
                            f".safetensors file, e.g. one written by scripts/train_bundled.py)")
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise GenerateError(f"--weights {weights} is a folder with {len(files) or 'no'} "
                                f".safetensors file{'s' if len(files) != 1 else ''}; "
                                f"give the bundled model's .safetensors file itself")
        p = files[0]
    if not p.is_file():
        raise GenerateError(f"--weights {weights} is not a regular file")
    return p


def _load_bundled(weights: Optional[str], device: str):
    from .bundled.generator import BundledGenerator
    if not weights:
        return BundledGenerator.from_pretrained(device=device)
    p = _bundled_weights(weights)
    try:
        return BundledGenerator.from_pretrained(p, device=device)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerateError(f"--weights {weights}: not weights of the bundled model "
                            f"({type(e).__name__}: {first[:200]})") from None


@contextlib.contextmanager
def count_forwards(module) -> Iterator[Dict[str, int]]:
    """Count the forwards of ``module`` (or of each module of a list) inside the block
    (``n["calls"]``: all of them together)."""
    n = {"calls": 0}

    def hook(_m, _inp):
        n["calls"] += 1
    modules = module if isinstance(module, (list, tuple)) else [module]
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield n
    finally:
        for h in handles:
            h.remove()


def latent_drift(a: Any, b: Any) -> float:
    """Relative L2 distance ``|a - b| / |b|`` of two final latents of one site (a tensor,
    a dict of tensors or a sparse tensor: every leaf together)."""
    import torch

    from .tree import flatten
    la, _ = flatten(a, batch_dim=None)
    lb, _ = flatten(b, batch_dim=None)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        raise GenerateError("the two latents differ in structure (different sparse structures?)")
    num = sum(float(torch.sum((x.double() - y.double()) ** 2)) for x, y in zip(la, lb))
    den = sum(float(torch.sum(y.double() ** 2)) for y in lb)
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


class Generator:
    """One loaded generator (the bundled one or an upstream pipeline) on one device,
    run accelerated (``cache=True``) or as the reference (``cache=False``)."""

    def __init__(self, model: str = "bundled", weights: Optional[str] = None,
                 device: Optional[str] = None):
        from .recipe import RecipeError, get_recipe, known_recipes, version_status
        if not model.endswith(".toml") and model not in known_recipes():
            raise GenerateError(unknown_model_message(model))
        try:
            self.recipe = get_recipe(model)
        except RecipeError as e:
            raise GenerateError(str(e)) from None
        self.device = device or default_device()
        if self.recipe.name == "bundled":
            self.pipe = _load_bundled(weights, self.device)
            self.kind = "bundled"
            self.network = self.pipe.model          # the sampler's velocity is what is patched
            return
        version, _ = version_status(self.recipe)
        if self.recipe.package and version is None:
            raise GenerateError(f"{self.recipe.package} (needed by --model {model}) is not installed")
        if self.recipe.adapter != "hunyuan3d":
            from .pipelines import load_pipeline, pipeline_class
            try:
                pipeline_class(self.recipe)
            except KeyError:
                raise GenerateError(f"`generate` supports the bundled model, the Hunyuan3D recipes, trellis, "
                                    f"trellis2 and sam3d; for {model!r} accelerate its own pipeline "
                                    f"(hicache3d patch / accelerate)") from None
            folder = resolve_weights(self.recipe, weights)
            self.upstream = load_pipeline(self.recipe, folder, self.device)
            self.pipe = self.upstream.pipeline
            self.kind = "upstream"
            self.network = self.upstream.networks     # forwards of every flow network
            return
        folder = resolve_weights(self.recipe, weights)
        model_path = _hunyuan_model_path(self.recipe, folder, explicit=bool(weights))
        import importlib

        import torch
        mod = importlib.import_module(self.recipe.module)
        cls = getattr(mod, self.recipe.run.split(".")[0])
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.pipe = cls.from_pretrained(model_path, subfolder=self.recipe.weights_subfolder,
                                        device=self.device, dtype=dtype)
        self.kind = "hunyuan3d"
        # every real forward of the DiT runs through its first parametrised block (a hook
        # on the DiT itself would also see the forecast calls, which enter and return)
        self.network = next(m for m in self.pipe.model.children()
                            if any(True for _ in m.parameters()))

    def prepare(self, path: Path, image=None):
        """The generator's input from an image file, decoded once (``image``: the array
        :func:`load_image` returned).  A :class:`GenerateError` names the file."""
        if self.kind == "bundled":
            from .bundled import shapes
            img = load_image(path) if image is None else image
            try:
                return shapes.image_to_condition(img)
            except ValueError as e:
                raise GenerateError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
        from PIL import Image
        img = load_image(path) if image is None else image
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        if self.kind == "upstream":
            pil = pil.convert("RGBA") if pil.mode == "LA" else pil.convert("RGB") if pil.mode == "L" else pil
            try:
                return self.upstream.prepare(pil)
            except GenerateError as e:
                raise GenerateError(f"{path}: {e}") from None
        return pil

    def warmup(self) -> None:
        """One untimed network call, so the first timed run is not a cold start."""
        import torch
        if self.kind == "bundled" and not getattr(self, "_warm", False):
            m = self.pipe.model
            c = m.config
            x = torch.zeros(1, c.latent_channels, c.grid // 2, c.grid // 2, c.grid // 2,
                            device=self.pipe.device)
            cond = torch.zeros(1, 2, 64, 64, device=self.pipe.device)
            with torch.no_grad():
                m(x, torch.ones(1, device=self.pipe.device), cond)
            self._warm = True

    def _raw(self, payload, steps: Optional[int], seed: int,
             progress: Optional[Callable[[int, int], None]]):
        import torch
        if self.kind == "bundled":
            from .bundled.metrics import occupancy_to_mesh
            cb = (lambda i, n, t: progress(i + 1, n)) if progress else None
            out = self.pipe(payload, steps=steps, seed=seed, progress=cb)
            return occupancy_to_mesh(out.occupancy[0].cpu())
        if self.kind == "upstream":
            return self.upstream.run(payload, steps=steps, seed=seed)
        g = torch.Generator().manual_seed(seed)
        kw = {"num_inference_steps": steps} if steps else {}
        return self.pipe(image=payload, generator=g, **kw)[0]

    def _sync(self) -> None:
        if str(self.device).startswith("cuda"):
            import torch
            torch.cuda.synchronize(self.device)

    def run(self, payload, *, steps: Optional[int] = None, seed: int = 0, cache: bool = True,
            settings: Optional[Dict[str, Any]] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> Result:
        """Generate one mesh from a prepared input (see :meth:`prepare`; a path is
        prepared first, untimed)."""
        from .api import accelerate
        from .patching import uncached
        if isinstance(payload, (str, Path)):
            payload = self.prepare(Path(payload))
        with count_forwards(self.network) as n:
            self._sync()
            t0 = time.perf_counter()
            if cache:
                target = self.upstream.target if self.kind == "upstream" else self.pipe
                with accelerate(target, self.recipe, **(settings or {})) as acc:
                    mesh = self._raw(payload, steps, seed, progress)
                stats = acc.stats
            else:
                with uncached():
                    mesh = self._raw(payload, steps, seed, progress)
                stats = {}
            self._sync()
            seconds = time.perf_counter() - t0
        if self.kind == "upstream":            # a StageOutput: mesh or reason, and latents
            out = mesh
            return Result(out.mesh, seconds, n["calls"], stats.get("skipped_calls", 0), stats,
                          latents=out.latents, reason=out.reason)
        return Result(mesh, seconds, n["calls"], stats.get("skipped_calls", 0), stats)


def list_images(path: Path) -> List[Path]:
    """The images of a folder (sorted by name), or ``[path]`` for one file."""
    path = Path(path)
    if path.is_dir():
        imgs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise GenerateError(f"no {'/'.join(IMAGE_SUFFIXES)} images in folder {path}")
        return imgs
    if not path.exists():
        raise GenerateError(f"input {path} does not exist")
    return [path]


def load_image(path: Path):
    """Decode an image file once (PNG, JPEG, WebP); a :class:`GenerateError` names it."""
    from .bundled.shapes import read_image
    try:
        return read_image(path, max_side=1024)
    except ValueError as e:
        msg = str(e)
        raise GenerateError(msg if str(path) in msg else f"{path}: {msg}") from None


def check_image(path: Path) -> None:
    load_image(path)
