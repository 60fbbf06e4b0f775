"""Helpers shared by the per-family environment modules."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

from . import install


def prepend_sys_path(path: Path) -> None:
    p = str(path)
    if p not in sys.path:
        sys.path.insert(0, p)


def reject_modules(family: str, prefixes_and_owners: dict) -> None:
    """Raise if a module of an incompatible family is already imported.

    ``prefixes_and_owners`` maps a top-level module name to a predicate on the
    imported module that is true when it belongs to the *other* family.
    """
    for mod_name, other in prefixes_and_owners.items():
        mod = sys.modules.get(mod_name)
        if mod is not None and other(mod):
            raise RuntimeError(
                f"cannot activate {family}: module {mod_name!r} from a different upstream family is already "
                f"imported in this process ({_where(mod)}). TRELLIS v1 and TRELLIS.2 are both importable "
                f"as 'trellis' and can never share one process; run each in its own subprocess."
            )


def _where(mod) -> str:
    path = getattr(mod, "__path__", None)
    if path:
        return list(path)[0]
    return getattr(mod, "__file__", None) or "?"


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    """Count calls of ``module`` (a forward pre-hook); yields a counter object.

    ``counter.n`` is the number of forward calls so far; ``counter.calls`` keeps,
    per call, the positional-argument shapes (tensors) or types (anything else).
    """

    class Counter:
        def __init__(self):
            self.n = 0
            self.calls = []

        def __repr__(self):
            return f"Counter(n={self.n})"

    counter = Counter()

    def hook(_mod, args, kwargs):
        counter.n += 1
        counter.calls.append(tuple(
            tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args
        ))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@torch.no_grad()
def rerandomize_zero_params(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> int:
    """Refill every parameter that is exactly all-zero with small random values.

    Upstream ``initialize_weights()`` methods zero the output projections and the
    adaLN modulation layers (a trained-from-scratch convention), which makes a
    freshly built network return exactly 0.  Weights get N(0, std^2) scaled for
    fan-in; biases get N(0, std^2).  Returns the number of tensors refilled.
    """
    n = 0
    for name, p in module.named_parameters():
        if p.numel() and not torch.any(p != 0):
            if p.dim() >= 2:
                fan_in = p[0].numel()
                s = 1.0 / math.sqrt(max(fan_in, 1))
            else:
                s = std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * s)
            n += 1
    return n


# install name -> (dependencies folder, package folder), for a run from a source checkout
# (see ``checkout.py``): the package is imported from the checkout, its dependencies from a
# folder that holds everything of the install but the package and its metadata
CHECKOUT: dict = {}


def use_checkout(name: str, deps: Path, package: Path) -> None:
    CHECKOUT[name] = (Path(deps), Path(package))


def ensure_installed(name: str) -> Path:
    if name in CHECKOUT:
        return CHECKOUT[name][0]
    return install.ensure(name)


def package_dir(name: str, default: Path) -> Path:
    """The package folder of install ``name``: the checkout's copy, or ``default``."""
    return CHECKOUT[name][1] if name in CHECKOUT else default


def keep_spconv_in_train_mode(model: torch.nn.Module) -> None:
    """spconv's CPU kernels reject a fused bias, which it uses in eval mode only: pin the
    conv submodules to train mode (the package's own CPU helper, which the generate
    pipelines use too)."""
    from hicache3d.pipelines._base import spconv_cpu_eval
    spconv_cpu_eval(model)


def prepare_trellis_package(name: str, family: str, env: dict) -> Path:
    """Make the install ``name`` (both TRELLIS v1 and TRELLIS.2 are packaged as ``trellis``)
    importable: refuse if the other one is already imported, put it first on ``sys.path``,
    set ``env``, and register empty ``trellis`` / ``trellis.pipelines`` packages so their
    heavy ``__init__`` (renderers, CUDA decoders) is skipped.  Returns the install folder."""
    import os

    from . import _standins
    target = ensure_installed(name)
    pkg = package_dir(name, target / "trellis")

    def is_other(mod) -> bool:
        path = list(getattr(mod, "__path__", []) or [])
        return bool(path) and Path(path[0]).resolve() != pkg.resolve()

    reject_modules(family, {"trellis": is_other})
    prepend_sys_path(target)
    os.environ.update(env)
    _standins.empty_package("trellis", pkg)
    _standins.empty_package("trellis.pipelines", pkg / "pipelines")
    return target
