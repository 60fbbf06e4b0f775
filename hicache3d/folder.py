"""A folder of images -> a folder of meshes, split over processes, resumable.

``generate_folder(images, out, rank=, world_size=)`` generates this process's share of the
sorted image list (``images[rank::world_size]``): the split needs no communication, so
any pool of processes can use it.  Under a launcher (``torchrun``, ``accelerate launch``)
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` give the share and the device
(``cuda:LOCAL_RANK`` where there is CUDA, else the CPU); see :func:`launcher_env`.

Resumable: an output that exists and loads as a mesh is skipped (``overwrite=True``
regenerates it); meshes are written atomically (temporary file, then rename), and a
temporary file left by a killed run is removed before its image is redone.  Every image
appends one JSON line to ``<out>/records.jsonl`` (status, network calls made and
skipped, seconds, settings, the drift vs uncached with ``compare=True``, or the error);
:func:`write_summary` writes ``<out>/summary.md`` from the records of one run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .generate import GenerateError, Generator, list_images, load_image
from .mesh import MESH_FORMATS, MeshError, atomic_write, compare_meshes, export_mesh, load_mesh

__all__ = ["FolderResult", "ProcessGroup", "generate_folder", "launcher_env", "plan_outputs", "shard",
           "ensure_writable_folder", "write_summary", "RECORDS_NAME", "SUMMARY_NAME"]

RECORDS_NAME = "records.jsonl"
SUMMARY_NAME = "summary.md"


def launcher_env(environ: Optional[Dict[str, str]] = None) -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
    (set by ``torchrun`` and ``accelerate launch``); ``(0, 1, 0)`` without a launcher."""
    env = os.environ if environ is None else environ

    def num(name: str, default: int) -> int:
        v = env.get(name, "")
        if v.strip() == "":
            return default
        try:
            return int(v)
        except ValueError:
            raise GenerateError(f"environment variable {name}={v!r} is not an integer") from None
    world = num("WORLD_SIZE", 1)
    rank = num("RANK", 0)
    local = num("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise GenerateError(f"RANK={rank} and WORLD_SIZE={world} do not fit (0 <= RANK < WORLD_SIZE)")
    return rank, world, local


def shard(items: Sequence[Any], rank: int, world_size: int) -> List[Any]:
    """This process's share: every ``world_size``-th item from position ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise GenerateError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(items)[rank::world_size]


def plan_outputs(images: Sequence[Path], out: Path, fmt: str) -> List[Path]:
    """The output of each image (``<out>/<stem>.<fmt>``); refuses two images that would
    write the same file (``a.png`` and ``a.PNG``, or ``a.png`` and ``a.jpg``), also where
    the file system ignores case."""
    if fmt not in MESH_FORMATS:
        raise GenerateError(f"unsupported mesh format {fmt!r}; use one of {', '.join(MESH_FORMATS)}")
    targets = [out / f"{p.stem}.{fmt}" for p in images]
    seen: Dict[str, Path] = {}
    for src, dst in zip(images, targets):
        key = dst.name.lower()
        if key in seen:
            raise GenerateError(f"{seen[key].name} and {src.name} would both be written to "
                                f"{dst.name}; rename one of them")
        seen[key] = src
    return targets


def ensure_writable_folder(folder: Path, what: str = "--out") -> None:
    """Create ``folder`` if needed and check that a file can be written in it (a real
    probe: permission bits say nothing on a read-only mount, or to root)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GenerateError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hicache3d-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GenerateError(f"{what} {folder}: cannot write there ({e.strerror or e})") from None


def _valid_mesh(path: Path) -> bool:
    try:
        load_mesh(path)
        return True
    except MeshError:
        return False


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of ``target`` left by a killed run (``atomic_write`` names them
    ``.<name>.<random>.tmp``); only this image's, so other processes are not disturbed."""
    for p in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def _append_record(path: Path, record: Dict[str, Any]) -> None:
    """One JSON line, written with one ``write`` on an ``O_APPEND`` descriptor (lines of
    several processes never interleave)."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass
class FolderResult:
    """What one process did: one record per image of its share."""

    rank: int
    world_size: int
    device: str
    records: List[Dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r["status"] == status)

    @property
    def done(self) -> int:
        return self.count("done")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def failed(self) -> int:
        return self.count("failed")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def generate_folder(images, out, *, model: str = "bundled", weights: Optional[str] = None,
                    backend: Optional[str] = None, interval: Optional[int] = None,
                    steps: Optional[int] = None, seed: int = 0, fmt: str = "glb",
                    cache: bool = True, compare: bool = False, overwrite: bool = False,
                    rank: Optional[int] = None, world_size: Optional[int] = None,
                    device: Optional[str] = None, generator: Optional[Generator] = None,
                    settings: Optional[Dict[str, Any]] = None,
                    say: Optional[Callable[[str], None]] = None,
                    progress: bool = True) -> FolderResult:
    """Generate a mesh for this process's share of the images in folder ``images``,
    written to folder ``out`` (``<stem>.<fmt>``).

    ``rank`` / ``world_size`` default to the launcher's (``RANK`` / ``WORLD_SIZE``; one
    process without a launcher), ``device`` to ``cuda:LOCAL_RANK`` or the CPU;
    ``settings`` are further cache settings (as for :func:`hicache3d.accelerate`).  An
    image that cannot be read or gives no mesh is recorded as failed and the rest goes
    on.  ``say`` receives one line per image (default: standard error).  Returns this
    process's :class:`FolderResult`; build the summary of all processes with
    :func:`write_summary`."""
    from .generate import default_device
    images, out = Path(images), Path(out)
    env_rank, env_world, local = launcher_env()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if not images.is_dir():
        raise GenerateError(f"{images} is not a folder of images")
    if compare and not cache:
        raise GenerateError("compare=True compares the accelerated run with the uncached one; "
                            "it cannot be combined with cache=False")
    everything = list_images(images)
    targets = plan_outputs(everything, out, fmt)
    mine = shard(list(zip(everything, targets)), rank, world_size)
    ensure_writable_folder(out)
    device = device or (generator.device if generator is not None else default_device(local))
    result = FolderResult(rank, world_size, device)
    records_path = out / RECORDS_NAME
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    settings = dict(settings or {}, **{k: v for k, v in dict(backend=backend, interval=interval).items()
                                       if v is not None})
    base = {"rank": rank, "world_size": world_size, "device": device, "model": model,
            "settings": dict(settings, cache=cache, steps=steps, seed=seed)}

    todo = []
    for src, dst in mine:
        if not overwrite and dst.exists() and _valid_mesh(dst):
            rec = dict(base, image=src.name, output=dst.name, status="skipped",
                       reason="a valid mesh exists (overwrite to regenerate)")
            rec["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            _append_record(records_path, rec)
            result.records.append(rec)
        else:
            todo.append((src, dst))
    if todo and generator is None:
        generator = Generator(model, weights, device=device)
    if generator is not None:
        generator.warmup()

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=f"rank {rank}/{world_size}" if world_size > 1 else "images",
                   unit="image", file=sys.stderr, disable=None, position=rank if world_size > 1 else None,
                   leave=world_size == 1)
    try:
        for src, dst in todo:
            rec = dict(base, image=src.name, output=dst.name)
            try:
                _remove_stale_temporaries(dst)
                payload = generator.prepare(src, load_image(src))
                ref = generator.run(payload, steps=steps, seed=seed, cache=False) if compare else None
                res = generator.run(payload, steps=steps, seed=seed, cache=cache, settings=settings)
                if res.mesh is None:
                    raise GenerateError(f"{src}: {res.reason or 'the generator produced no surface'}")
                export_mesh(res.mesh, dst)
                rec.update(status="done", seconds=round(res.seconds, 4),
                           network_calls=res.network_calls, skipped_calls=res.skipped_calls)
                line = f"{dst}: {res.seconds:.2f} s, {res.network_calls} network calls"
                if cache:
                    line += f", {res.skipped_calls} step{'' if res.skipped_calls == 1 else 's'} skipped"
                if ref is not None:
                    m = compare_meshes(res.mesh, ref.mesh)
                    rec["uncached"] = {"seconds": round(ref.seconds, 4),
                                       "network_calls": ref.network_calls}
                    rec["drift"] = {k: m[k] for k in ("chamfer", "fscore", "iou", "tau")}
                    line += (f"; uncached {ref.seconds:.2f} s, {ref.network_calls} calls; IoU "
                             f"{m['iou']:.3f}, Chamfer {m['chamfer']:.4f}")
                say(line)
            except (GenerateError, MeshError, ValueError, RuntimeError, OSError) as e:
                msg = str(e) if str(src) in str(e) else f"{src}: {e}"
                rec.update(status="failed", error=msg)
                say(f"failed: {msg}")
            rec["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            _append_record(records_path, rec)
            result.records.append(rec)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return result


def write_summary(results: Sequence[FolderResult], out: Path) -> Path:
    """``<out>/summary.md`` for one run of one or more processes: images done, skipped
    and failed, network calls, and the speed-up where the uncached run was measured."""
    recs = [r for res in results for r in res.records]
    done = [r for r in recs if r["status"] == "done"]
    failed = [r for r in recs if r["status"] == "failed"]
    n_skip = sum(1 for r in recs if r["status"] == "skipped")
    calls = sum(r.get("network_calls", 0) for r in done)
    skipped_steps = sum(r.get("skipped_calls", 0) for r in done)
    secs = sum(r.get("seconds", 0.0) for r in done)
    lines = ["# Folder generation summary", "",
             f"{len(recs)} images over {len(results)} process(es): {len(done)} done, "
             f"{n_skip} skipped (a valid mesh existed), {len(failed)} failed.", "",
             f"Generation: {secs:.2f} s in total, {calls} network calls, {skipped_steps} "
             f"sampler steps forecast instead of computed.", ""]
    cmp = [r for r in done if "uncached" in r]
    if cmp:
        ref_s = sum(r["uncached"]["seconds"] for r in cmp)
        ref_calls = sum(r["uncached"]["network_calls"] for r in cmp)
        acc_s = sum(r["seconds"] for r in cmp)
        acc_calls = sum(r["network_calls"] for r in cmp)
        ious = [r["drift"]["iou"] for r in cmp]
        lines += [f"Speed-up vs uncached ({len(cmp)} images measured both ways): "
                  f"{ref_s / max(acc_s, 1e-9):.2f}x wall time ({ref_s:.2f} s vs {acc_s:.2f} s), "
                  f"{ref_calls / max(acc_calls, 1):.2f}x fewer network calls; voxel IoU vs "
                  f"uncached mean {sum(ious) / len(ious):.3f}, min {min(ious):.3f}.", ""]
    else:
        lines += ["Speed-up vs uncached: not measured (run with --compare).", ""]
    if failed:
        lines += ["## Failed", ""] + [f"- {r['image']}: {r['error']}" for r in failed] + [""]
    path = Path(out) / SUMMARY_NAME
    atomic_write(path, "\n".join(lines).encode("utf-8"))
    return path


class ProcessGroup:
    """The launcher's process group, used only to gather the per-process results on
    rank 0 at the end (the split itself needs no communication): gloo on the CPU, nccl
    on CUDA.  ``with ProcessGroup(rank, world, device) as pg: ... pg.gather(result)``.
    Without a launcher's rendezvous (``MASTER_ADDR``), or with one process, nothing is
    started and :meth:`gather` returns this process's result alone.  If a process dies,
    the launcher stops the others (torchrun / accelerate launch do), and the wait for the
    slowest rank is bounded by ``timeout_s`` (``HICACHE3D_GATHER_TIMEOUT``, default 24 h)."""

    def __init__(self, rank: int, world_size: int, device: str, timeout_s: Optional[float] = None):
        self.rank, self.world_size, self.device = rank, world_size, str(device)
        self.timeout_s = float(timeout_s if timeout_s is not None
                               else os.environ.get("HICACHE3D_GATHER_TIMEOUT", 86400))
        self.started = False
        self.note = ""

    def __enter__(self) -> "ProcessGroup":
        if self.world_size <= 1:
            return self
        if not os.environ.get("MASTER_ADDR"):
            self.note = ("no launcher rendezvous (MASTER_ADDR unset): the summary covers this "
                         "process's share only")
            return self
        import torch.distributed as dist
        if dist.is_available() and not dist.is_initialized():
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
            if backend == "nccl":
                import torch
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                    timeout=_dt.timedelta(seconds=self.timeout_s))
            self.started = True
        return self

    def gather(self, result: FolderResult) -> Optional[List[FolderResult]]:
        """Every process's result on rank 0 (``None`` on the others)."""
        if not self.started:
            return [result] if self.rank == 0 else None
        import torch.distributed as dist
        got: Optional[List[Any]] = [None] * self.world_size if self.rank == 0 else None
        try:
            dist.gather_object(result.as_dict(), got, dst=0)
        except Exception as e:                      # a rank gone: summarise what is known
            self.note = f"could not gather the other processes' results ({type(e).__name__})"
            return [result] if self.rank == 0 else None
        if self.rank != 0:
            return None
        return [FolderResult(**d) for d in got]

    def __exit__(self, *exc) -> None:
        if self.started:
            import torch.distributed as dist
            try:
                dist.destroy_process_group()
            except Exception:
                pass
