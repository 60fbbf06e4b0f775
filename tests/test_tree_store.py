"""Tree-aware snapshots, batch independence, dtypes, copies, structure changes."""
import collections
import dataclasses

import numpy as np
import pytest
import torch

from hicache3d.forecast import make_forecaster
from hicache3d.tree import flatten, unflatten

Pair = collections.namedtuple("Pair", "shape pose")


@dataclasses.dataclass
class Vel:
    a: torch.Tensor
    b: dict
    tag: str = "x"


class FakeSparse:
    """Stand-in for a sparse tensor: features, coordinates, and ``replace``."""

    def __init__(self, feats, coords):
        self.feats, self.coords = feats, coords

    def replace(self, feats):
        return FakeSparse(feats, self.coords)


def lin(t, base, slope):
    return base + t * slope


def make_trees(kind, t, g=torch.Generator().manual_seed(0), cache={}):
    if kind not in cache:
        cache[kind] = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    b0, s0, b1, s1 = cache[kind]
    x, y = lin(t, b0, s0), lin(t, b1, s1)
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2], [1, 0, 0, 0], [1, 3, 3, 3], [1, 4, 4, 4]])
    return {
        "tensor": x,
        "dict": {"shape": x, "nested": {"pose": y[:, :2]}},
        "list": [x, (y, None)],
        "namedtuple": Pair(x, y),
        "dataclass": Vel(x, {"q": y}),
        "sparse": FakeSparse(x.reshape(-1, 3)[:5], coords),
    }[kind]


@pytest.mark.parametrize("kind", ["tensor", "dict", "list", "namedtuple", "dataclass", "sparse"])
def test_every_tree_kind_roundtrips_and_forecasts(kind):
    fc = make_forecaster("taylor", history=4, order=1)
    for t in (0, 1, 2):
        fc.push(t, make_trees(kind, float(t)))
    out = fc.predict(4.0)
    want = make_trees(kind, 4.0)
    lo, so = flatten(out)
    lw, sw = flatten(want)
    assert so == sw and type(out) is type(want)
    for a, b in zip(lo, lw):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if kind == "sparse":
        assert out.coords is want.coords or torch.equal(out.coords, want.coords)
    if kind == "dataclass":
        assert out.tag == "x"


def test_structure_or_shape_change_restarts_history():
    fc = make_forecaster("dmd", history=6)
    fc.push(0, {"a": torch.zeros(1, 4)})
    fc.push(1, {"a": torch.ones(1, 4)})
    fc.push(2, {"a": torch.ones(1, 5)})            # new shape
    assert len(fc) == 1 and fc.stats.restarts["structure_changed"] == 1
    fc.push(3, {"b": torch.ones(1, 5)})            # new key
    assert len(fc) == 1 and fc.stats.restarts["structure_changed"] == 2
    out = fc.predict(4)
    assert torch.equal(out["b"], torch.ones(1, 5))


def test_sparse_coords_change_restarts_history():
    fc = make_forecaster("reuse", history=3)
    c1 = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]])
    c2 = torch.tensor([[0, 0, 0, 0], [0, 2, 2, 2]])
    fc.push(0, FakeSparse(torch.ones(2, 8), c1))
    fc.push(1, FakeSparse(torch.ones(2, 8), c2))
    assert len(fc) == 1


@pytest.mark.parametrize("backend", ["taylor", "hermite", "dmd", "auto"])
def test_batch_items_are_fitted_independently(backend):
    """Item 0's forecast must not change when item 1's history is replaced by noise."""
    g = torch.Generator().manual_seed(1)
    z = torch.tensor([0.9 * np.exp(0.3j), 0.8], dtype=torch.complex128)
    A = torch.randn(64, 2, dtype=torch.complex128, generator=g)
    smooth = lambda t: (A @ (z ** float(t))).real
    noise = [torch.randn(64, dtype=torch.float64, generator=g) * 5 for _ in range(8)]
    outs = []
    for other in ("smooth", "noise"):
        fc = make_forecaster(backend, history=6)
        for t in range(6):
            second = smooth(t) * 2 if other == "smooth" else noise[t]
            fc.push(t, torch.stack([smooth(t), second]))
        outs.append(fc.predict(7.0)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-12)
    if backend == "dmd":
        assert float((outs[0] - smooth(7)).norm() / smooth(7).norm()) < 1e-6


def test_sparse_batch_items_use_coords_column():
    g = torch.Generator().manual_seed(2)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]])
    base, slope = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    fcs = []
    for noisy in (False, True):
        fc = make_forecaster("taylor", history=4, order=2)
        for t in range(4):
            feats = base + t * slope
            if noisy:
                feats = feats.clone()
                feats[2:] = torch.randn(2, 8, generator=g) * 10
            fc.push(t, FakeSparse(feats, coords))
        fcs.append(fc.predict(5.0).feats[:2])
    torch.testing.assert_close(fcs[0], fcs[1])
    assert fc.store.items == 2


def test_batch_dim_none_fits_whole_batch_as_one():
    fc = make_forecaster("taylor", history=3, batch_dim=None)
    for t in range(3):
        fc.push(t, torch.full((2, 4), float(t)))
    assert fc.store.items == 1
    torch.testing.assert_close(fc.predict(4.0), torch.full((2, 4), 4.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_fitted_in_high_precision_returned_in_own_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    z = torch.tensor([0.9 * np.exp(0.3j), 0.95], dtype=torch.complex128)
    A = torch.randn(4096, 2, dtype=torch.complex128, generator=g)
    f = lambda t: (A @ (z ** float(t))).real.reshape(1, -1)
    fc = make_forecaster("dmd", history=6)
    for t in range(6):
        fc.push(t, f(t).to(dtype))
    out = fc.predict(7.0)
    assert out.dtype == dtype and out.device == torch.device("cpu")
    err = float((out.double() - f(7)).norm() / f(7).norm())
    # rounding of the stored snapshots (eps of the dtype) bounds the error, up to a factor
    assert err < 50 * torch.finfo(dtype).eps, err


def test_snapshots_are_detached_copies():
    fc = make_forecaster("reuse", history=2)
    x = torch.ones(1, 4, requires_grad=True) * 1.0
    buf = torch.ones(1, 4)
    fc.push(0, buf)
    buf.fill_(7.0)                                  # sampler reuses its buffer in place
    out = fc.predict(1)
    assert torch.equal(out, torch.ones(1, 4))
    fc.push(1, x)
    assert not fc.predict(2).requires_grad


def test_nonfinite_snapshot_is_dropped_and_counted():
    fc = make_forecaster("dmd", history=4)
    fc.push(0, torch.ones(1, 3))
    fc.push(1, torch.tensor([[1.0, float("nan"), 0.0]]))
    assert fc.ready()                                  # the good snapshot is kept
    assert len(fc) == 1 and fc.stats.restarts["nonfinite_snapshot"] == 1
    fc.push(2, torch.tensor([[float("nan"), 0.0, 0.0]]))
    assert fc.ready() and len(fc) == 1


def test_cache_computes_when_the_history_was_dropped():
    from hicache3d import CacheConfig, VelocityCache
    cache = VelocityCache(CacheConfig(backend="reuse", interval=2, first_enhance=1))
    calls = []

    def net(i, v):
        calls.append(i)
        return v
    cache.step(0, lambda: net(0, torch.full((1, 3), float("nan"))))    # computed, not finite
    out = cache.step(1, lambda: net(1, torch.full((1, 3), 2.0)))       # nothing usable: computed
    assert calls == [0, 1] and torch.equal(out, torch.full((1, 3), 2.0))
    assert cache.stats.restarts["nonfinite_snapshot"] == 1


def test_fallback_chain_dmd_to_hermite_to_reuse_is_counted():
    fc = make_forecaster("dmd", history=4)
    fc.push(0, torch.ones(1, 3))
    fc.push(1, 2 * torch.ones(1, 3))
    out = fc.predict(2)                            # two snapshots: dmd cannot fit
    assert fc.last_labels == ["hermite"]
    assert fc.stats.fallbacks["dmd:insufficient_history"] == 1
    assert torch.isfinite(out).all()


def test_overflow_guard_in_fp16_falls_back_to_reuse():
    fc = make_forecaster("taylor", history=3, order=2)
    for t, v in enumerate((1.0, 30000.0, 65000.0)):
        fc.push(t, torch.full((1, 8), v, dtype=torch.float16))
    out = fc.predict(6.0)
    assert torch.isfinite(out).all()
    assert fc.stats.fallbacks["overflow_guard"] == 1


def test_unflatten_rebuilds_constants():
    leaves, spec = flatten({"a": torch.ones(2), "b": None, "c": 3})
    out = unflatten(spec, [torch.zeros(2)])
    assert out["b"] is None and out["c"] == 3 and torch.equal(out["a"], torch.zeros(2))


def test_implausible_forecast_falls_back():
    """A fit that extrapolates far beyond every snapshot is rejected (Gram-space check)."""
    fc = make_forecaster("taylor", history=4, order=3)
    for t, v in enumerate((0.0, 1.0, -1.0, 1.0)):
        fc.push(t, torch.full((1, 4), v, dtype=torch.float64))
    out = fc.predict(10.0)
    assert fc.stats.fallbacks["taylor:implausible_forecast"] == 1
    assert float(out.abs().max()) <= 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_up_cast_matches_float64_over_many_chunks(monkeypatch, dtype):
    """A batch whose history spans several up-cast chunks, with a ragged last one: the
    Gram matrix is the float64 product of the stored values, and a forecast is the
    weighted sum of them, item by item."""
    from hicache3d.forecast import store as store_mod
    monkeypatch.setattr(store_mod, "_CHUNK_ELEMENTS", 3 * 4 * 700)
    monkeypatch.setattr(store_mod, "_MIN_CHUNK", 16)
    assert store_mod._chunk_columns(3, 4, 2500) == 700          # 4 chunks, the last ragged
    g = torch.Generator().manual_seed(11)
    snaps = [torch.randn(3, 2500, generator=g).to(dtype) for _ in range(4)]
    st = store_mod.SnapshotStore(4, batch_dim=0)
    for k, s in enumerate(snaps):
        st.push(float(k), s)
    assert st.finalize() is None
    X = torch.stack([s.double() for s in snaps], 1)               # [items, n, d]
    np.testing.assert_allclose(st.gram(), (X @ X.transpose(1, 2)).numpy(), rtol=1e-12)
    W = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, 0.75], [0.0, 0.0, 0.0, 2.0]])
    out = st.combine(W)
    assert out.dtype == dtype
    ref = torch.einsum("in,ind->id", torch.from_numpy(W), X)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("backend", ["reuse", "taylor", "hermite"])
def test_fit_free_bases_make_snapshot_products_only_when_a_check_needs_them(backend, monkeypatch):
    """On the host, a basis that fits nothing gets only the norms of a new snapshot (its
    finiteness check); the products with the others are made the first time a forecast's
    weights could make it too large (L1 norm > 4).  Forecasts, labels and fallbacks are
    those of a store that makes every product at once, and a non-finite snapshot is
    still dropped alone."""
    from hicache3d.forecast import store as store_mod
    calls = []
    real_dots = store_mod.SnapshotStore._dots
    monkeypatch.setattr(store_mod.SnapshotStore, "_dots",
                        staticmethod(lambda buf, slots: calls.append(list(slots)) or real_dots(buf, slots)))
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(2, 3, 64, generator=g)
    vel = lambda t: A * np.exp(-0.3 * t) + B * np.cos(0.7 * t)          # noqa: E731
    eager = make_forecaster(backend, history=5)
    lazy = make_forecaster(backend, history=5)
    outs = {}
    for name, fc in (("eager", eager), ("lazy", lazy)):
        if name == "eager":
            monkeypatch.setattr(store_mod, "_defer_products", lambda device: False)
        else:
            monkeypatch.setattr(store_mod, "_defer_products", lambda device: True)
        calls.clear()
        res = []
        for k in range(5):
            fc.push(float(k), vel(k) if k != 2 else torch.full((3, 64), float("inf")))
        near = fc.predict(4.3)                  # small weights: no products needed
        near_calls = list(calls)
        far = fc.predict(9.0)                   # taylor extrapolates with large weights
        res = (near, far, list(fc.last_labels), dict(fc.stats.fallbacks), dict(fc.stats.restarts),
               len(fc), near_calls, list(calls))
        outs[name] = res
    e, l = outs["eager"], outs["lazy"]
    assert torch.equal(e[0], l[0]) and torch.equal(e[1], l[1])
    assert e[2:6] == l[2:6]
    assert l[4] == {"nonfinite_snapshot": 1} and l[5] == 4
    assert e[6] and not l[6]                    # eager made them at once, lazy did not
    big = np.abs(lazy._weights(lazy.chain(0)[0], 0, 9.0)).sum() > 4
    assert bool(l[7]) == big
    if backend == "taylor":
        assert big                              # the far forecast needed them
    if backend == "reuse":
        assert not l[7]                         # reuse never does


def test_gram_of_snapshots_not_finalized_is_refused():
    """A Gram matrix asked for before ``finalize()`` would hold, for the new snapshot, the
    products of the one its slot held before (here: an evicted snapshot's): refused."""
    from hicache3d.forecast.store import SnapshotStore
    st = SnapshotStore(2, batch_dim=0)
    for k, v in enumerate((1.0, 2.0)):
        st.push(float(k), torch.full((1, 3), v, dtype=torch.float64))
    assert st.finalize() is None
    st.push(2.0, torch.full((1, 3), 5.0, dtype=torch.float64))     # evicts the first
    with pytest.raises(RuntimeError, match="before finalize"):
        st.gram()
    assert st.finalize() is None
    np.testing.assert_allclose(st.gram()[0], 3.0 * np.array([[4.0, 10.0], [10.0, 25.0]]))
