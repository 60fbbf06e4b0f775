"""The ``hicache3d`` command line."""
from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hicache3d")
def main() -> None:
    """Training-free acceleration of image-to-3D flow-matching generators.

    Skips most network calls of a sampler and forecasts the velocity from the cached
    outputs of the computed steps (bases: reuse, taylor, hermite, dmd, auto).
    """


@main.command("demo")
@click.option("--backend", default="dmd", show_default=True,
              type=click.Choice(["reuse", "taylor", "hermite", "dmd", "auto"]))
@click.option("--interval", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--steps", default=25, show_default=True, type=click.IntRange(2, 1000))
def demo(backend: str, interval: int, steps: int) -> None:
    """Run a toy Euler sampler uncached and cached, and report calls saved and drift.

    \b
    Example:
      hicache3d demo --backend dmd --interval 5 --steps 50
    """
    import torch

    from . import CacheConfig, VelocityCache

    def sample(cache):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(64, 64, generator=g) / 8
        x = torch.randn(4, 64, generator=g)
        ts = torch.linspace(1, 0, steps + 1)
        calls = 0
        for i in range(steps):
            def net(x=x, t=ts[i]):
                nonlocal calls
                calls += 1
                return torch.tanh(x @ W) + t * x
            v = net() if cache is None else cache.step(ts[i], net)
            x = x - (ts[i] - ts[i + 1]) * v
        return x, calls

    ref, n_ref = sample(None)
    cache = VelocityCache(CacheConfig(backend=backend, interval=interval))
    out, n = sample(cache)
    drift = float((out - ref).norm() / ref.norm())
    click.echo(f"uncached: {n_ref} network calls")
    click.echo(f"{backend}, interval {interval}: {n} network calls "
               f"({n_ref - n} skipped), relative drift of the final sample {drift:.2e}")
    click.echo(f"forecasts: {cache.stats.summary()}")
