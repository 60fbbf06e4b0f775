"""The fidelity benchmark of the README: every basis, 12/25/50 steps, intervals 2-8, on
32 held-out shapes of the bundled generator.  Writes benchmarks/fidelity.{json,md,png}.

    python scripts/bench_fidelity.py            # the full sweep (about 20-40 min on 2 cores)
    python scripts/bench_fidelity.py --quick    # 8 shapes, 12 steps, intervals 3 and 6
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hicache3d.bench import run_sweep, write_reports  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        res = run_sweep(["reuse", "taylor", "hermite", "dmd", "auto"], [3, 6], [12], shapes_n=8,
                        progress=print)
        stem = "fidelity_quick"
    else:
        # reports are rewritten after every block, so an interrupted sweep keeps what it did
        res = run_sweep(["reuse", "taylor", "hermite", "dmd", "auto"], list(range(2, 9)), [12, 25, 50],
                        shapes_n=a.shapes, progress=lambda s: print(s, flush=True),
                        checkpoint=lambda r: write_reports(r, a.out, "fidelity"))
        stem = "fidelity"
    for p in write_reports(res, a.out, stem):
        print("wrote", p)


if __name__ == "__main__":
    main()
