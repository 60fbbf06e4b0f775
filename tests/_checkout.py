"""Make ``hicache3d.patches`` / ``hicache3d.recipes`` come from the same checkout as
``hicache3d``.

The two subpackages live in the top-level ``patches/`` and ``recipes/`` folders (mapped by
``package-dir``).  When ``hicache3d`` is imported from a checkout on ``PYTHONPATH`` while
another checkout is installed in editable mode, the editable finder would serve the
subpackages of the installed one; this loads the checkout's own instead."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def use_checkout_packages() -> None:
    import hicache3d
    root = Path(hicache3d.__file__).resolve().parent.parent
    for name, folder in (("hicache3d.patches", "patches"), ("hicache3d.recipes", "recipes")):
        init = root / folder / "__init__.py"
        mod = sys.modules.get(name)
        if not init.exists() or (mod is not None and Path(mod.__file__).resolve() == init.resolve()):
            continue
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(hicache3d, folder, mod)
