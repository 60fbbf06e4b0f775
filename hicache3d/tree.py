"""Velocity structures <-> flat lists of tensor leaves.

A sampler's velocity may be a tensor, a nested dict/list/tuple, a named tuple, a
dataclass, or a sparse-tensor-like object exposing ``.feats`` and ``.replace(feats)``
(TRELLIS ``SparseTensor``).  The forecast core only ever sees the tensor leaves; a
:class:`TreeSpec` remembers everything else so a forecast can be rebuilt into the same
structure.

Two specs compare equal exactly when a history of snapshots can be continued: same
container kinds and keys, same leaf shapes and dtypes, and, for sparse tensors, the same
coordinates.  Anything else (a shape change, a new key) starts a new history.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["TreeSpec", "LeafInfo", "flatten", "unflatten", "is_sparse_like"]


def is_sparse_like(obj: Any) -> bool:
    """True for objects that carry features in ``.feats`` and rebuild with ``.replace``."""
    return (
        not isinstance(obj, torch.Tensor)
        and isinstance(getattr(obj, "feats", None), torch.Tensor)
        and callable(getattr(obj, "replace", None))
    )


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


@dataclass(frozen=True)
class LeafInfo:
    """Shape facts of one tensor leaf, and how its rows map to batch items.

    ``rows`` / ``row_items``: the leaf is viewed as ``[rows, numel // rows]``; row ``r``
    belongs to batch item ``row_items[r]`` (``None`` means row ``r`` is item ``r``).
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    batch_dim: Optional[int]        # dense batch axis of this leaf (None: not batched)
    sparse: bool                    # leaf is the .feats of a sparse-tensor-like object


class TreeSpec:
    """Structure of a velocity, minus its tensor data.

    ``node`` is a nested description: ``("leaf", i)``, ``("const", value)``,
    ``("dict", type, keys, children)``, ``("seq", type, children)``,
    ``("namedtuple", type, children)``, ``("dataclass", type, names, children, extras)``,
    ``("sparse", leaf_index, template)``.
    """

    __slots__ = ("node", "leaves", "key", "_templates")

    def __init__(self, node: Any, leaves: List[LeafInfo], key: Any, templates: List[Any]):
        self.node = node
        self.leaves = leaves
        self.key = key                      # hashable, comparable description
        self._templates = templates         # sparse-tensor objects, to rebuild with .replace

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TreeSpec) or self.key != other.key:
            return False
        for a, b in zip(self._templates, other._templates):
            ca, cb = getattr(a, "coords", None), getattr(b, "coords", None)
            if ca is None and cb is None:
                continue
            if ca is None or cb is None or ca.shape != cb.shape:
                return False
            if ca is not cb and not torch.equal(ca, cb):
                return False
        return True

    def __hash__(self) -> int:  # pragma: no cover - specs are compared, rarely hashed
        return hash(self.key)

    def __repr__(self) -> str:
        return f"TreeSpec({self.key!r})"


def flatten(obj: Any, batch_dim: Optional[int] = 0) -> Tuple[List[torch.Tensor], TreeSpec]:
    """Split a velocity into its tensor leaves and a :class:`TreeSpec`.

    ``batch_dim``: the axis of dense leaves that indexes independent batch items
    (``None``: the whole leaf is one item).  Sparse-tensor leaves use their
    ``coords[:, 0]`` column as the item index when ``batch_dim`` is not ``None``.
    """
    leaves: List[torch.Tensor] = []
    infos: List[LeafInfo] = []
    templates: List[Any] = []

    def add_leaf(t: torch.Tensor, sparse: bool) -> int:
        bd = None
        # a batch axis needs at least one more axis of features: 0-d and 1-d leaves are
        # single items
        if batch_dim is not None and not sparse and t.dim() >= 2:
            bd = batch_dim % t.dim() if -t.dim() <= batch_dim < t.dim() else None
        leaves.append(t)
        infos.append(LeafInfo(tuple(t.shape), t.dtype, t.device, bd, sparse))
        return len(leaves) - 1

    def walk(o: Any) -> Tuple[Any, Any]:
        if isinstance(o, torch.Tensor):
            i = add_leaf(o, False)
            return ("leaf", i), ("T", tuple(o.shape), o.dtype)
        if is_sparse_like(o):
            i = add_leaf(o.feats, True)
            templates.append(o)
            coords = getattr(o, "coords", None)
            cshape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else None
            return ("sparse", i, o), ("S", type(o), tuple(o.feats.shape), o.feats.dtype, cshape)
        if isinstance(o, dict):
            keys = list(o.keys())
            kids = [walk(o[k]) for k in keys]
            return (("dict", type(o), keys, [k[0] for k in kids]),
                    ("D", type(o), tuple(keys), tuple(k[1] for k in kids)))
        if _is_namedtuple(o):
            kids = [walk(v) for v in o]
            return (("namedtuple", type(o), [k[0] for k in kids]),
                    ("N", type(o), tuple(k[1] for k in kids)))
        if isinstance(o, (list, tuple)):
            kids = [walk(v) for v in o]
            return (("seq", type(o), [k[0] for k in kids]),
                    ("L", type(o), tuple(k[1] for k in kids)))
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            names = [f.name for f in dataclasses.fields(o) if f.init]
            kids = [walk(getattr(o, n)) for n in names]
            return (("dataclass", type(o), names, [k[0] for k in kids]),
                    ("C", type(o), tuple(names), tuple(k[1] for k in kids)))
        # anything else (None, numbers, strings, ...) is carried as a constant
        try:
            hash(o)
            ckey = ("K", type(o), o)
        except TypeError:
            ckey = ("K", type(o), id(o))
        return ("const", o), ckey

    node, key = walk(obj)
    if batch_dim is not None and infos:
        # all dense batched leaves must agree on the item count, else no batching
        sizes = {info.shape[info.batch_dim] for info in infos if info.batch_dim is not None}
        if len(sizes) > 1:
            infos = [dataclasses.replace(i, batch_dim=None) for i in infos]
    key = (key, tuple(i.batch_dim for i in infos))
    return leaves, TreeSpec(node, infos, key, templates)


def unflatten(spec: TreeSpec, leaves: Sequence[torch.Tensor]) -> Any:
    """Rebuild a velocity of structure ``spec`` from new tensor leaves."""

    def build(node: Any) -> Any:
        kind = node[0]
        if kind == "leaf":
            return leaves[node[1]]
        if kind == "const":
            return node[1]
        if kind == "sparse":
            return node[2].replace(leaves[node[1]])
        if kind == "dict":
            _, typ, keys, kids = node
            items = [(k, build(c)) for k, c in zip(keys, kids)]
            try:
                return typ(items)
            except Exception:
                return dict(items)
        if kind == "namedtuple":
            _, typ, kids = node
            return typ(*[build(c) for c in kids])
        if kind == "seq":
            _, typ, kids = node
            vals = [build(c) for c in kids]
            return vals if typ is list else (tuple(vals) if typ is tuple else typ(vals))
        if kind == "dataclass":
            _, typ, names, kids = node
            return typ(**{n: build(c) for n, c in zip(names, kids)})
        raise AssertionError(f"unknown tree node {kind!r}")

    return build(spec.node)


def map_leaves(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``obj``, keeping the structure."""
    leaves, spec = flatten(obj, batch_dim=None)
    return unflatten(spec, [fn(t) for t in leaves])


def map_pairs(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Any, b: Any) -> Any:
    """Apply ``fn`` leafwise to two velocities of the same structure."""
    la, spec = flatten(a, batch_dim=None)
    lb, spec_b = flatten(b, batch_dim=None)
    if len(la) != len(lb):
        raise ValueError("velocities have different structures")
    return unflatten(spec, [fn(x, y) for x, y in zip(la, lb)])


def item_cosines(a: Any, b: Any, batch_dim: Optional[int] = 0) -> torch.Tensor:
    """Cosine similarity of two velocities per batch item (float64, shape ``[items]``)."""
    la, spec = flatten(a, batch_dim)
    lb, _ = flatten(b, batch_dim)
    dims = {i.shape[i.batch_dim] for i in spec.leaves if i.batch_dim is not None}
    batched = (batch_dim is not None and len(dims) == 1
               and all(i.batch_dim is not None for i in spec.leaves))
    dot = nx = ny = 0
    for x, y, info in zip(la, lb, spec.leaves):
        if batched:
            x = x.detach().movedim(info.batch_dim, 0).reshape(x.shape[info.batch_dim], -1)
            y = y.detach().movedim(info.batch_dim, 0).reshape(y.shape[info.batch_dim], -1)
        else:
            x, y = x.detach().reshape(1, -1), y.detach().reshape(1, -1)
        x, y = x.to(torch.float64), y.to(torch.float64)
        dot = dot + (x * y).sum(1)
        nx = nx + (x * x).sum(1)
        ny = ny + (y * y).sum(1)
    return dot / (torch.sqrt(nx * ny) + 1e-300)
