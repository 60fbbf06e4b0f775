"""scripts/gpu_check.py: what runs without a GPU (the GPU checks themselves need one)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_exits_2_with_a_clear_message(gc, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


@pytest.mark.parametrize("argv,msg", [(["--parts", "core,bogus"], "bogus"), (["--dim", "0"], "--dim"),
                                      (["--device", "tpu"], "device"),
                                      (["--generator-bases", "magic"], "generator-bases")])
def test_bad_arguments_are_usage_errors(gc, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        gc.main(argv + ["--device", "cpu"] if "--device" not in argv else argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_comparison_logic(gc):
    ref = torch.randn(4, 1000, dtype=torch.float64).to(torch.float32)
    lab = ["hermite"] * 4
    assert gc.compare(ref.clone(), ref, "float32", lab, lab)["ok"]
    off = ref * (1 + 5e-4)                       # 5e-4 relative: too far for fp32, fine for fp16
    c = gc.compare(off, ref, "float32", lab, lab)
    assert not c["ok"] and c["rel_diff"] == pytest.approx(5e-4, rel=1e-2)
    assert gc.compare(off, ref, "float16", lab, lab)["ok"]
    assert not gc.compare(ref, ref, "float32", ["reuse"] + lab[1:], lab)["ok"]
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert gc.rel_diff(bad, ref) == math.inf
    assert gc.TOLERANCE["float32"] < gc.TOLERANCE["float16"] < gc.TOLERANCE["bfloat16"]


def test_dry_run_on_cpu(gc, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = gc.main(["--device", "cpu", "--dim", "256", "--sync-steps", "14", "--shapes", "1", "--steps", "4",
                  "--parts", "core,sync,generator", "--generator-bases", "reuse,hermite", "--out", str(out)])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert rc == 0 and res["passed"], text
    rows = res["rows"]
    core = [r for r in rows if r["part"] == "core"]
    assert {(r["basis"], r["dtype"]) for r in core} == {(b, d) for b in gc.BASES for d in gc.DTYPES}
    # CPU against CPU: the same numbers, the same bases serving
    assert all(q["rel_diff"] == 0 and q["labels"] == q["labels_cpu"] for r in core for q in r["queries"])
    sync = [r for r in rows if r["part"] == "sync"]
    assert len(sync) == len(gc.BASES) * 2 * 2 and all(r["forecast"] > 0 for r in sync)
    gen = [r for r in rows if r["part"] == "generator"]
    assert [(r["basis"], r["setting"]) for r in gen] == [
        ("reuse", "interval 4"), ("hermite", "interval 4"), ("reuse", "adaptive tol 2"), ("hermite", "adaptive tol 2")]
    assert all(r["forward_ratio"] > 1 and r["speedup"] > 0 for r in gen)
    assert "checks passed" in text
