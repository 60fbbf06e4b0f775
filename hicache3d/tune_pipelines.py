"""The pipelines ``hicache3d tune`` (and ``bench``) measure: one generator run end to end
(decoders included), uncached or with a recipe's settings, reporting the final latent of
each site, the mesh where the pipeline makes one, the network forwards and the wall time.

A pipeline is pluggable: subclass :class:`Pipeline` (``model``, ``sites``, ``prepare``,
``run``; ``has_mesh`` and ``mesh_scores`` where a mesh is made) and hand it to
:func:`hicache3d.tune.tune`, or register a factory for a recipe with
:func:`register_pipeline` so that ``hicache3d tune --model NAME`` finds it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .generate import GenerateError
from .recipe import Recipe, get_recipe

__all__ = ["TuneError", "Output", "Pipeline", "BundledPipeline", "GeneratorPipeline",
           "register_pipeline", "make_pipeline", "relative_l2", "latent_state"]


class TuneError(RuntimeError):
    """Tuning cannot run as asked; the message says why and what to do."""


@dataclass
class Output:
    """One run of a pipeline over a batch of inputs.  ``latents``: per site, the final
    latent of each input (a tensor, a dict/list of tensors or a sparse tensor with
    ``.feats``); ``meshes``: what :meth:`Pipeline.mesh_scores` compares (``None``: no mesh);
    ``forwards``: network forwards counted as they happened; ``seconds``: wall time of the
    whole pipeline (decoders included)."""

    latents: Dict[str, List[Any]]
    meshes: Any = None
    forwards: int = 0
    seconds: float = 0.0
    stats: Dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Base class of the pipelines tune measures.  ``run(payload, recipe=None)`` must be
    the model's own, really uncached computation (:func:`hicache3d.uncached`); with a
    :class:`~hicache3d.recipe.Recipe` it runs accelerated with those settings."""

    model: str = ""
    has_mesh: bool = False
    default_steps: Optional[int] = None

    def __init__(self, recipe: Optional[Recipe] = None):
        self.recipe = recipe if recipe is not None else get_recipe(self.model)
        self.model = self.recipe.name

    @property
    def sites(self) -> List[str]:
        return [s.name for s in self.recipe.sites]

    def target(self) -> Any:
        """The object :func:`hicache3d.accelerate` patches."""
        raise NotImplementedError

    def prepare(self, images: Sequence[Path]) -> Any:
        """The inputs of :meth:`run` from image files (decoded once, untimed)."""
        raise NotImplementedError

    def run(self, payload: Any, *, steps: Optional[int], seed: int,
            recipe: Optional[Recipe]) -> Output:
        raise NotImplementedError

    def identity(self) -> Dict[str, Any]:
        """What tells this pipeline's runs apart from another's on the same model and images
        (its class, weights, call settings): part of the key of the stored runs."""
        return {"pipeline": f"{type(self).__module__}.{type(self).__qualname__}"}

    def mesh_state(self, meshes: Any) -> Any:
        """``meshes`` in a compact form for the stored reference (default: trimesh
        vertices and faces as float32 / int64 tensors)."""
        import torch
        return [{"vertices": torch.from_numpy(np.asarray(m.vertices, dtype=np.float32)),
                 "faces": torch.from_numpy(np.asarray(m.faces, dtype=np.int64))} for m in meshes]

    def mesh_from_state(self, state: Any) -> Any:
        import trimesh
        return [trimesh.Trimesh(vertices=d["vertices"].numpy(), faces=d["faces"].numpy(), process=False)
                for d in state]

    def warmup(self, payload: Any, steps: Optional[int]) -> None:
        """An untimed run before the first timed one (no cold start in the table)."""
        self.run(payload, steps=steps, seed=0, recipe=None)

    def mesh_scores(self, meshes: Any, ref: Any, tau: float) -> Dict[str, np.ndarray]:
        """Per input: ``chamfer``, ``fscore`` (at ``tau``) and ``iou`` of ``meshes`` vs ``ref``
        (:func:`hicache3d.mesh.compare_meshes`, each normalised to the unit cube)."""
        from .mesh import compare_meshes
        rows = [compare_meshes(a, b, tau=tau) for a, b in zip(meshes, ref)]
        return {k: np.array([r[k] for r in rows]) for k in ("chamfer", "fscore", "iou")}

    @contextlib.contextmanager
    def settings(self, recipe: Optional[Recipe]) -> Iterator[Optional[Any]]:
        """``with self.settings(recipe) as acc``: accelerated with ``recipe`` (``acc`` its
        handle), or really uncached for ``None``."""
        from .api import accelerate
        from .patching import uncached
        if recipe is None:
            with uncached():
                yield None
        else:
            with accelerate(self.target(), recipe) as acc:
                yield acc


def _is_sparse(x: Any) -> bool:
    import torch
    if isinstance(x, dict):
        return set(x) == {"coords", "feats"}
    return not isinstance(x, torch.Tensor) and hasattr(x, "feats") and hasattr(x, "coords")


def latent_state(x: Any) -> Any:
    """A latent as tensors only, on the CPU (what the stored reference holds, loaded back
    with ``weights_only``): a sparse tensor becomes ``{"coords": ..., "feats": ...}``."""
    import torch
    if _is_sparse(x):
        x = x if isinstance(x, dict) else {"coords": x.coords, "feats": x.feats}
        return {k: x[k].detach().cpu().clone() for k in ("coords", "feats")}
    if isinstance(x, dict):
        return {k: latent_state(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [latent_state(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    raise TypeError(f"cannot store a {type(x).__name__} latent")


def _sparse_terms(a: Any, b: Any):
    """``(|a - b|^2, |b|^2)`` of two sparse latents, each a field that is zero outside its
    coordinates: on the same coordinates feature by feature; on other coordinates (a
    sampler upstream changed the structure) over their union, where a voxel only one of
    them has counts with its whole feature."""
    import torch
    ga = a if isinstance(a, dict) else {"coords": a.coords, "feats": a.feats}
    gb = b if isinstance(b, dict) else {"coords": b.coords, "feats": b.feats}
    ca, cb = ga["coords"].long().cpu(), gb["coords"].long().cpu()
    fa, fb = ga["feats"].double().cpu(), gb["feats"].double().cpu()
    fa, fb = fa.reshape(len(fa), -1), fb.reshape(len(fb), -1)
    if fa.shape[1] != fb.shape[1] or ca.shape[1:] != cb.shape[1:]:
        return None
    if ca.shape == cb.shape and torch.equal(ca, cb):
        return float((fa - fb).pow(2).sum()), float(fb.pow(2).sum())
    _, inv = torch.unique(torch.cat([ca, cb]), dim=0, return_inverse=True)
    n = int(inv.max()) + 1 if len(inv) else 0
    da = torch.zeros(n, fa.shape[1], dtype=torch.float64).index_add_(0, inv[:len(ca)], fa)
    db = torch.zeros(n, fb.shape[1], dtype=torch.float64).index_add_(0, inv[len(ca):], fb)
    return float((da - db).pow(2).sum()), float(fb.pow(2).sum())


def relative_l2(a: Any, b: Any) -> Optional[float]:
    """``|a - b| / |b|`` over every tensor of a latent (tensor, sparse tensor with
    ``.coords`` / ``.feats`` or its :func:`latent_state`, dict/list/tuple of them).  Sparse
    latents on other coordinates are compared as fields that are zero outside their
    coordinates (see :func:`_sparse_terms`); ``None`` where the two do not have the same
    structure otherwise (other keys, other dense shapes, other channels)."""
    import torch

    def terms(x, y):
        if _is_sparse(x) or _is_sparse(y):
            t = _sparse_terms(x, y) if _is_sparse(x) and _is_sparse(y) else None
            return None if t is None else [t]
        if hasattr(x, "feats") and not isinstance(x, torch.Tensor):
            x = x.feats
        if hasattr(y, "feats") and not isinstance(y, torch.Tensor):
            y = y.feats
        if isinstance(x, dict) or isinstance(y, dict):
            if not (isinstance(x, dict) and isinstance(y, dict)) or set(x) != set(y):
                return None
            out = []
            for k in sorted(x):
                t = terms(x[k], y[k])
                if t is None:
                    return None
                out += t
            return out
        if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
            if not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple))) or len(x) != len(y):
                return None
            out = []
            for u, v in zip(x, y):
                t = terms(u, v)
                if t is None:
                    return None
                out += t
            return out
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return None
            return [(float((x.double() - y.double()).pow(2).sum()), float(y.double().pow(2).sum()))]
        bad = y if isinstance(x, torch.Tensor) else x
        raise TypeError(f"cannot measure the drift of a {type(bad).__name__} latent")

    ts = terms(a, b)
    if ts is None:
        return None
    num, den = sum(t[0] for t in ts), sum(t[1] for t in ts)
    if den == 0.0:
        return 0.0 if num == 0.0 else None
    return (num / den) ** 0.5


class BundledPipeline(Pipeline):
    """The bundled generator: a batch of conditions per run, latent of the
    ``sparse_structure`` site, occupancy grids as the mesh (scored in the grid's fixed
    unit-cube frame by :func:`hicache3d.bundled.metrics.batch_metrics`)."""

    model = "bundled"
    has_mesh = True

    def __init__(self, weights: Optional[str] = None, device: Optional[str] = None, gen=None):
        super().__init__()
        if gen is None:
            from .generate import _load_bundled
            gen = _load_bundled(weights, device or "cpu")
        self.gen = gen
        self.weights = str(weights) if weights else None
        self.default_steps = int(gen.sampling["steps"])

    def target(self):
        return self.gen

    def prepare(self, images: Sequence[Path]):
        import torch

        from .bundled import shapes
        from .generate import load_image
        conds = []
        for p in images:
            try:
                conds.append(shapes.image_to_condition(load_image(p)))
            except ValueError as e:
                raise GenerateError(f"{p}: {str(e).split(': ', 1)[-1]}") from None
        return torch.stack(conds).to(self.gen.device)

    def held_out(self, n: int):
        """``n`` held-out shapes of the bundled data: conditions, true occupancy, names."""
        from .bundled import shapes
        occ, cond = shapes.make_batch("held_out", list(range(n)))
        return cond.to(self.gen.device), occ, [f"held_out/{i}" for i in range(n)]

    def warmup(self, payload, steps):
        self.gen(payload[:1], steps=2)

    def run(self, payload, *, steps, seed, recipe, per_item: bool = False):
        """One batched run; ``per_item``: one run per condition (as ``hicache3d generate``
        runs, so an adaptive schedule decides for each shape alone), each with its slice of
        the batch's noise, so the samples are those of the batched run."""
        with self.settings(recipe) as acc:
            t0 = time.perf_counter()
            run = self.gen.per_item if per_item else self.gen
            out = run(payload, steps=steps, seed=seed)
            seconds = time.perf_counter() - t0
        return Output({"sparse_structure": list(out.latent)}, out.occupancy, int(out.network_forwards),
                      seconds, acc.stats if acc is not None else {})

    def identity(self):
        return {**super().identity(), "weights": self.weights, "sampling": dict(self.gen.sampling)}

    def mesh_state(self, meshes):
        return meshes

    def mesh_from_state(self, state):
        return state

    def mesh_scores(self, meshes, ref, tau):
        from .bundled.metrics import batch_metrics
        m = batch_metrics(meshes.cpu(), ref.cpu(), tau=tau)
        return {"fscore": m["fscore"], "chamfer": m["chamfer"], "iou": m["iou"]}


class GeneratorPipeline(Pipeline):
    """An upstream generator through :class:`hicache3d.generate.Generator` (the models
    ``hicache3d generate --model`` knows): one image per call, the mesh it makes, the
    network forwards counted on the networks.

    The final latent of each site: for TRELLIS v1 / TRELLIS.2 / SAM 3D, what each site's
    sampler returned (``StageOutput.latents``, every site); for Hunyuan3D, the input of
    its decoder (``pipe.vae``, one site).  Where a decoder cannot run on this device (the
    CUDA-only mesh decoders of TRELLIS on CPU) the pipeline makes no mesh: ``has_mesh`` is
    False, ``no_mesh_reason`` says why, and the wall time is that of the run up to the
    decoder (``timing``)."""

    has_mesh = True

    def __init__(self, model: str, weights: Optional[str] = None, device: Optional[str] = None):
        from .generate import Generator
        self.gen = Generator(model, weights, device)
        self.weights = str(Path(weights).resolve()) if weights else None
        super().__init__(self.gen.recipe)
        self.no_mesh_reason: Optional[str] = None
        self.timing = "end to end"
        self.decoder = None
        if self.gen.kind == "upstream":
            unavailable = dict(getattr(getattr(self.gen.pipe, "models", None), "unavailable", None) or {})
            if unavailable:
                name, why = next(iter(unavailable.items()))
                self.has_mesh = False
                need = "mesh metrics need CUDA" if not str(self.gen.device).startswith("cuda") else "no mesh metrics"
                self.no_mesh_reason = f"{need}: decoder {name} cannot run here ({why})"
                self.timing = "sampler-only"
            return
        self.decoder = getattr(self.gen.pipe, "vae", None)
        if self.decoder is None or len(self.sites) != 1:
            raise TuneError(f"tune reads the final latent of {model} at its decoder, and this "
                            f"pipeline has none it knows; tune it in Python with a Pipeline of "
                            f"your own (hicache3d.tune_pipelines.Pipeline)")

    def target(self):
        return self.gen.upstream.target if self.gen.kind == "upstream" else self.gen.pipe

    def identity(self):
        ident = {**super().identity(), "model": self.model, "weights": self.weights}
        if self.gen.kind == "upstream":            # a CPU run (no mesh) is not a GPU run
            ident.update(device=str(self.gen.device), mesh=self.has_mesh)
        return ident

    def prepare(self, images):
        return [self.gen.prepare(Path(p)) for p in images]

    def warmup(self, payload, steps):
        self.gen.warmup()
        self.run(payload[:1], steps=steps, seed=0, recipe=None)

    def call(self, item, steps, seed):
        """One image through the generator's own pipeline: its mesh, or (upstream
        pipelines) the :class:`~hicache3d.pipelines.StageOutput` with mesh and latents."""
        return self.gen._raw(item, steps, seed, None)

    def run(self, payload, *, steps, seed, recipe):
        from .generate import count_forwards
        from .pipelines import StageOutput
        seen: List[Any] = []

        def grab(_m, args, kwargs=None):
            if args:
                seen.append(args[0].detach().clone())
        h = self.decoder.register_forward_pre_hook(grab) if self.decoder is not None else None
        meshes, stats, latents = [], {}, {s: [] for s in self.sites}
        try:
            with count_forwards(self.gen.network) as n:
                self.gen._sync()
                t0 = time.perf_counter()
                for item in payload:
                    with self.settings(recipe) as acc:
                        out = self.call(item, steps, seed)
                    if acc is not None:
                        stats = acc.stats
                    if isinstance(out, StageOutput):
                        self._check_stage(out)
                        for s in self.sites:
                            if s in out.latents:
                                latents[s].append(out.latents[s])   # stored as tensors after the timing
                        out = out.mesh
                    meshes.append(out)
                self.gen._sync()
                seconds = time.perf_counter() - t0
        finally:
            if h is not None:
                h.remove()
        if self.decoder is not None:
            if len(seen) != len(payload):
                raise TuneError(f"{self.model}: the decoder saw {len(seen)} latents for {len(payload)} "
                                f"images; cannot read the final latent")
            latents = {self.sites[0]: seen}
        latents = {s: [latent_state(x) for x in v] for s, v in latents.items() if v}
        return Output(latents, meshes if self.has_mesh else None, n["calls"], seconds, stats)

    def _check_stage(self, out) -> None:
        if self.has_mesh and out.mesh is None:
            raise TuneError(f"{self.model}: no mesh to compare ({out.reason or 'the decoder returned none'})")


_REGISTRY: Dict[str, Callable[..., Pipeline]] = {}


def register_pipeline(name: str, factory: Callable[..., Pipeline]) -> None:
    """``hicache3d tune --model NAME`` builds its pipeline with ``factory(weights=...,
    device=...)`` (``name``: a recipe name, or an adapter name for all its recipes)."""
    _REGISTRY[name] = factory


def make_pipeline(model: str, weights: Optional[str] = None, device: Optional[str] = None) -> Pipeline:
    """The pipeline of ``model``, with clear errors for an unknown or uninstalled model and
    for weights that are missing offline."""
    from .generate import default_device, unknown_model_message
    from .recipe import RecipeError, find_install, known_recipes
    if not model.endswith(".toml") and model not in known_recipes():
        raise TuneError(unknown_model_message(model))
    try:
        recipe = get_recipe(model)
    except RecipeError as e:
        raise TuneError(str(e)) from None
    device = device or default_device()
    if recipe.name == "bundled":
        return BundledPipeline(weights, device)
    if not find_install(recipe).found:
        what = recipe.package or recipe.module
        raise TuneError(f"{recipe.name}'s generator ({what}) is not installed or importable here "
                        f"(looked for {recipe.module} in this interpreter's path, the current "
                        f"directory and PYTHONPATH); install it (pip install {recipe.package}) or run "
                        f"from its source checkout" if recipe.package else
                        f"{recipe.name}'s generator ({what}) is not importable here; run from its "
                        f"source checkout or put it on PYTHONPATH")
    factory = _REGISTRY.get(recipe.name) or _REGISTRY.get(recipe.adapter)
    if factory is not None:
        return factory(weights=weights, device=device)
    try:
        return GeneratorPipeline(recipe.name, weights, device)
    except GenerateError as e:
        msg = str(e)
        if "`generate` supports" in msg:
            raise TuneError(f"no end-to-end pipeline for {recipe.name} in this version of "
                            f"hicache3d (`hicache3d generate --model` does not run it); tune it in "
                            f"Python: hicache3d.tune.tune(MyPipeline(...), images, out) with a "
                            f"hicache3d.tune_pipelines.Pipeline of your own") from None
        raise TuneError(msg) from None
