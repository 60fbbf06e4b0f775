"""Source-checkout layouts of the upstream generators.

Most users run TRELLIS, TRELLIS.2, Hunyuan3D-2.1, SAM 3D and Fast-SAM3D from a ``git
clone``: the package folder sits in the directory they stand in, with no distribution
metadata.  :func:`make` builds that layout from the real code installed in
``.upstream/<install>`` (copied; the install itself is never touched): ``checkout/<module>``
holds the package under the name its repository uses, ``deps/`` links everything else of
the install (the dependencies) but the package and its ``*.dist-info``.

In the process that runs from the checkout, :func:`use` points the family's environment
helpers at it before they are used.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Tuple

from . import _common, install

# case -> (install name, package path inside the install, module name in the checkout,
#          distribution metadata left out)
LAYOUTS = {
    "trellis": ("trellis", "trellis", "trellis", "trellis_3d_ms-"),
    "trellis2": ("trellis2", "trellis", "trellis", "trellis_3d_python-"),
    "trellis2-as-trellis2": ("trellis2", "trellis", "trellis2", "trellis_3d_python-"),
    "sam3d": ("sam3d", "sam3d/third_party/meta/sam3d_objects", "sam3d_objects", "sam3d-"),
    "fast-sam3d": ("sam3d", "sam3d/third_party/meta/sam3d_objects", "sam3d_objects", "sam3d-"),
    # the install itself serves as the dependencies folder (OpenCV's loader refuses a
    # linked copy of itself); it holds no metadata of hy3dshape, the 2.1 package
    "hunyuan3d-2.1": ("hy3dgen", "hy3dgen/shapegen", "hy3dshape", None),
}


def make(case: str, dest: Path) -> Tuple[Path, Path]:
    """Build the checkout layout of ``case`` under ``dest``; returns ``(checkout, deps)``."""
    name, src, module, dist = LAYOUTS[case]
    root = install.ensure(name)
    checkout, deps = Path(dest) / "checkout", Path(dest) / "deps"
    shutil.copytree(root / src, checkout / module, ignore=shutil.ignore_patterns("__pycache__"))
    if dist is None:
        return checkout, root
    deps.mkdir(parents=True)
    skip = {src.split("/")[0], "bin", install.STAMP_NAME}
    for entry in root.iterdir():
        if entry.name in skip or (entry.name.startswith(dist) and entry.name.endswith(".dist-info")):
            continue
        (deps / entry.name).symlink_to(entry)
    return checkout, deps


def use(case: str, checkout: Path, deps: Path) -> None:
    """Make the environment helpers of ``case`` import the package from ``checkout``."""
    name, _, module, _ = LAYOUTS[case]
    _common.use_checkout(name, deps, Path(checkout) / module)
    if module == "trellis2":
        _serve_trellis2_as_trellis(Path(checkout) / module, deps)


def _serve_trellis2_as_trellis(pkg: Path, deps: Path) -> None:
    """TRELLIS.2's repository names its package ``trellis2``; the helpers import it as
    ``trellis`` (its PyPI name).  Import the modules they use under ``trellis2`` (which is
    what the in-place hook watches), then serve the same module objects as ``trellis``."""
    import os

    from . import _standins, trellis2_env
    _common.prepend_sys_path(deps)
    os.environ.update(trellis2_env.ENV)
    _standins.empty_package("trellis2", pkg)
    _standins.empty_package("trellis2.pipelines", pkg / "pipelines")
    _standins.install_flash_attn()
    import trellis2.models.sparse_structure_flow  # noqa: F401
    import trellis2.models.structured_latent_flow  # noqa: F401
    import trellis2.modules.sparse as sp
    import trellis2.pipelines.samplers  # noqa: F401
    sp.SparseTensor  # noqa: B018  (resolve the lazy attribute now)
    for key in [k for k in sys.modules if k == "trellis2" or k.startswith("trellis2.")]:
        sys.modules["trellis" + key[len("trellis2"):]] = sys.modules[key]
