"""`hicache3d tune` on the bundled generator with its default grid (hermite, dmd, auto x
intervals 2-6 and tolerances 0.25-4, 25 steps) and the pattern search
(`--schedules fixed,adaptive,pattern`), on four views of examples/shape.png (the image,
mirrored, rotated by 20 and by -35 degrees and squeezed).  Writes
benchmarks/tune_bundled/{tune.json,tune.md,pareto-sparse_structure.png,settings.toml};
its per-run records go to benchmarks/tune_bundled/runs/ (not kept in git; a rerun
resumes from them).

    python scripts/tune_bundled.py            # about 5-8 min on 2 shared cores
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hicache3d.tune import tune  # noqa: E402
from hicache3d.tune_pipelines import BundledPipeline  # noqa: E402


def views(folder: Path):
    im = Image.open(ROOT / "examples" / "shape.png")
    bg = im.getpixel((0, 0))
    im.save(folder / "a.png")
    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "b.png")
    im.rotate(20, fillcolor=bg).save(folder / "c.png")
    im.rotate(-35, fillcolor=bg).resize((im.width * 3 // 4, im.height)).save(folder / "d.png")
    return sorted(folder.iterdir())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks") / "tune_bundled",
                    help="relative to the repository root")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schedules", default="fixed,adaptive,pattern")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import os
    os.chdir(ROOT)                        # the files name the folder relative to the repository
    with tempfile.TemporaryDirectory() as d:
        res = tune(BundledPipeline(), views(Path(d)), a.out, steps=25, say=print,
                   schedules=[x.strip() for x in a.schedules.split(",") if x.strip()])
    print(res["combined"]["forwards"], "of", res["reference"]["forwards"], "forwards together;",
          "wrote", a.out / "tune.md")


if __name__ == "__main__":
    main()
