"""Snapshot history: leaf buffers, the float64 Gram matrix, and the weighted-sum kernel.

Every forecast basis produces weights ``w`` over the stored snapshots; the forecast is
``sum_j w_j V_j``.  This module owns the only two passes over the (large) velocity data:

* :meth:`SnapshotStore.push` copies a new snapshot into a preallocated ring buffer; the
  first forecast after it (:meth:`SnapshotStore.finalize`) updates the Gram matrix
  ``G_ij = <V_i, V_j>`` per batch item with one read of the history (O(d n)).  On the
  host a basis that fits nothing asks only for the new snapshot's norm, and the rest of
  the update waits for the first :meth:`SnapshotStore.gram`.
* :meth:`SnapshotStore.combine` evaluates ``sum_j w_j V_j`` with one read of the history.

Leaves are stored as ``[rows, capacity, cols]``; a row belongs to one batch item (a dense
batch axis: row = item; a sparse tensor: rows are points, item = ``coords[:, 0]``; no
batching: a single row).  Items never mix: each has its own Gram matrix and weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..tree import TreeSpec, flatten, unflatten

__all__ = ["SnapshotStore", "PushResult"]

# elements per chunk (rows x slots x columns) when data is up-cast on the fly: keeps the
# temporaries cache-sized and the extra memory a small fraction of the history.  A budget
# in columns alone made a batch of 32 items up-cast 50 MB per chunk (8x slower)
_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK = 1024
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _chunk_columns(rows: int, cap: int, cols: int) -> int:
    return min(cols, max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(1, rows * cap)))


def _defer_products(device: torch.device) -> bool:
    """Whether the products of a new snapshot with the others may wait for their first use:
    on the host, where waiting costs nothing; a device makes them at once, in the same
    transfer as the norms (one round trip per window)."""
    return device.type == "cpu"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Leaf:
    buf: torch.Tensor                 # [rows, cap, cols], working dtype
    shape: Tuple[int, ...]            # original leaf shape
    batch_dim: Optional[int]          # dense batch axis (moved to the front), or None
    row_items: Optional[torch.Tensor]  # sparse: item index per row (long), else None
    amax: torch.Tensor                # per slot max |value| (overflow guard for fp16/bf16), on
                                      # the data's device: pushes never wait for the host
    amax_host: np.ndarray             # its copy on the host, brought up to date by finalize()


@dataclass(frozen=True)
class PushResult:
    restarted: Optional[str]          # why the history was restarted, or None


class SnapshotStore:
    """A bounded history of velocity snapshots with per-item Gram matrices."""

    def __init__(self, capacity: int, batch_dim: Optional[int] = 0):
        if capacity < 1:
            raise ValueError(f"history must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.batch_dim = batch_dim
        self.clear()

    # ------------------------------------------------------------------ state
    def restart(self) -> None:
        """Forget every snapshot but keep the allocated buffers: a new run of the same
        sampler reuses them (its first push checks that the structure still matches)."""
        if self.spec is None:
            return self.clear()
        self._order = []
        self._pending = set()
        self._cross = set()
        self.version += 1

    def clear(self) -> None:
        self.spec: Optional[TreeSpec] = None
        self._leaves: List[_Leaf] = []
        self._order: List[int] = []            # slots, oldest .. newest
        self._times: List[float] = []          # position of each slot's snapshot
        self._gram: Optional[np.ndarray] = None  # [items, cap, cap] float64, slot-indexed
        self.items = 1
        self._pending: set = set()
        self._cross: set = set()                 # slots whose products with the others wait
        self.version = getattr(self, "version", 0) + 1   # bumps on every push / clear
        self.gram_eps = float(np.finfo(np.float64).eps)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def times(self) -> np.ndarray:
        return np.asarray([self._times[s] for s in self._order], dtype=np.float64)

    def gram(self) -> np.ndarray:
        """Gram matrices ``[items, n, n]`` in float64, oldest snapshot first (call
        :meth:`finalize` first; products it left out are made now)."""
        if self._pending:
            # their slots still hold an evicted snapshot's products (or none): a matrix
            # made now would be silently wrong, and cached by whoever asked for it
            raise RuntimeError("SnapshotStore.gram() before finalize(): snapshots pushed since the "
                               "last finalize() have no products yet")
        if self._cross:
            self._update([], cross=True)          # only the products left out
        o = self._order
        return self._gram[:, o][:, :, o]

    # ------------------------------------------------------------------ layout
    def _layout(self, leaves: Sequence[torch.Tensor], spec: TreeSpec) -> Tuple[int, list]:
        """Decide the row layout of every leaf and the number of batch items."""
        infos = spec.leaves
        if self.batch_dim is None:
            return 1, [(None, None)] * len(leaves)
        dense = [i for i in infos if not i.sparse]
        sparse_items = []
        for info, tmpl in zip([i for i in infos if i.sparse], spec._templates):
            coords = getattr(tmpl, "coords", None)
            if (isinstance(coords, torch.Tensor) and coords.dim() == 2 and coords.shape[0] > 0
                    and coords.shape[0] == info.shape[0]):
                sparse_items.append(coords[:, 0].to(torch.long))
            else:
                sparse_items.append(None)
        dense_sizes = {i.shape[i.batch_dim] for i in dense if i.batch_dim is not None}
        dense_ok = all(i.batch_dim is not None for i in dense) and len(dense_sizes) <= 1
        sparse_ok = all(s is not None for s in sparse_items)
        if not (dense_ok and sparse_ok):
            return 1, [(None, None)] * len(leaves)
        n_sparse = {int(s.max().item()) + 1 for s in sparse_items}
        sizes = dense_sizes | n_sparse
        if len(dense_sizes) == 1 and n_sparse and max(n_sparse) > next(iter(dense_sizes)):
            return 1, [(None, None)] * len(leaves)
        items = max(sizes) if sizes else 1
        out, it = [], iter(sparse_items)
        for info in infos:
            if info.sparse:
                out.append((None, next(it)))
            else:
                out.append((info.batch_dim, None))
        return items, out

    @staticmethod
    def _rows_view(t: torch.Tensor, batch_dim: Optional[int], sparse: bool) -> torch.Tensor:
        t = t.detach()
        if sparse:
            return t.reshape(t.shape[0], -1)
        if batch_dim is None:
            return t.reshape(1, -1)
        return t.movedim(batch_dim, 0).reshape(t.shape[batch_dim], -1)

    def _start(self, leaves: Sequence[torch.Tensor], spec: TreeSpec) -> None:
        self.items, layout = self._layout(leaves, spec)
        self._leaves = []
        for t, info, (bd, row_items) in zip(leaves, spec.leaves, layout):
            view = self._rows_view(t, bd, info.sparse)
            buf = torch.zeros((view.shape[0], self.capacity, view.shape[1]),
                              dtype=t.dtype, device=t.device)
            self._leaves.append(_Leaf(buf, tuple(t.shape), bd,
                                      row_items.to(t.device) if row_items is not None else None,
                                      torch.zeros(self.capacity, dtype=torch.float32, device=t.device),
                                      np.zeros(self.capacity)))
        self.spec = spec
        self._order, self._times = [], [0.0] * self.capacity
        self._pending = set()
        self._cross = set()
        self._gram = np.zeros((self.items, self.capacity, self.capacity), dtype=np.float64)
        # products are accumulated in float64; the data's own rounding limits what the
        # Gram matrix can resolve
        # modes below ~sqrt(eps) of the largest are not trusted for anything but float64
        # data: velocities computed in fp32 or lower carry rounding (and TF32 / batching)
        # noise that a fit would otherwise amplify
        low = any(t.dtype != torch.float64 for t in leaves)
        self.gram_eps = float(torch.finfo(torch.float32).eps) if low else float(np.finfo(np.float64).eps)

    # ------------------------------------------------------------------ push
    def push(self, position: float, velocity: Any) -> PushResult:
        """Store a detached copy of ``velocity`` taken at ``position``."""
        leaves, spec = flatten(velocity, self.batch_dim)
        if not leaves:
            raise TypeError(f"velocity of type {type(velocity).__name__} contains no tensor")
        for t in leaves:
            if not t.is_floating_point():
                raise TypeError(f"velocity leaves must be floating point tensors, got {t.dtype}")
            if t.numel() == 0:
                raise ValueError(f"velocity leaf of shape {tuple(t.shape)} is empty: there is "
                                 "nothing to cache or forecast")
        restarted = None
        if self.spec is None:
            self._start(leaves, spec)
        elif not (spec == self.spec) or any(
                t.device != l.buf.device for t, l in zip(leaves, self._leaves)):
            # a new structure in the middle of a run restarts its history; at the start of
            # a run (buffers kept from an earlier one) it is just a new layout
            restarted = "structure_changed" if self._order else None
            self._start(leaves, spec)

        slot = self._free_slot()
        for t, leaf, info in zip(leaves, self._leaves, spec.leaves):
            leaf.buf[:, slot].copy_(self._rows_view(t, leaf.batch_dim, info.sparse))
            if t.dtype in _LOW_PRECISION:
                # stays on the device (no host round trip on a computed step)
                leaf.amax[slot] = torch.linalg.vector_norm(leaf.buf[:, slot], float("inf"),
                                                           dtype=torch.float32)
        if slot in self._order:
            self._order.remove(slot)
        self._order.append(slot)
        self._times[slot] = float(position)
        self._pending.add(slot)
        self.version += 1
        return PushResult(restarted=restarted)

    def _free_slot(self) -> int:
        """The buffer slot of the next snapshot: a free one (never used, or freed by a
        dropped snapshot), else the oldest snapshot's."""
        if len(self._order) < self.capacity:
            used = set(self._order)
            return next(s for s in range(self.capacity) if s not in used)
        return self._order[0]

    def finalize(self, cross: bool = True) -> Optional[str]:
        """Bring the Gram matrix up to date with the snapshots pushed since the last call
        (one batched product per leaf, one transfer to the host; deferred so computed steps
        only copy).  Returns ``"nonfinite_snapshot"`` if a pending snapshot was not finite:
        that snapshot alone is dropped (its slot zeroed and freed), every other one is
        kept.

        ``cross=False``: only the norms of the new snapshots (one read of each, enough for
        the finiteness check); their products with the others wait for the first
        :meth:`gram` (a basis that fits nothing reads them only to check a forecast that
        could be too large).  Data off the host always gets every product at once."""
        pend = sorted(self._pending)
        self._pending.clear()
        return self._update(pend, cross)

    def _update(self, pend: List[int], cross: bool) -> Optional[str]:
        """:meth:`finalize` of the new snapshots ``pend``; with ``cross`` also the products
        left out before."""
        if not pend and not (cross and self._cross):
            return None
        cross = cross or not all(_defer_products(l.buf.device) for l in self._leaves)
        if cross:
            cols = sorted(set(pend) | self._cross)
            self._cross = set()
            dots = self._columns(cols, diagonal=False)                 # [items, cap, p]
            diag = dots[:, cols, np.arange(len(cols))]
        else:
            cols = pend
            diag = self._columns(cols, diagonal=True)                  # [items, p]
        bad = [s for k, s in enumerate(cols) if s in pend and not np.all(np.isfinite(diag[:, k]))]
        g = self._gram
        for k, s in enumerate(cols):
            if s in bad:
                continue
            if cross:
                g[:, s, :] = dots[:, :, k]
                g[:, :, s] = dots[:, :, k]
            else:
                g[:, s, s] = diag[:, k]
                self._cross.add(s)
        if not bad:
            return None
        for s in bad:
            self._order.remove(s)
            self._cross.discard(s)
            g[:, s, :] = 0.0
            g[:, :, s] = 0.0
            for leaf in self._leaves:
                leaf.buf[:, s].zero_()                  # a weight of 0 must not meet a NaN
                leaf.amax[s] = 0.0
                leaf.amax_host[s] = 0.0
        self.version += 1
        return "nonfinite_snapshot"

    def _columns(self, slots: List[int], diagonal: bool) -> np.ndarray:
        """Products of the snapshots in ``slots`` with every slot (``[items, cap, p]``), or
        with themselves only (``diagonal``: ``[items, p]``), summed over the leaves, on the
        host in float64; the low-precision maxima come back in the same transfer."""
        dev_dots = {}
        for leaf in self._leaves:
            if diagonal:
                d = self._norms2(leaf.buf, slots)                      # [rows, p]
            else:
                d = self._dots(leaf.buf, slots)                        # [rows, cap, p]
            if leaf.row_items is not None:
                acc = torch.zeros((self.items,) + tuple(d.shape[1:]), dtype=torch.float64,
                                  device=d.device)
                acc.index_add_(0, leaf.row_items, d)
                d = acc
            elif d.shape[0] != self.items:                             # unbatched leaf
                d = d.sum(0, keepdim=True).expand((self.items,) + tuple(d.shape[1:]))
            prev = dev_dots.get(d.device)
            dev_dots[d.device] = d if prev is None else prev + d
        shape = (self.items, len(slots)) if diagonal else (self.items, self.capacity, len(slots))
        dots = np.zeros(shape, dtype=np.float64)
        low = [l for l in self._leaves if l.buf.dtype in _LOW_PRECISION]
        for dev, d in dev_dots.items():
            parts = [d.reshape(-1)] + [l.amax.to(torch.float64) for l in low if l.amax.device == dev]
            host = torch.cat(parts).cpu().numpy()
            dots += host[:d.numel()].reshape(dots.shape)
            off = d.numel()
            for l in [l for l in low if l.amax.device == dev]:
                l.amax_host = host[off:off + self.capacity].copy()
                off += self.capacity
        return dots

    @staticmethod
    def _norms2(buf: torch.Tensor, slots: List[int]) -> torch.Tensor:
        """``|buf[r, s, :]|^2`` for every row and slot in ``slots``, accumulated in float64
        (an element-wise pass: 4-7x faster than :meth:`_dots` of one slot, a batch of tiny
        matrix products)."""
        rows, cap, cols = buf.shape
        out = torch.zeros((rows, len(slots)), dtype=torch.float64, device=buf.device)
        chunk = _chunk_columns(rows, 1, cols)
        scratch = torch.empty((rows, min(cols, chunk)), dtype=torch.float64, device=buf.device)
        for k, s in enumerate(slots):
            for c0 in range(0, cols, chunk):
                blk = scratch[:, :min(cols, c0 + chunk) - c0]
                blk.copy_(buf[:, s, c0:c0 + chunk])
                out[:, k] += torch.einsum("rc,rc->r", blk, blk)
        return out

    @staticmethod
    def _dots(buf: torch.Tensor, slots: List[int]) -> torch.Tensor:
        """``<buf[r, s, :], buf[r, q, :]>`` for every row, slot s and q in ``slots``,
        accumulated in float64 (chunks of low-precision data are up-cast to fp32)."""
        rows, cap, cols = buf.shape
        idx = torch.tensor(slots, device=buf.device)
        if buf.dtype == torch.float64:
            return torch.bmm(buf, buf.index_select(1, idx).transpose(1, 2))
        out = torch.zeros((rows, cap, len(slots)), dtype=torch.float64, device=buf.device)
        # one up-cast scratch per call, reused by every chunk: a fresh float64 block per
        # chunk costs an allocation (and, on the CPU, its page faults) each time
        chunk = _chunk_columns(rows, cap, cols)
        scratch = torch.empty((rows, cap, chunk), dtype=torch.float64, device=buf.device)
        for c0 in range(0, cols, chunk):
            c1 = min(cols, c0 + chunk)
            blk = scratch[:, :, :c1 - c0]
            blk.copy_(buf[:, :, c0:c1])
            out += torch.bmm(blk, blk.index_select(1, idx).transpose(1, 2))
        return out

    # ------------------------------------------------------------------ combine
    def combine(self, weights: np.ndarray) -> Any:
        """Return ``sum_j weights[item, j] * V_j`` rebuilt into the velocity structure.

        ``weights``: ``[items, n]`` float64, oldest snapshot first.
        """
        n = len(self._order)
        weights = np.asarray(weights, dtype=np.float64).reshape(self.items, n)
        slot_w = np.zeros((self.items, self.capacity), dtype=np.float64)
        slot_w[:, self._order] = weights
        newest = self._order[-1]
        is_reuse = np.all(slot_w[:, newest] == 1.0) and np.count_nonzero(slot_w) == self.items
        out = []
        for leaf, info in zip(self._leaves, self.spec.leaves):
            buf = leaf.buf
            if is_reuse:
                rows = buf[:, newest].clone()
            else:
                rows = self._weighted_rows(buf, slot_w, leaf, self.items)
            out.append(self._from_rows(rows, leaf, info.sparse))
        return unflatten(self.spec, out)

    def max_abs_bound(self, weights: np.ndarray) -> float:
        """An upper bound of ``|sum_j w_j V_j|`` for low-precision leaves (else 0)."""
        slot_w = np.zeros((self.items, self.capacity))
        slot_w[:, self._order] = np.asarray(weights).reshape(self.items, -1)
        bound = 0.0
        for leaf in self._leaves:
            if leaf.buf.dtype in _LOW_PRECISION:
                bound = max(bound, float(np.max(np.abs(slot_w) @ leaf.amax_host)))
        return bound

    def low_precision_max(self) -> float:
        m = [float(torch.finfo(l.buf.dtype).max) for l in self._leaves if l.buf.dtype in _LOW_PRECISION]
        return min(m) if m else float("inf")

    @staticmethod
    def _weighted_rows(buf: torch.Tensor, slot_w: np.ndarray, leaf: _Leaf, items: int) -> torch.Tensor:
        rows, cap, cols = buf.shape
        cdt = _compute_dtype(buf.dtype)
        w = torch.from_numpy(slot_w).to(device=buf.device, dtype=cdt)       # [items, cap]
        if leaf.row_items is not None:
            w_rows = w[leaf.row_items]                                       # [rows, cap]
        elif rows == items:
            w_rows = w
        else:                                                                # unbatched leaf
            w_rows = w[:1]
        if buf.dtype == cdt:
            if rows == 1:
                return (w_rows @ buf[0])                                     # GEMV [1, cols]
            if leaf.row_items is None:
                return torch.bmm(w_rows.unsqueeze(1), buf).squeeze(1)
            return torch.einsum("rs,rsc->rc", w_rows, buf)
        out = torch.empty((rows, cols), dtype=buf.dtype, device=buf.device)
        chunk = _chunk_columns(rows, cap, cols)
        scratch = torch.empty((rows, cap, chunk), dtype=cdt, device=buf.device)
        for c0 in range(0, cols, chunk):
            blk = scratch[:, :, :min(cols, c0 + chunk) - c0]
            blk.copy_(buf[:, :, c0:c0 + chunk])
            if rows == 1:
                res = w_rows @ blk[0]
            elif leaf.row_items is None:
                res = torch.bmm(w_rows.unsqueeze(1), blk).squeeze(1)
            else:
                res = torch.einsum("rs,rsc->rc", w_rows, blk)
            out[:, c0:c0 + chunk] = res
        return out

    @staticmethod
    def _from_rows(rows: torch.Tensor, leaf: _Leaf, sparse: bool) -> torch.Tensor:
        shape = leaf.shape
        if sparse or leaf.batch_dim is None:
            return rows.reshape(shape)
        bd = leaf.batch_dim
        moved = (shape[bd],) + tuple(s for i, s in enumerate(shape) if i != bd)
        out = rows.reshape(moved)
        return out if bd == 0 else out.movedim(0, bd).contiguous()
