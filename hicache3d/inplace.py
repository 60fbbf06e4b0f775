"""In-place patching of an installed generator: the ``.pth`` + config files, and the
code that applies a config entry when the generator's module is imported."""
from __future__ import annotations

import json
import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ._bootstrap import CONFIG_NAME, PTH_NAME, read_config
from .mesh import atomic_write
from .patching import Controller
from .recipe import Recipe, RecipeError, for_module, get_recipe, version_status

__all__ = ["InPlaceError", "target_dir", "write_patch", "remove_patch", "read_patches",
           "install_entry", "inplace_controllers"]

PTH_LINE = ("import importlib.util as _h3; "
            "_h3.find_spec('hicache3d') and __import__('hicache3d._bootstrap').__dict__; "
            "del _h3\n")

inplace_controllers: Dict[str, Controller] = {}


class InPlaceError(RuntimeError):
    """In-place patching cannot be done as asked."""


def target_dir(user: bool = False) -> Path:
    """The site-packages folder that receives the files (must be writable)."""
    d = Path(site.getusersitepackages() if user else sysconfig.get_paths()["purelib"])
    probe_dir = d if d.exists() else d.parent
    if not os.access(probe_dir, os.W_OK):
        hint = ("activate a virtual environment (python -m venv .venv) or pass --user"
                if not user else "use a virtual environment")
        raise InPlaceError(f"cannot write to {d}: permission denied; {hint}")
    return d


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"))


def _load(d: Path) -> Dict[str, Any]:
    p = d / CONFIG_NAME
    if not p.exists():
        return {"format": 1, "models": {}}
    try:
        return read_config(str(p))
    except Exception as e:
        raise InPlaceError(f"{p} is broken ({e}); fix or delete it (hicache3d unpatch --all)") from None


def write_patch(recipe: Recipe, recipe_ref: str, settings: Mapping[str, Any],
                sites: Mapping[str, Mapping[str, Any]], force: bool, user: bool = False) -> Path:
    """Record ``recipe`` (with overrides) as patched in place; returns the config path."""
    d = target_dir(user)
    data = _load(d)
    data["models"][recipe.name] = {"recipe": recipe_ref, "module": recipe.module,
                                   "settings": dict(settings), "sites": {k: dict(v) for k, v in sites.items()},
                                   "force": bool(force)}
    _atomic_write(d / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")
    _atomic_write(d / PTH_NAME, PTH_LINE)
    return d / CONFIG_NAME


def remove_patch(names: Optional[List[str]], user: bool = False) -> Tuple[List[str], List[Path]]:
    """Remove models (``None``: all); returns (removed names, files deleted)."""
    d = Path(site.getusersitepackages() if user else sysconfig.get_paths()["purelib"])
    cfg, pth = d / CONFIG_NAME, d / PTH_NAME
    deleted: List[Path] = []
    if not cfg.exists():
        if pth.exists():
            pth.unlink()
            deleted.append(pth)
        return [], deleted
    try:
        data = read_config(str(cfg))
        models = data["models"]
    except Exception:
        models = {}
        names = None
    removed = list(models) if names is None else [n for n in names if n in models]
    for n in removed:
        models.pop(n, None)
    if not models:
        for p in (cfg, pth):
            if p.exists():
                p.unlink()
                deleted.append(p)
    else:
        _atomic_write(cfg, json.dumps({"format": 1, "models": models}, indent=2, sort_keys=True) + "\n")
    return removed, deleted


def read_patches(user: bool = False) -> Tuple[Path, Dict[str, Any]]:
    d = Path(site.getusersitepackages() if user else sysconfig.get_paths()["purelib"])
    p = d / CONFIG_NAME
    if not p.exists():
        return p, {}
    return p, read_config(str(p))["models"]


def install_entry(name: str, entry: Mapping[str, Any]) -> Controller:
    """Apply one config entry (called by the post-import hook)."""
    from .patches import adapter_class
    if name in inplace_controllers:
        return inplace_controllers[name]
    recipe = get_recipe(entry["recipe"]).with_settings(entry.get("settings", {}), entry.get("sites", {}))
    source_install = entry["module"] != recipe.module      # an alternative module name
    recipe = for_module(recipe, entry["module"])
    version, ok = version_status(recipe)
    if recipe.package and version is not None and not ok and not source_install:
        msg = f"{recipe.package} {version} is outside the supported range {recipe.versions}"
        if not entry.get("force"):
            raise RecipeError(msg + " (patch with --force to try anyway)")
        print(f"hicache3d: warning: {msg}; patched anyway (--force)", file=sys.stderr)
    controller = Controller(recipe, scope="class")
    adapter_class(recipe.adapter)(recipe).install_class(controller)
    inplace_controllers[name] = controller
    return controller
