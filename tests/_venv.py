"""Throw-away environments for the in-place patching tests."""
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path


def throwaway_venv(folder: Path, extra_paths=()) -> Path:
    """A new environment (its own site-packages, so `hicache3d patch` never writes into the
    test runner's) that sees the runner's packages and ``extra_paths``; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    py = folder / "bin" / "python"
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in site.getsitepackages() if Path(p).exists()]
    line = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in outer)
    if extra_paths:
        line += "; import sys; " + "; ".join(f"sys.path.append({str(p)!r})" for p in extra_paths)
    # processed before hicache3d's own .pth (alphabetical order)
    (Path(inner) / "00outer.pth").write_text(line + "\n")
    return py


def run_py(py, code, env=None, cwd=None):
    e = {k: v for k, v in os.environ.items() if k != "HICACHE3D_DISABLE"}
    e.update(env or {})
    return subprocess.run([str(py), "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=300)
