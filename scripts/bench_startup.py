"""Interpreter start-up cost of in-place patching, for every Python process of a patched
environment.

In a throw-away virtual environment that sees this checkout (editable install), the time
of ``python -c pass`` is measured side by side, interleaved, in three states: nothing
patched, patched (``hicache3d patch --model trellis``; the generator is never imported
by ``pass``) and patched with ``HICACHE3D_DISABLE=1``.  Also recorded: which heavy
modules a patched ``pass`` process has imported (none is the goal: the hook imports wrapt
and the engine only when the generator's package is imported).

Writes ``benchmarks/startup.json`` and replaces the start-up section of
``benchmarks/overhead.md`` (between its markers; the rest of the file is left alone).

    python scripts/bench_startup.py [--reps 41]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"
HEAVY = ("wrapt", "torch", "numpy", "hicache3d.patching", "hicache3d.inplace", "hicache3d.recipe")


def make_venv(folder: Path) -> Path:
    """A venv that sees this interpreter's site-packages (where hicache3d is installed)."""
    import site
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    py = folder / "bin" / "python"
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in site.getsitepackages() if Path(p).exists()]
    (Path(inner) / "00outer.pth").write_text("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in outer) + "\n")
    return py


def once(py: Path, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(py), "-c", "pass"], env=env, check=True)
    return time.perf_counter() - t0


def main(reps: int) -> dict:
    from tqdm import tqdm
    env = {k: v for k, v in os.environ.items() if k not in ("HICACHE3D_DISABLE", "PYTHONPATH")}
    off = dict(env, HICACHE3D_DISABLE="1")
    with tempfile.TemporaryDirectory() as tmp:
        py = make_venv(Path(tmp) / "venv")
        cli = [str(py), "-m", "hicache3d"]
        for _ in range(3):
            once(py, env)                                    # warm the file cache
        times = {"unpatched": [], "patched": [], "patched_disabled": []}
        for _ in tqdm(range(reps), desc="start-up (unpatched)", file=sys.stderr):
            times["unpatched"].append(once(py, env))
        subprocess.run(cli + ["patch", "--model", "trellis"], env=env, check=True, capture_output=True)
        try:
            for _ in tqdm(range(reps), desc="start-up (patched / disabled)", file=sys.stderr):
                times["patched"].append(once(py, env))
                times["patched_disabled"].append(once(py, off))
            probe = "import sys; print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,)
            loaded = subprocess.run([str(py), "-c", probe], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
        finally:
            subprocess.run(cli + ["unpatch", "--all"], env=env, check=True, capture_output=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "python": sys.version.split()[0],
        "reps": reps,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "patched_minus_disabled_s": round(med["patched"] - med["patched_disabled"], 4),
        "patched_vs_disabled": round(med["patched"] / med["patched_disabled"], 3),
        "heavy_modules_imported_by_a_patched_process": loaded,
    }


def write(res: dict) -> None:
    bench = ROOT / "benchmarks"
    bench.mkdir(exist_ok=True)
    from hicache3d._io import atomic_write
    atomic_write(bench / "startup.json", (json.dumps(res, indent=2) + "\n").encode())
    m = res["median_s"]
    section = "\n".join([
        BEGIN,
        "## Interpreter start-up while patched",
        "",
        f"`python -c pass` in a patched environment (`hicache3d patch --model trellis`; the "
        f"generator is not imported), median of {res['reps']} interleaved runs, Python {res['python']} "
        f"(`scripts/bench_startup.py`, also `benchmarks/startup.json`):",
        "",
        "| state | start-up |",
        "|---|---|",
        f"| nothing patched | {m['unpatched'] * 1000:.1f} ms |",
        f"| patched | {m['patched'] * 1000:.1f} ms |",
        f"| patched, `HICACHE3D_DISABLE=1` | {m['patched_disabled'] * 1000:.1f} ms |",
        "",
        f"Patched minus disabled: {res['patched_minus_disabled_s'] * 1000:+.1f} ms "
        f"({res['patched_vs_disabled']:.2f}x). Heavy modules a patched process has imported before "
        f"its generator: {', '.join(res['heavy_modules_imported_by_a_patched_process']) or 'none'}. "
        "The start-up hook reads the config and leaves one finder on `sys.meta_path`; wrapt "
        "(which alone costs more than the rest of start-up) and the engine are imported when "
        "the generator's package is first imported.",
        END,
    ])
    md = bench / "overhead.md"
    text = md.read_text() if md.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write(md, text.encode())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=41, help="interleaved runs per state (default 41)")
    args = ap.parse_args()
    res = main(args.reps)
    write(res)
    print(json.dumps(res, indent=2))
