"""``hicache3d generate --model trellis|trellis2|sam3d`` on the upstream's own pipelines,
loaded from weights folders in the upstream layout holding tiny random-weight models
built from the upstream classes (``tests/_upstream_pipelines.py``), on CPU.

The samplers and every decoder that runs on CPU are the real upstream code; decoders that
need CUDA kernels stop the run with a one-line reason after the samplers ran (checked up to
there).  One fresh interpreter per family (``tests/_pipeline_checks.py``): TRELLIS v1 and
TRELLIS.2 both import as ``trellis``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._pipeline_checks import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {
    "trellis": ["sampler_runs_then_stops_at_mesh_decoder", "latents_are_the_samplers_own",
                "cli_compare_reports_drift_and_names_decoder", "cli_no_cache_counts_every_forward",
                "folder_mode_reports_the_decoder_per_image", "bad_folders_are_clear_errors",
                "offline_without_weights_names_repo", "image_encoder_unavailable_is_clear"],
    "trellis2": ["three_samplers_run_then_stop_at_shape_decoder", "latents_are_the_samplers_own",
                 "cascade_stops_at_the_upsampler", "cli_compare_reports_drift_and_names_decoder",
                 "rgb_image_and_bad_folders_are_clear_errors", "offline_without_weights_names_repo",
                 "image_encoder_unavailable_is_clear"],
    "sam3d": ["cpu_stops_after_layout_check_naming_cuda", "cli_says_so_in_one_line", "bad_folders_are_clear_errors",
              "offline_without_weights_names_repo", "rgb_image_is_refused",
              "accelerate_target_caches_both_real_generators"],
}
_cache = {}


def _results(family, tmp_path_factory):
    if family not in _cache:
        env = {k: v for k, v in os.environ.items() if k != "HICACHE3D_DISABLE"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p])
        tmp = tmp_path_factory.mktemp(f"gen-{family}")
        r = subprocess.run([sys.executable, "-m", "tests._pipeline_checks", family, str(tmp)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
        lines = [l for l in r.stdout.splitlines() if l.startswith("RESULTS ")]
        assert lines, r.stdout[-2000:] + r.stderr[-3000:]
        _cache[family] = json.loads(lines[-1][len("RESULTS "):])
    return _cache[family]


@pytest.mark.parametrize("family,name", [(f, n) for f, names in CHECKS.items() for n in names])
def test_generate_upstream(family, name, tmp_path_factory):
    results = _results(family, tmp_path_factory)
    assert set(results) == set(CHECKS[family]), sorted(results)
    assert results[name] == "ok", results[name]


def test_every_family_is_listed():
    assert set(CHECKS) == set(FAMILIES)
