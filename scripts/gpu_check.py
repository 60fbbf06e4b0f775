"""Checks that need a GPU (CI never runs them; a CUDA machine runs them in minutes).

1. The forecast core on CUDA tensors in float32, float16 and bfloat16, every basis,
   against the same forecast computed on the CPU (same inputs, same dtype): relative
   difference of the forecasts and the basis that served each item.
2. No host synchronisation on computed steps: a ``VelocityCache`` (every basis, the fixed
   cadence and the adaptive schedule, step times as Python floats and as CUDA tensors)
   drives a small synthetic network; every computed step runs under
   ``torch.cuda.set_sync_debug_mode("error")``.  The decision before a step (where the
   schedule may read what it needs from the device: at most one round-trip per window
   is the design) runs outside it and its synchronisations are counted.
3. The bundled generator on CUDA with every basis (fixed interval) and the adaptive
   schedule: wall clock against the network-forward ratio, measured side by side in one
   run, with computed steps again under the sync check.

    python scripts/gpu_check.py                       # on a CUDA machine, ~1-3 minutes
    python scripts/gpu_check.py --out gpu_check.json  # also write the results as JSON
    python scripts/gpu_check.py --device cpu --shapes 2 --steps 6 --dim 512
        # a dry run of the same logic on CPU tensors (CPU against CPU; no sync check)

Exit codes: 0 every check passed; 1 a check failed (printed, and in the JSON);
2 no CUDA device (nothing was checked).  ``--strict`` also fails when a wall-clock speed-up
is below ``--efficiency`` x the forward ratio (reported either way).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASES = ["reuse", "taylor", "hermite", "dmd", "auto"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# largest accepted relative difference device vs CPU, per dtype (a few units of rounding
# of the dtype, amplified by weights of order 1-4 over a handful of snapshots)
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}


# --------------------------------------------------------------------------- helpers
def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``|got - ref| / |ref|`` in float64 on the CPU (inf if ``got`` is not finite)."""
    g, r = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if g.shape != r.shape:
        raise ValueError(f"shape {tuple(g.shape)} vs {tuple(r.shape)}")
    if not torch.isfinite(g).all():
        return math.inf
    return float((g - r).norm() / r.norm().clamp_min(1e-300))


def compare(got: torch.Tensor, ref: torch.Tensor, dtype: str, labels_got: List[str],
            labels_ref: List[str]) -> Dict[str, Any]:
    """One comparison of a device forecast with the CPU one."""
    d = rel_diff(got, ref)
    ok = d <= TOLERANCE[dtype] and labels_got == labels_ref
    return {"rel_diff": d, "tolerance": TOLERANCE[dtype], "labels": labels_got,
            "labels_cpu": labels_ref, "ok": bool(ok)}


def trajectory(n: int, items: int, dim: int, seed: int = 0) -> List[torch.Tensor]:
    """``n`` smooth velocity snapshots ``[items, dim]`` (decaying and oscillating modes)."""
    g = torch.Generator().manual_seed(seed)
    modes = torch.randn(4, items, dim, generator=g, dtype=torch.float64)
    rates = torch.tensor([0.0, -0.15, -0.4, -0.05], dtype=torch.float64)
    out = []
    for k in range(n):
        t = float(k)
        coef = torch.exp(rates * t)
        coef[3] = coef[3] * math.cos(0.35 * t)
        out.append((coef[:, None, None] * modes).sum(0) + 0.5)
    return out


def sync_mode(device: torch.device, mode: str):
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (nothing on a CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def cm():
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(old)
    return cm()


@contextlib.contextmanager
def count_syncs(device: torch.device):
    """Counts synchronising CUDA calls in the block (``warn`` mode), in ``box[0]``."""
    box = [0]
    if device.type != "cuda":
        yield box
        return
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with sync_mode(device, "warn"):
            yield box
    box[0] = sum("synchroniz" in str(x.message) for x in w)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- 1. the core
def check_core(device: torch.device, dim: int, items: int = 4) -> List[Dict[str, Any]]:
    from hicache3d.forecast import make_forecaster
    snaps = trajectory(8, items, dim)
    positions = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0]          # irregular, as a cadence makes them
    queries = [8.0, 9.5, 11.0]
    out = []
    for dname, dtype in DTYPES.items():
        for b in BASES:
            row: Dict[str, Any] = {"part": "core", "basis": b, "dtype": dname, "ok": True, "queries": []}
            try:
                fc, fd = make_forecaster(b, 6), make_forecaster(b, 6)
                for p, v in zip(positions, snaps):
                    x = v.to(dtype)
                    fc.push(p, x)
                    fd.push(p, x.to(device))
                for q in queries:
                    rc = fc.predict(q)
                    lc = list(fc.last_labels)
                    rd = fd.predict(q)
                    ld = list(fd.last_labels)
                    c = compare(rd, rc, dname, ld, lc)
                    c["query"] = q
                    c["device_dtype"] = str(rd.dtype).replace("torch.", "")
                    c["device_of_result"] = rd.device.type
                    if rd.dtype != dtype or rd.device.type != device.type:
                        c["ok"] = False
                    row["queries"].append(c)
                    row["ok"] = row["ok"] and c["ok"]
            except Exception as e:                 # a crash is a failed check, reported
                row.update(ok=False, error=f"{type(e).__name__}: {e}")
            out.append(row)
    return out


# --------------------------------------------------------------------------- 2. syncs
SCHEDULES = {"fixed interval 4": dict(interval=4), "adaptive tol 0.3": dict(schedule="adaptive", tolerance=0.3)}


def drive_cache(device: torch.device, basis: str, settings: Dict[str, Any], tensor_t: bool,
                steps: int, dim: int, items: int = 4, dtype=torch.float32) -> Dict[str, Any]:
    """A synthetic sampler through a real ``VelocityCache``; computed steps under the
    sync check, decisions counted."""
    from hicache3d import CacheConfig, VelocityCache
    cache = VelocityCache(CacheConfig(backend=basis, first_enhance=3, **settings))
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(dim, dim, generator=g) / math.sqrt(dim)).to(device, dtype)
    x = torch.randn(items, dim, generator=g).to(device, dtype)
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    ts_dev = ts.to(device)
    res = {"computed": 0, "forecast": 0, "sync_errors": [], "decision_syncs": [],
           "forecast_syncs": []}
    for i in range(steps):
        t = ts_dev[i] if tensor_t else float(ts[i])
        dt = float(ts[i] - ts[i + 1])

        def net(t=t):
            tt = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
            return torch.tanh(x @ W) * (1 + tt.to(device, dtype))
        with count_syncs(device) as n_decide:
            will = cache.will_compute()
        res["decision_syncs"].append(n_decide[0])
        if will:
            try:
                with sync_mode(device, "error"):
                    v = cache.step(t, net)
            except RuntimeError as e:         # the step synchronised: the check failed
                res["sync_errors"].append(f"step {i}: {str(e).splitlines()[0]}")
                break
            res["computed"] += 1
        else:
            with count_syncs(device) as n_fc:
                v = cache.step(t, net)
            res["forecast_syncs"].append(n_fc[0])
            res["forecast"] += 1
        x = x - dt * v
    res["pattern"] = cache.stats.pattern
    windows = max(1, res["pattern"].count("C."))
    res["syncs_per_window"] = (sum(res["decision_syncs"]) + sum(res["forecast_syncs"])) / windows
    res["finite"] = bool(torch.isfinite(x).all())
    return res


def check_syncs(device: torch.device, steps: int, dim: int) -> List[Dict[str, Any]]:
    out = []
    for b in BASES:
        for sname, st in SCHEDULES.items():
            for tensor_t in (False, True):
                row = {"part": "sync", "basis": b, "schedule": sname,
                       "t": "device tensor" if tensor_t else "float"}
                try:
                    r = drive_cache(device, b, st, tensor_t, steps, dim)
                    row.update(r)
                    row["ok"] = bool(not r["sync_errors"] and r["finite"] and r["forecast"] > 0)
                except Exception as e:
                    row.update(ok=False, error=f"{type(e).__name__}: {e}")
                out.append(row)
    return out


# --------------------------------------------------------------------------- 3. generator
@contextlib.contextmanager
def sync_checked_steps(device: torch.device, log: List[str]):
    """Every computed step of every ``VelocityCache`` under the sync check (the decision
    before it outside, as in :func:`drive_cache`)."""
    from hicache3d.cache import VelocityCache
    orig = VelocityCache.step

    def step(self, t, compute, **kw):
        if kw or not self.will_compute():
            return orig(self, t, compute, **kw)
        try:
            with sync_mode(device, "error"):
                return orig(self, t, compute)
        except RuntimeError as e:
            log.append(f"step {self.step_index}: {str(e).splitlines()[0]}")
            raise
    VelocityCache.step = step
    try:
        yield
    finally:
        VelocityCache.step = orig


def check_generator(device: torch.device, shapes_n: int, steps: int, interval: int,
                    tolerance: float, efficiency: float, bases=BASES) -> List[Dict[str, Any]]:
    import hicache3d
    from hicache3d.bench import held_out, occupancy_scores
    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained(device=device)
    cond, _, _ = held_out(shapes_n)
    cond = cond.to(device)

    def timed(fn):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        return out, time.perf_counter() - t0

    gen(cond[:1], steps=2)                                    # warm-up (kernels, allocator)
    # does the network itself synchronise? (then the per-step check would blame the cache)
    net_syncs = None
    if device.type == "cuda":
        try:
            with sync_mode(device, "error"):
                gen(cond[:1], steps=1)
            net_syncs = False
        except RuntimeError:
            net_syncs = True
    ref, _ = timed(lambda: gen(cond, steps=steps))
    settings = [(b, dict(schedule="fixed", interval=interval)) for b in bases]
    settings += [(b, dict(schedule="adaptive", tolerance=tolerance)) for b in bases]
    out = []
    for b, st in settings:
        row: Dict[str, Any] = {"part": "generator", "basis": b, "steps": steps, "shapes": shapes_n,
                               "setting": (f"interval {st['interval']}" if st["schedule"] == "fixed"
                                           else f"adaptive tol {st['tolerance']:g}")}
        try:
            _, t_ref = timed(lambda: gen(cond, steps=steps))   # uncached, re-timed beside it
            with hicache3d.accelerate(gen, "bundled", backend=b, first_enhance=3, **st):
                res, t = timed(lambda: gen(cond, steps=steps))
            log: List[str] = []
            if device.type == "cuda" and not net_syncs:
                with sync_checked_steps(device, log):
                    with hicache3d.accelerate(gen, "bundled", backend=b, first_enhance=3, **st):
                        try:
                            gen(cond, steps=steps)
                        except RuntimeError:
                            pass
            fr = ref.network_forwards / max(res.network_forwards, 1)
            iou = occupancy_scores(res.occupancy, ref.occupancy)["iou"]
            row.update(seconds=t, seconds_uncached=t_ref, speedup=t_ref / t, forward_ratio=fr,
                       efficiency=(t_ref / t) / fr, meets_efficiency=(t_ref / t) >= efficiency * fr,
                       iou_mean=float(iou.mean()), iou_min=float(iou.min()), sync_errors=log,
                       network_syncs_by_itself=net_syncs)
            row["ok"] = bool(not log and math.isfinite(row["iou_mean"]))
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        out.append(row)
    return out


# --------------------------------------------------------------------------- report
def _print(rows: List[Dict[str, Any]]) -> None:
    for r in rows:
        flag = "ok  " if r.get("ok") else "FAIL"
        if r["part"] == "core":
            worst = max((q["rel_diff"] for q in r["queries"]), default=math.nan)
            print(f"{flag} core      {r['basis']:8s} {r['dtype']:9s} max rel diff vs CPU {worst:.2e} "
                  f"(tolerance {TOLERANCE[r['dtype']]:.0e})" + (f"  {r['error']}" if "error" in r else ""))
        elif r["part"] == "sync":
            extra = r.get("error") or "; ".join(r.get("sync_errors", [])[:2])
            print(f"{flag} sync      {r['basis']:8s} {r['schedule']:18s} t {r['t']:13s} "
                  f"{r.get('pattern', '')}  host syncs per window {r.get('syncs_per_window', math.nan):.1f}"
                  + (f"  {extra}" if extra else ""))
        else:
            if "error" in r:
                print(f"{flag} generator {r['basis']:8s} {r['setting']:18s} {r['error']}")
                continue
            print(f"{flag} generator {r['basis']:8s} {r['setting']:18s} {r['forward_ratio']:.2f}x fewer forwards, "
                  f"{r['speedup']:.2f}x faster (efficiency {r['efficiency']:.2f}"
                  f"{'' if r['meets_efficiency'] else ', below target'}), IoU {r['iou_mean']:.3f} "
                  f"(min {r['iou_min']:.3f})" + (f"  {'; '.join(r['sync_errors'][:2])}" if r["sync_errors"] else "")
                  + ("  (per-step sync check skipped: the uncached network path synchronises by itself)"
                     if r.get("network_syncs_by_itself") else ""))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    ap.add_argument("--dim", type=int, default=1 << 16, help="width of the synthetic velocities (default 65536)")
    ap.add_argument("--shapes", type=int, default=32, help="batch of held-out shapes for the generator (default 32)")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps of the generator runs (default 25)")
    ap.add_argument("--interval", type=int, default=4, help="fixed interval of the generator rows (default 4)")
    ap.add_argument("--tolerance", type=float, default=2.0, help="tolerance of the adaptive rows (default 2)")
    ap.add_argument("--efficiency", type=float, default=0.9,
                    help="target speed-up / forward ratio (default 0.9); failing it fails only with --strict")
    ap.add_argument("--strict", action="store_true", help="also fail when a speed-up misses --efficiency")
    ap.add_argument("--sync-steps", type=int, default=30, help="steps of each synthetic sync-check run (default 30)")
    ap.add_argument("--parts", default="core,sync,generator", help="comma list of core, sync, generator")
    ap.add_argument("--generator-bases", default=",".join(BASES),
                    help="bases of the generator rows (default: all)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("core", "sync", "generator")]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}; choose from core, sync, generator")
    gbases = [b.strip() for b in a.generator_bases.split(",") if b.strip()]
    if not gbases or any(b not in BASES for b in gbases):
        ap.error(f"--generator-bases must be drawn from {', '.join(BASES)}, got {a.generator_bases!r}")
    for name in ("dim", "shapes", "steps", "interval", "sync_steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        device = torch.device(a.device)
    except RuntimeError as e:
        ap.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False); nothing "
              "was checked.  Run it on a machine with an NVIDIA GPU, or use --device cpu for a dry "
              "run of the logic on CPU tensors.", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda[:N] or cpu, got {a.device!r}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    info = {"device": str(device), "torch": torch.__version__,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"}
    print(f"gpu_check on {info['name']} (torch {info['torch']})", flush=True)
    if "core" in parts:
        rows += check_core(device, a.dim)
        _print([r for r in rows if r["part"] == "core"])
    if "sync" in parts:
        r = check_syncs(device, a.sync_steps, min(a.dim, 4096))
        if device.type != "cuda":
            for x in r:
                x["note"] = "dry run: no sync check on a CPU"
        rows += r
        _print(r)
    if "generator" in parts:
        r = check_generator(device, a.shapes, a.steps, a.interval, a.tolerance, a.efficiency, gbases)
        rows += r
        _print(r)
    failed = [r for r in rows if not r.get("ok")]
    if a.strict:
        failed += [r for r in rows if r["part"] == "generator" and r.get("ok") and not r.get("meets_efficiency")]
    info.update(seconds=time.perf_counter() - t0, passed=not failed, rows=rows)
    if a.out:
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=1, default=float) + "\n")
        tmp.replace(a.out)
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed in {info['seconds']:.0f} s"
          + ("" if not failed else f"; {len(failed)} failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
