"""scripts/bench_openloop.py (and the recorder it uses): the open-loop errors and their
report, against direct computations."""
import numpy as np
import torch

from ._scripts import load_script


def _script():
    return load_script("bench_openloop")


def test_reuse_error_is_the_distance_to_the_newest_computed_velocity():
    m = _script()
    g = torch.Generator().manual_seed(0)
    V = torch.randn(12, 3, 2, 5, generator=g)             # [steps, batch, ...]
    e = m.errors(V, "reuse", interval=3, first_enhance=3, history=6)
    # computed: 0, 1, 2, then every third step: 5, 8, 11
    want = []
    for i, last in [(3, 2), (4, 2), (6, 5), (7, 5), (9, 8), (10, 8)]:
        want.append([float((V[last, k] - V[i, k]).norm() / V[i, k].norm()) for k in range(3)])
    np.testing.assert_allclose(e, np.array(want), rtol=1e-6)


def test_records_every_guided_velocity_and_restores_the_sampler():
    """The recorded velocities, integrated by the sampler's own Euler steps from the same
    noise, give the latent the generator returns."""
    from hicache3d.bench import record_velocities
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    torch.set_num_threads(1)
    gen = BundledGenerator.from_pretrained()
    _, cond = shapes.make_batch("held_out", [0, 1])
    V = record_velocities(gen, cond, 4)
    assert V.shape[:2] == (4, 2)
    assert "velocity" not in vars(gen.sampler)
    s = gen.sampling
    ts = gen.sampler.timesteps(4, s["rescale_t"])
    x = gen.noise(2, 0)
    for i in range(4):
        x = x - (ts[i] - ts[i + 1]) * V[i]
    out = gen(cond, steps=4, seed=0)
    torch.testing.assert_close(x, out.latent, rtol=1e-5, atol=1e-5)


def test_report_marks_the_best_single_basis_and_auto_against_it():
    m = _script()
    rows = [{"steps": 25, "interval": 4, "backend": b, "median": v, "mean": v, "p90": v}
            for b, v in [("reuse", 0.06), ("hermite", 0.05), ("auto", 0.051)]]
    md = m.report({"shapes": ["a"], "first_enhance": 3, "history": 6, "rows": rows}, ["reuse", "hermite", "auto"])
    assert "| 25 | 4 | 0.0600 | **0.0500** | 0.0510 | 1.020 |" in md
    assert "within 2% in 1 of 1 cells" in md
