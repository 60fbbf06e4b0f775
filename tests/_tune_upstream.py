"""``hicache3d tune`` on the tiny real-code TRELLIS.2 and SAM 3D models of upstream_harness,
run in a fresh interpreter (TRELLIS.2 imports as ``trellis`` and may share no process
with TRELLIS v1):

    python -m tests._tune_upstream FAMILY tune IMAGES OUT      # the sweep; prints RESULT {json}
    python -m tests._tune_upstream FAMILY patched IMAGES OUT   # one plain run (the in-place patch,
        # if any, accelerates it) and one really uncached; prints FORWARDS n DRIFT {site: d}

The pipelines here chain the real samplers of every site (the tiny models have no
decoders: latent drift only); an image stands for a seed (the inputs are random)."""
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from hicache3d.tune_pipelines import Output, Pipeline, relative_l2

STEPS = {"trellis2": 8, "sam3d": 8}
GRID = {"backends": ["dmd"], "schedules": ["fixed", "adaptive"], "intervals": [2], "tolerances": [1.0]}
TARGET_DRIFT = 0.1


class Holder:
    """Stands for a pipeline object: only its sampler / generator attributes matter."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def _seed(path: Path) -> int:
    return int(hashlib.sha1(Path(path).read_bytes()).hexdigest()[:6], 16) % 997


class Trellis2Tiny(Pipeline):
    model = "trellis2"
    default_steps = STEPS["trellis2"]

    def __init__(self):
        from upstream_harness import trellis2_env as E
        self.E = E
        E.activate()
        super().__init__()
        self.nets = (E.build_ss_flow(0), E.build_shape_flow(0), E.build_tex_flow(0))
        self.pipe = Holder(sparse_structure_sampler=E.make_sampler("interval"),
                           shape_slat_sampler=E.make_sampler("interval"),
                           tex_slat_sampler=E.make_sampler("interval"))

    def target(self):
        return self.pipe

    def prepare(self, images):
        return [_seed(p) for p in images]

    def raw(self, payload, steps, seed):
        E, (ss, sh, tx), p = self.E, self.nets, self.pipe
        lat = {"sparse_structure": [], "shape_slat": [], "tex_slat": []}
        with E.count_calls(ss) as a, E.count_calls(sh) as b, E.count_calls(tx) as c:
            for s in payload:
                x = E.sample_ss(p.sparse_structure_sampler, ss, steps=steps, seed=s + seed).samples
                y = E.sample_shape(p.shape_slat_sampler, sh, steps=steps, seed=s + seed).samples
                z = E.sample_tex(p.tex_slat_sampler, tx, y, steps=steps, seed=s + seed).samples
                lat["sparse_structure"].append(x.clone())
                lat["shape_slat"].append(y.feats.clone())
                lat["tex_slat"].append(z.feats.clone())
        return lat, a.n + b.n + c.n

    def run(self, payload, *, steps, seed, recipe):
        with self.settings(recipe) as acc, torch.no_grad():
            t0 = time.perf_counter()
            lat, n = self.raw(payload, steps, seed)
            dt = time.perf_counter() - t0
        return Output(lat, None, n, dt, acc.stats if acc is not None else {})


class Sam3dTiny(Pipeline):
    model = "sam3d"
    default_steps = STEPS["sam3d"]

    def __init__(self):
        from upstream_harness import sam3d_env as S
        self.S = S
        S.activate()
        super().__init__()
        self.ss, self.slat = S.build_ss_generator(0), S.build_slat_generator(0)
        self.pipe = Holder(ss_generator=self.ss, slat_generator=self.slat)

    def target(self):
        return self.pipe

    def prepare(self, images):
        return [_seed(p) for p in images]

    def raw(self, payload, steps, seed):
        S = self.S
        lat = {"sparse_structure": [], "slat": []}
        with S.count_calls(self.ss.reverse_fn.backbone) as a, S.count_calls(self.slat.reverse_fn.backbone) as b:
            for s in payload:
                x = S.generate_ss(self.ss, seed=s + seed, steps=steps)
                y = S.generate_slat(self.slat, seed=s + seed, steps=steps)
                lat["sparse_structure"].append({k: v.clone() for k, v in x.items()})
                lat["slat"].append(y.clone())
        return lat, a.n + b.n

    def run(self, payload, *, steps, seed, recipe):
        with self.settings(recipe) as acc:
            t0 = time.perf_counter()
            lat, n = self.raw(payload, steps, seed)
            dt = time.perf_counter() - t0
        return Output(lat, None, n, dt, acc.stats if acc is not None else {})


# ------------------------------------------------------------------ through the CLI and generate's pipelines
# ``hicache3d tune --model trellis|trellis2|sam3d`` on the tiny weights folders of
# tests/_upstream_pipelines.py (the real pipelines, their CPU decoder stop):
#
#   python -m tests._tune_upstream FAMILY cli TMP       # writes TMP/weights, TMP/images; prints CLI {json}
#   python -m tests._tune_upstream trellis2 cascade TMP  # a 1024-cascade folder: its unreached site
#   python -m tests._tune_upstream FAMILY generate TMP  # one plain run of generate's pipeline (the
#       # in-place patch, if any, accelerates it) and one really uncached; prints FORWARDS n n_ref DRIFT {...}

CLI_STEPS = 6
CLI_GRID = ["--backends", "dmd", "--schedules", "fixed", "--intervals", "2,3"]
CLI_TARGET_DRIFT = 0.2


def activate_family(family: str):
    """The stand-ins of ``family``'s pipeline module; returns the weights-folder writer."""
    from tests import _upstream_pipelines as P
    if family == "trellis":
        P.activate_trellis_v1()
        return P.write_trellis_v1
    if family == "trellis2":
        P.activate_trellis2()
        return P.write_trellis2
    from upstream_harness import sam3d_env as S
    S.activate()
    return P.write_sam3d


def cli_main(family: str, tmp: Path) -> None:
    import os

    from click.testing import CliRunner

    from hicache3d.cli import main as cli
    from tests import _upstream_pipelines as P
    os.environ["HF_HUB_OFFLINE"] = "1"
    write = activate_family(family)
    weights = tmp / "weights"
    if not (weights.is_dir() and any(weights.iterdir())):
        write(weights)
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    P.rgba_disc(tmp / "images" / "disc.png")
    args = ["tune", "--model", family, "--images", str(tmp / "images"), "--weights", str(weights),
            "--out", str(tmp / "tune"), "--steps", str(CLI_STEPS), "--target-drift", str(CLI_TARGET_DRIFT),
            *CLI_GRID]
    r = CliRunner().invoke(cli, args)
    tb = "".join(__import__("traceback").format_exception(*r.exc_info)) if r.exception is not None \
        and not isinstance(r.exception, SystemExit) else ""
    print("CLI " + json.dumps({"exit_code": r.exit_code, "output": r.output, "traceback": tb}))


def cascade_main(tmp: Path) -> None:
    """TRELLIS.2's 1024 cascade on CPU stops at its upsampler, before the texture sampler:
    the tune of every site, then of the sites it names."""
    import os
    import shutil

    from click.testing import CliRunner

    from hicache3d.cli import main as cli
    from tests import _upstream_pipelines as P
    os.environ["HF_HUB_OFFLINE"] = "1"
    activate_family("trellis2")
    weights = tmp / "weights"
    P.write_trellis2(weights, pipeline_type="1024_cascade")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    P.rgba_disc(tmp / "images" / "disc.png")
    base = ["tune", "--model", "trellis2", "--images", str(tmp / "images"), "--weights", str(weights),
            "--out", str(tmp / "tune"), "--steps", "4", "--backends", "dmd", "--schedules", "fixed",
            "--intervals", "2"]
    first = CliRunner().invoke(cli, base)
    second = CliRunner().invoke(cli, base + ["--sites", "sparse_structure,shape_slat"])
    print("CLI " + json.dumps([{"exit_code": r.exit_code, "output": r.output} for r in (first, second)]))


def generate_main(family: str, tmp: Path) -> None:
    import os

    import hicache3d
    from hicache3d.generate import Generator, count_forwards, latent_drift
    os.environ["HF_HUB_OFFLINE"] = "1"
    activate_family(family)
    gen = Generator(family, str(tmp / "weights"), device="cpu")
    payload = gen.prepare(tmp / "images" / "disc.png")
    with count_forwards(gen.network) as n:
        out = gen._raw(payload, CLI_STEPS, 0, None)
    with hicache3d.uncached(), count_forwards(gen.network) as n_ref:
        ref = gen._raw(payload, CLI_STEPS, 0, None)
    drift = {s: latent_drift(out.latents[s], ref.latents[s]) for s in ref.latents}
    print("FORWARDS", n["calls"], n_ref["calls"], "DRIFT " + json.dumps(drift))


def main():
    torch.set_num_threads(1)
    if sys.argv[2] == "cascade":
        return cascade_main(Path(sys.argv[3]))
    if sys.argv[2] in ("cli", "generate"):
        return (cli_main if sys.argv[2] == "cli" else generate_main)(sys.argv[1], Path(sys.argv[3]))
    family, mode, images, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    pipe = {"trellis2": Trellis2Tiny, "sam3d": Sam3dTiny}[family]()
    paths = sorted(images.iterdir())
    if mode == "tune":
        from hicache3d.tune import tune
        res = tune(pipe, paths, out, progress=False, target_drift=TARGET_DRIFT, **GRID)
        print("RESULT " + json.dumps(res))
        return
    import hicache3d
    payload = pipe.prepare(paths)
    with torch.no_grad():
        lat, n = pipe.raw(payload, pipe.default_steps, 0)
        with hicache3d.uncached():
            ref, n_ref = pipe.raw(payload, pipe.default_steps, 0)
    import numpy as np
    drift = {s: float(np.mean([relative_l2(a, b) for a, b in zip(lat[s], ref[s])])) for s in lat}
    print("FORWARDS", n, n_ref, "DRIFT " + json.dumps(drift))


if __name__ == "__main__":
    main()
