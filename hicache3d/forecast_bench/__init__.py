"""The forecast benchmark's importable parts (``scripts/bench_forecast.py`` is its thin driver).

* :mod:`.scenarios` -- the synthetic reference trajectories (also used by the unit tests of
  the bases) and the accuracy cases built on them;
* :mod:`.arms` -- hicache3d's forecasters and the wrappers of the outside libraries they are
  compared with (imported only when used);
* :mod:`.accuracy`, :mod:`.cost`, :mod:`.coverage` -- the three sections of one run;
* :mod:`.report` -- the Markdown report written from the run's result dictionary.

Nothing here is imported by ``import hicache3d``; the scenarios and what each section
measures are described in ``benchmarks/README.md``.
"""
