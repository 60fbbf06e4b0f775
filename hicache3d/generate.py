"""Image -> mesh with a recipe's generator: the bundled one by default, or an installed
upstream generator with its weights (a local folder or the hub)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

IMAGE_SUFFIXES = (".png",)


class GenerateError(RuntimeError):
    """Generation cannot run as asked; the message says why and what to do."""


@dataclass
class Result:
    mesh: Any
    seconds: float
    network_calls: int
    skipped_calls: int
    stats: Dict[str, Any] = field(default_factory=dict)


def resolve_weights(recipe, weights: Optional[str]) -> Path:
    """A local weights folder: ``weights`` if given, else the recipe's hub repo through
    huggingface_hub's cache (downloading only when online)."""
    if weights:
        p = Path(weights)
        if not p.exists():
            raise GenerateError(f"--weights {weights}: no such folder")
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


class Generator:
    """One loaded generator (the bundled one or an upstream pipeline), optionally
    accelerated through the engine."""

    def __init__(self, model: str = "bundled", weights: Optional[str] = None):
        from .recipe import get_recipe, version_status
        self.recipe = get_recipe(model)
        if self.recipe.name == "bundled":
            from .bundled.generator import BundledGenerator
            self.pipe = BundledGenerator.from_pretrained(weights) if weights else BundledGenerator.from_pretrained()
            self.kind = "bundled"
            return
        version, _ = version_status(self.recipe)
        if self.recipe.package and version is None:
            raise GenerateError(f"{self.recipe.package} (needed by --model {model}) is not installed")
        if self.recipe.adapter != "hunyuan3d":
            raise GenerateError(f"`generate` supports the bundled model and the Hunyuan3D recipes; "
                                f"for {model!r} accelerate its own pipeline (hicache3d patch / accelerate)")
        folder = resolve_weights(self.recipe, weights)
        import importlib
        mod = importlib.import_module(self.recipe.module)
        cls = getattr(mod, self.recipe.run.split(".")[0])
        if (folder / self.recipe.weights).exists() or weights:
            os.environ.setdefault("HY3DGEN_MODELS", str(folder))
            self.pipe = cls.from_pretrained(self.recipe.weights, subfolder=self.recipe.weights_subfolder)
        else:
            self.pipe = cls.from_pretrained(str(folder), subfolder=self.recipe.weights_subfolder)
        self.kind = "hunyuan3d"

    def warmup(self) -> None:
        """One untimed network call, so the first timed run is not a cold start."""
        import torch
        if self.kind == "bundled" and not getattr(self, "_warm", False):
            m = self.pipe.model
            c = m.config
            x = torch.zeros(1, c.latent_channels, c.grid // 2, c.grid // 2, c.grid // 2)
            cond = torch.zeros(1, 2, 64, 64)
            with torch.no_grad():
                m(x, torch.ones(1), cond)
            self._warm = True

    def _raw(self, image: Path, steps: Optional[int], seed: int,
             progress: Optional[Callable[[int, int], None]]):
        import torch
        if self.kind == "bundled":
            cb = (lambda i, n, t: progress(i + 1, n)) if progress else None
            out = self.pipe(str(image), steps=steps, seed=seed, progress=cb)
            return out.mesh(0)
        from PIL import Image
        g = torch.Generator().manual_seed(seed)
        kw = {"num_inference_steps": steps} if steps else {}
        return self.pipe(image=Image.open(image), generator=g, **kw)[0]

    def run(self, image: Path, *, steps: Optional[int] = None, seed: int = 0, cache: bool = True,
            settings: Optional[Dict[str, Any]] = None,
            progress: Optional[Callable[[int, int], None]] = None) -> Result:
        from . import accelerate
        t0 = time.perf_counter()
        if not cache:
            calls = _count_calls(self)
            try:
                mesh = self._raw(image, steps, seed, progress)
            finally:
                n = calls()
            return Result(mesh, time.perf_counter() - t0, n, 0)
        with accelerate(self.pipe, self.recipe, **(settings or {})) as run:
            mesh = self._raw(image, steps, seed, progress)
        st = run.stats
        return Result(mesh, time.perf_counter() - t0, st["network_calls"], st["skipped_calls"], st)


def _count_calls(gen: Generator):
    """Velocity calls of an uncached run (the same unit ``run.stats`` counts)."""
    n = {"calls": 0}
    target = gen.pipe.sampler if gen.kind == "bundled" else gen.pipe.model
    name = "velocity" if gen.kind == "bundled" else "forward"
    orig = getattr(target, name)

    def counting(*a, **k):
        n["calls"] += 1
        return orig(*a, **k)
    setattr(target, name, counting)

    def done() -> int:
        try:
            delattr(target, name)
        except AttributeError:
            pass
        return n["calls"]
    return done


def list_images(path: Path) -> List[Path]:
    if path.is_dir():
        imgs = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise GenerateError(f"no {'/'.join(IMAGE_SUFFIXES)} images in folder {path}")
        return imgs
    if not path.exists():
        raise GenerateError(f"input {path} does not exist")
    return [path]


def check_image(path: Path) -> None:
    try:
        from .bundled.shapes import read_png
        read_png(path)
    except Exception as e:
        raise GenerateError(f"cannot read {path} as a PNG image ({e})") from None
