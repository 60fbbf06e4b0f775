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
from ._io import atomic_write
from .patching import Controller
from .recipe import Recipe, RecipeError, for_module, get_recipe, version_status

__all__ = ["InPlaceError", "site_dir", "target_dir", "write_patch", "remove_patch", "read_patches",
           "install_entry", "uninstall_entry", "installed"]

PTH_LINE = ("import importlib.util as _h3; "
            "_h3.find_spec('hicache3d') and __import__('hicache3d._bootstrap').__dict__; "
            "del _h3\n")

_installed: Dict[str, Controller] = {}      # model name -> controller of its class patches


class InPlaceError(RuntimeError):
    """In-place patching cannot be done as asked."""


def site_dir(user: bool = False) -> Path:
    """The site-packages folder of the in-place files: the active environment's, or the
    user site-packages (``--user``)."""
    return Path(site.getusersitepackages() if user else sysconfig.get_paths()["purelib"])


def in_venv() -> bool:
    return sys.prefix != getattr(sys, "base_prefix", sys.prefix)


def target_dir(user: bool = False) -> Path:
    """The site-packages folder that receives the files (must be writable, and read at
    start-up by this interpreter)."""
    d = site_dir(user)
    if user and in_venv():
        raise InPlaceError(f"--user writes to the user site-packages ({d}), which this virtual "
                           f"environment ({sys.prefix}) never reads (user site-packages are off in "
                           f"a venv); run `hicache3d patch` without --user to patch this environment")
    if user and not site.ENABLE_USER_SITE:
        raise InPlaceError(f"--user writes to the user site-packages ({d}), which this interpreter "
                           f"does not read (user site-packages are disabled: python -s or "
                           f"PYTHONNOUSERSITE); run `hicache3d patch` without --user")
    probe = d
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        hint = ("activate a virtual environment (python -m venv .venv) or pass --user"
                if not user else "use a virtual environment")
        what = "permission denied" if probe == d else f"it does not exist and {probe} is not writable"
        raise InPlaceError(f"cannot write to {d}: {what}; {hint}")
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
                sites: Mapping[str, Mapping[str, Any]], force: bool, user: bool = False,
                also: Tuple[str, ...] = (), checkout: Optional[str] = None,
                settings_file: Optional[Mapping[str, Any]] = None
                ) -> Tuple[Path, Optional[Dict[str, Any]]]:
    """Record ``recipe`` (with overrides) as patched in place; returns the config path and
    the entry it replaced (``None`` when the model was not patched before).  ``also``: more
    module names to hook (the recipe's other names, when none was found at patch time).
    ``settings_file``: where the per-site settings came from (``{"path": ..., "tune":
    {...}}``, shown by ``status``; the settings themselves are in ``sites``)."""
    d = target_dir(user)
    data = _load(d)
    previous = data["models"].get(recipe.name)
    entry: Dict[str, Any] = {"recipe": recipe_ref, "module": recipe.module,
                             "settings": dict(settings), "sites": {k: dict(v) for k, v in sites.items()},
                             "force": bool(force)}
    if also:
        entry["also"] = [m for m in also if m != recipe.module]
    if checkout:
        entry["checkout"] = checkout
    if settings_file:
        entry["settings_file"] = dict(settings_file)
    data["models"][recipe.name] = entry
    _atomic_write(d / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")
    _atomic_write(d / PTH_NAME, PTH_LINE)
    return d / CONFIG_NAME, previous


def remove_patch(names: Optional[List[str]], user: bool = False) -> Tuple[List[str], List[Path]]:
    """Remove models (``None``: all); returns (removed names, files deleted)."""
    d = site_dir(user)
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
    p = site_dir(user) / CONFIG_NAME
    if not p.exists():
        return p, {}
    return p, read_config(str(p))["models"]


def install_entry(name: str, entry: Mapping[str, Any], module: Optional[str] = None) -> Controller:
    """Apply one config entry (called by the post-import hook of ``module``, one of the
    entry's module names)."""
    from .patches import adapter_class
    if name in _installed:
        return _installed[name]
    recipe = get_recipe(entry["recipe"]).with_settings(entry.get("settings", {}), entry.get("sites", {}))
    module = module or entry["module"]
    source_install = module != recipe.module      # an alternative module name
    recipe = for_module(recipe, module)
    version, ok = version_status(recipe)
    if recipe.package and version is not None and not ok and not source_install:
        msg = f"{recipe.package} {version} is outside the supported range {recipe.versions}"
        if not entry.get("force"):
            raise RecipeError(msg + " (patch with --force to try anyway)")
        print(f"hicache3d: warning: {msg}; patched anyway (--force)", file=sys.stderr)
    controller = Controller(recipe)
    adapter_class(recipe.adapter)(recipe).instrument(controller)
    _installed[name] = controller
    return controller


def installed() -> Dict[str, Controller]:
    """The entries applied in this process: model name -> controller (a copy)."""
    return dict(_installed)


def uninstall_entry(name: str) -> bool:
    """Undo :func:`install_entry` in this process: the classes are restored exactly and a
    later ``install_entry(name, ...)`` patches afresh.  ``False`` if it was not applied."""
    controller = _installed.pop(name, None)
    if controller is None:
        return False
    controller.remove_patches()
    return True
