"""Start-up hook of in-place patching (imported from a one-line ``.pth`` file).

It reads ``hicache3d_inplace.json`` from the environment's site-packages and registers a
post-import hook for each patched model's module; the hook applies the patch when the
generator is imported (at once if it already was).  It must never break the
interpreter: any problem prints one warning line and the generator runs unpatched.
``HICACHE3D_DISABLE=1`` turns it off for one process.  Config values are data: nothing
is evaluated or unpickled.

Start-up stays cheap for every Python process of the environment: this module imports
only ``json``, ``os`` and ``sys``.  A tiny finder at the front of ``sys.meta_path`` waits
for the first import of a patched module's top-level package; only then are wrapt (its
post-import hooks do the real work; importing it costs more than the rest of start-up)
and the engine imported.
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


def modules_of(entry: dict) -> list:
    """The module names an entry patches: its module, and the other names of the same code
    recorded when none was found at patch time."""
    also = entry.get("also", [])
    names = [entry["module"]] + [m for m in (also if isinstance(also, list) else []) if isinstance(m, str)]
    return [m for i, m in enumerate(names) if m not in names[:i]]


def _hook(name: str, entry: dict, path: str, module: str):
    def apply(_module) -> None:
        try:
            from .inplace import install_entry
            install_entry(name, entry, module)
        except Exception as e:  # never break the user's import
            warn(f"in-place patch of {name!r} ({path}) not applied: {e}; running unpatched")
    return apply


class _FirstImport:
    """Meta-path finder that finds nothing: at the first import of a watched package (the
    outermost not yet imported package of a patched module) it steps aside and hands the
    hooks to wrapt (imported only then)."""

    def __init__(self) -> None:
        self.pending: dict = {}            # package name -> [(module, hook)]

    def watch(self, module: str, hook) -> None:
        parts = module.split(".")
        first = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                      if ".".join(parts[:i]) not in sys.modules), module)
        self.pending.setdefault(first, []).append((module, hook))

    def release(self, top: str) -> list:
        hooks = self.pending.pop(top, [])
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        return hooks

    def find_spec(self, fullname, path=None, target=None):
        # a watched package may be put into sys.modules without an import (a stand-in, a
        # lazy loader): any import under it counts as its first import too
        key = next((k for k in self.pending if fullname == k or fullname.startswith(k + ".")), None)
        if key is None:
            return None
        hooks = self.release(key)
        try:
            import wrapt
            for module, hook in hooks:
                wrapt.register_post_import_hook(hook, module)
        except Exception as e:
            warn(f"in-place patching unavailable ({e}); running unpatched")
            return None
        if any(module == fullname for module, _ in hooks):
            # the watched module is the one being imported: wrapt's finder (now first on
            # sys.meta_path) resolves it and calls the hook once it is loaded
            for finder in sys.meta_path:
                if type(finder).__name__ == "ImportHookFinder":
                    return finder.find_spec(fullname, path, target)
        return None                        # the import goes on; wrapt catches the module


def activate() -> None:
    """Register the post-import hooks of every in-place config (once per process)."""
    global _done
    if _done:
        return
    _done = True
    if disabled():
        return
    trigger = _FirstImport()
    for d in site_dirs():
        path = os.path.join(d, CONFIG_NAME)
        if not os.path.isfile(path):
            continue
        try:
            data = read_config(path)
            for name, entry in data["models"].items():
                for module in modules_of(entry):
                    trigger.watch(module, _hook(name, entry, path, module))
        except Exception as e:
            warn(f"ignoring broken in-place config {path}: {e}; running unpatched")
    if not trigger.pending:
        return
    already = [name for name in trigger.pending if name in sys.modules]
    if len(already) < len(trigger.pending):
        sys.meta_path.insert(0, trigger)
    for name in already:                   # imported before us: hook at once
        try:
            import wrapt
            for module, hook in trigger.release(name):
                wrapt.register_post_import_hook(hook, module)
        except Exception as e:
            warn(f"in-place patching unavailable ({e}); running unpatched")
