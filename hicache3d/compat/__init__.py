"""Drop-in replacement for the seed package ``hicache_pp``'s loop API.

``from hicache_pp import hicache_init, ...`` becomes ``from hicache3d.compat import ...``
(and ``hicache_pp.tree`` becomes ``hicache3d.compat.tree``).  Same state dicts, schedule
and semantics; the forecasts come from hicache3d's core (Gram-matrix DMD, the core's
Hermite coefficients).  The tree functions are also exported here under their names.
"""
from . import dmd, hermite, tree
from .dmd import auto_forecast_state, dmd_forecast, dmd_forecast_state, dmd_update_snapshots
from .hermite import (hicache_decide, hicache_forecast, hicache_init, hicache_reset,
                      hicache_telemetry, hicache_update_derivatives, physicists_hermite,
                      scaled_hermite)
from .tree import (adaptive_cfg_decide, adaptive_cfg_init, dmd_forecast_tree,
                   dmd_update_snapshots_tree, forecast_guidance_tree, guidance_term_tree,
                   hicache_forecast_tree, hicache_update_tree, reconstruct_cfg_tree)

__all__ = [
    "dmd", "hermite", "tree",
    "hicache_init", "hicache_decide", "hicache_update_derivatives", "hicache_forecast",
    "hicache_reset", "hicache_telemetry", "physicists_hermite", "scaled_hermite",
    "dmd_forecast", "dmd_update_snapshots", "dmd_forecast_state", "auto_forecast_state",
    "hicache_update_tree", "hicache_forecast_tree", "dmd_update_snapshots_tree",
    "dmd_forecast_tree", "adaptive_cfg_init", "adaptive_cfg_decide", "guidance_term_tree",
    "forecast_guidance_tree", "reconstruct_cfg_tree",
]
