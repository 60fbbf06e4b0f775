"""Start-up hook of in-place patching (imported from a one-line ``.pth`` file).

It reads ``hicache3d_inplace.json`` from the environment's site-packages and registers a
post-import hook for each patched model's module; the hook applies the patch when the
generator is imported (at once if it already was).  It must never break the
interpreter: any problem prints one warning line and the generator runs unpatched.
``HICACHE3D_DISABLE=1`` turns it off for one process.  Config values are data: nothing
is evaluated or unpickled.  This module imports only the standard library and wrapt.
"""
from __future__ import annotations

import json
import os
import sys

CONFIG_NAME = "hicache3d_inplace.json"
PTH_NAME = "hicache3d_inplace.pth"
_done = False


def warn(msg: str) -> None:
    try:
        print(f"hicache3d: {msg}", file=sys.stderr)
    except Exception:
        pass


def disabled() -> bool:
    return os.environ.get("HICACHE3D_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def site_dirs() -> list:
    import site
    import sysconfig
    dirs = []
    try:  # during .pth processing of a venv, only sys.prefix already points at the venv
        dirs.append(sysconfig.get_paths()["purelib"])
    except Exception:
        pass
    try:
        dirs += list(site.getsitepackages())
    except Exception:
        pass
    try:
        if site.ENABLE_USER_SITE:
            dirs.append(site.getusersitepackages())
    except Exception:
        pass
    return [d for i, d in enumerate(dirs) if d and d not in dirs[:i]]


def read_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ValueError("not a hicache3d in-place config (no 'models' table)")
    for name, entry in data["models"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("recipe"), str)
                and isinstance(entry.get("module"), str)):
            raise ValueError(f"entry {name!r} needs string 'recipe' and 'module'")
        for key in ("settings", "sites"):
            if not isinstance(entry.get(key, {}), dict):
                raise ValueError(f"entry {name!r}: {key!r} must be a table")
    return data


def _hook(name: str, entry: dict, path: str):
    def apply(_module) -> None:
        try:
            from .inplace import install_entry
            install_entry(name, entry)
        except Exception as e:  # never break the user's import
            warn(f"in-place patch of {name!r} ({path}) not applied: {e}; running unpatched")
    return apply


def activate() -> None:
    """Register the post-import hooks of every in-place config (once per process)."""
    global _done
    if _done:
        return
    _done = True
    if disabled():
        return
    for d in site_dirs():
        path = os.path.join(d, CONFIG_NAME)
        if not os.path.isfile(path):
            continue
        try:
            data = read_config(path)
            import wrapt
            for name, entry in data["models"].items():
                wrapt.register_post_import_hook(_hook(name, entry, path), entry["module"])
        except Exception as e:
            warn(f"ignoring broken in-place config {path}: {e}; running unpatched")
