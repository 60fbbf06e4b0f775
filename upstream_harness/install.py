"""Install the pinned upstream generator packages into private folders.

Each family gets its own ``--target`` folder under ``<repo>/.upstream/<name>/``
(git-ignored), so that packages which cannot share a process (TRELLIS v1 and
TRELLIS.2 are both importable as ``trellis``) never meet on one ``sys.path``,
and so that nothing is added to the interpreter's own site-packages.

Everything is installed with ``pip install --no-deps``: the upstream wheels
declare heavy or bogus requirements (CUDA extensions, a ``pytorch`` package,
renderers) that their samplers never import.  The lists below name only what
the sampler/pipeline code paths exercised by ``upstream_harness`` really import.
torch itself is never installed here; it must already be importable.

Usage::

    from upstream_harness.install import ensure
    path = ensure("hy3dgen")          # idempotent, ~instant when up to date

    python -m upstream_harness.install all        # what CI runs once
    python -m upstream_harness.install trellis sam3d --force
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_ROOT = REPO_ROOT / ".upstream"
STAMP_NAME = ".install-stamp.json"
# Bump when the install procedure changes in a way the package list does not show.
LAYOUT_VERSION = 1

NAMES = ("hy3dgen", "trellis", "trellis2", "sam3d")


def _torchvision_spec() -> str:
    """The torchvision release built against the torch that is importable.

    torchvision 0.N pairs with torch 2.(N-15) (0.28 <-> 2.13).  PyPI's
    torchvision wheels for Linux are CUDA builds, importable on a CPU-only torch
    once the ``torchvision::nms`` schema exists (see ``_standins``).
    """
    import torch

    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if major != 2:
        raise RuntimeError(f"unsupported torch {torch.__version__}: expected torch 2.x")
    return f"torchvision==0.{minor + 15}.*"


# Pure-python (or plain-wheel) helpers shared by several families.
_REQUESTS = [
    "requests==2.34.2",
    "urllib3==2.8.0",
    "charset-normalizer==3.5.2",
    "certifi==2026.10.19.post1",
]
# The plain ``spconv`` wheel is the CPU build; the rest is what ``import spconv`` pulls in.
_SPCONV = [
    "spconv==2.3.8",
    "cumm==0.7.11",
    "pccm==0.4.16",
    "ccimport==0.4.4",
    "pybind11==3.1.0",
    "fire==0.7.1",
    "termcolor==3.3.0",
    "lark==1.3.1",
    "portalocker==4.4.2",
    "ninja==1.13.2",
]
_TRANSFORMERS = [
    "transformers==5.24.0",
    # transformers 5 fails at import time without tokenizers installed.
    "tokenizers==0.23.3",
    "regex==2026.11.19",
]


def _specs() -> dict[str, list[str]]:
    tv = _torchvision_spec()
    return {
        # Hunyuan3D-2 (mini / turbo) shape pipeline.
        "hy3dgen": [
            "hy3dgen==2.0.2",
            "diffusers==0.42.1",  # scheduler base classes, randn_tensor
            *_TRANSFORMERS,  # Dinov2Model for the image conditioner
            tv,  # torchvision.transforms in the conditioner
            "einops==0.8.2",
            "scikit-image==0.26.0",  # marching cubes (no scipy needed for it)
            "lazy-loader==0.6",
            "opencv-python-headless==4.13.0.92",  # image preprocessor
            "pillow==12.3.0",
            *_REQUESTS,  # imported (and version-checked) by diffusers
        ],
        # TRELLIS v1 (package trellis-3d-ms ships trellis/modules, trellis-3d does not).
        "trellis": [
            "trellis-3d-ms==0.1.0",
            "easydict==1.14",
            # SparseTensor is a wrapper around spconv.pytorch.SparseConvTensor.
            *_SPCONV,
        ],
        # TRELLIS.2, vendored by trellis-3d-python under the import name ``trellis``.
        "trellis2": [
            "trellis-3d-python==0.1.30",
            "easydict==1.14",  # the samplers return EasyDicts
        ],
        # SAM 3D Objects, vendored by sam3d under sam3d/third_party/meta.
        "sam3d": [
            "sam3d==0.1.2",
            "optree==0.20.0",  # pytree maps over the dict latents
            "astor==0.8.1",  # imported by sam3d_objects.data.utils
            "loguru==0.7.3",
            "omegaconf==2.3.0",  # imported by the multi-modal sparse-structure flow
            "antlr4-python3-runtime==4.9.3",
            *_SPCONV,  # the structured-latent stage uses spconv SparseTensors and convs
        ],
    }


# Modules the families need that normally come with the project's own
# environment (hicache3d / huggingface_hub dependencies).  When one is missing
# from the running interpreter it is installed into the family folder too.
_BASE_MODULES = {
    "numpy": "numpy",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "safetensors": "safetensors>=0.8.0",
    "trimesh": "trimesh",
    "huggingface_hub": "huggingface_hub>=1.32,<3",
    "filelock": "filelock",
    "packaging": "packaging",
    "idna": "idna",
}
_BASE_NEEDS = {
    "hy3dgen": ["numpy", "yaml", "tqdm", "safetensors", "trimesh", "huggingface_hub", "filelock",
                "packaging", "idna"],
    "trellis": ["numpy", "tqdm"],
    "trellis2": ["numpy", "tqdm"],
    "sam3d": ["numpy", "yaml"],
}


class UpstreamInstallError(RuntimeError):
    """pip could not install one of the pinned upstream packages."""


def target_dir(name: str) -> Path:
    _check_name(name)
    return UPSTREAM_ROOT / name


def requirements(name: str) -> list[str]:
    """The exact pip requirement list installed for ``name``."""
    _check_name(name)
    reqs = list(_specs()[name])
    for mod in _BASE_NEEDS[name]:
        if importlib.util.find_spec(mod) is None:
            reqs.append(_BASE_MODULES[mod])
    return reqs


def _stamp_payload(name: str) -> dict:
    import torch

    return {
        "name": name,
        "layout": LAYOUT_VERSION,
        "requirements": requirements(name),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
    }


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown upstream family {name!r}; expected one of {', '.join(NAMES)}")


def _read_stamp(target: Path):
    try:
        return json.loads((target / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_installed(name: str) -> bool:
    return _read_stamp(target_dir(name)) == _stamp_payload(name)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock on ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            import msvcrt

            while True:
                try:
                    msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(0.5)
            try:
                yield
            finally:
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _pip(target: Path, reqs: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "pip", "install",
        "--no-deps", "--target", str(target),
        "--disable-pip-version-check", "--no-input", "--prefer-binary",
        *reqs,
    ]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _fail(name: str, reqs: list[str], scratch: Path, proc: subprocess.CompletedProcess):
    # Find which requirement fails on its own, so the message can name it.
    culprit = None
    for req in reqs:
        one = scratch.parent / (scratch.name + "-probe")
        shutil.rmtree(one, ignore_errors=True)
        try:
            if _pip(one, [req]).returncode != 0:
                culprit = req
                break
        finally:
            shutil.rmtree(one, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    tail = "\n".join(errors or lines[-15:])
    which = f"package {culprit!r}" if culprit else f"one of {reqs}"
    raise UpstreamInstallError(
        f"installing upstream family {name!r} failed at {which}.\n"
        f"The pinned packages are downloaded from PyPI (https://pypi.org), which must be reachable "
        f"from this machine (or configure a pip mirror via PIP_INDEX_URL).\n"
        f"pip said:\n{tail}"
    )


def ensure(name: str, *, force: bool = False, quiet: bool = True) -> Path:
    """Make sure the pinned packages of ``name`` are installed; return their folder.

    Idempotent: when the stamp file in the folder matches the requested spec,
    returns at once.  Safe to call from several processes at the same time
    (an exclusive file lock serialises installs; the folder is built under a
    temporary name and renamed into place, so readers never see half of it).
    """
    target = target_dir(name)
    payload = _stamp_payload(name)
    if not force and _read_stamp(target) == payload:
        return target
    with _file_lock(UPSTREAM_ROOT / f".{name}.lock"):
        if not force and _read_stamp(target) == payload:
            return target  # someone else finished it while we waited
        scratch = UPSTREAM_ROOT / f".{name}.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        reqs = payload["requirements"]
        if not quiet:
            print(f"[upstream] installing {name}: {' '.join(reqs)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = _pip(scratch, reqs)
        if proc.returncode != 0:
            try:
                _fail(name, reqs, scratch, proc)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        (scratch / STAMP_NAME).write_text(json.dumps(payload, indent=1) + "\n")
        old = None
        if target.exists():
            old = UPSTREAM_ROOT / f".{name}.old-{os.getpid()}"
            target.rename(old)
        scratch.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if not quiet:
            print(f"[upstream] {name} ready in {time.monotonic() - t0:.1f}s "
                  f"({_size_mb(target):.0f} MB) at {target}", file=sys.stderr, flush=True)
    return target


def _size_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m upstream_harness.install",
        description="Install the pinned upstream generators used by upstream_harness.",
    )
    parser.add_argument("names", nargs="+", help=f"'all' or some of: {', '.join(NAMES)}")
    parser.add_argument("--force", action="store_true", help="reinstall even when up to date")
    args = parser.parse_args(argv)
    names = list(NAMES) if "all" in args.names else args.names
    for name in names:
        _check_name(name)
    for name in names:
        t0 = time.monotonic()
        path = ensure(name, force=args.force, quiet=False)
        print(f"{name}: {path} ({_size_mb(path):.0f} MB, {time.monotonic() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
