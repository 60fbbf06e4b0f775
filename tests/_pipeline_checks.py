"""``hicache3d generate`` on the real upstream pipelines (tiny random-weight models saved
in the upstream's weights-folder layout), one family per fresh interpreter:

    python -m tests._pipeline_checks trellis|trellis2|sam3d TMPDIR

Prints ``RESULTS {json}``: check name -> "ok" or the failure."""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch

STEPS = 12


def _cli(args):
    from click.testing import CliRunner

    from hicache3d.cli import main
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _raises(fn, *needles):
    from hicache3d.generate import GenerateError
    try:
        fn()
    except GenerateError as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        assert "\n" not in msg, f"not one line: {msg!r}"
        return msg
    raise AssertionError("no GenerateError raised")


# ------------------------------------------------------------------------------ TRELLIS v1

def trellis_checks(tmp: Path):
    from tests import _upstream_pipelines as P
    from upstream_harness import trellis_env as T
    P.activate_trellis_v1()
    weights = P.write_trellis_v1(tmp / "TRELLIS-image-large")
    image = P.rgba_disc(tmp / "disc.png")
    from hicache3d.generate import Generator, latent_drift
    state = {}

    def expected():
        p = P.V1_PARAMS
        return sum(T.expected_calls("interval", STEPS, p[k]["rescale_t"], tuple(p[k]["cfg_interval"]))
                   for k in ("ss", "slat"))

    def sampler_runs_then_stops_at_mesh_decoder():
        gen = Generator("trellis", str(weights), device="cpu")
        payload = gen.prepare(image)
        ref = gen.run(payload, steps=STEPS, seed=3, cache=False)
        acc = gen.run(payload, steps=STEPS, seed=3, cache=True)
        state.update(gen=gen, payload=payload, ref=ref, acc=acc)
        for r in (ref, acc):
            assert r.mesh is None and "slat_decoder_mesh" in r.reason and "CUDA" in r.reason, r.reason
            assert list(r.latents) == ["sparse_structure", "slat"], list(r.latents)
        assert ref.network_calls == expected(), (ref.network_calls, expected())
        assert acc.skipped_calls > 0 and acc.network_calls < ref.network_calls, (acc.network_calls, ref.network_calls)
        assert set(acc.stats["sites"]) == {"sparse_structure", "slat"}, acc.stats["sites"]
        assert tuple(ref.latents["sparse_structure"].shape) == (1, 8, 16, 16, 16)
        assert ref.latents["slat"].feats.shape[1] == 8
        d = latent_drift(acc.latents["sparse_structure"], ref.latents["sparse_structure"])
        assert 0 < d < 1, d
        a, b = acc.latents["slat"], ref.latents["slat"]
        if a.coords.shape == b.coords.shape and torch.equal(a.coords, b.coords):   # same structure
            assert 0 < latent_drift(a, b) < 1

    def latents_are_the_samplers_own():
        gen, payload, ref = state["gen"], state["payload"], state["ref"]
        pipe = gen.pipe
        cond = pipe.get_cond([payload])
        torch.manual_seed(3)
        flow = pipe.models["sparse_structure_flow_model"]
        noise = torch.randn(1, flow.in_channels, flow.resolution, flow.resolution, flow.resolution)
        params = dict(pipe.sparse_structure_sampler_params, steps=STEPS)
        with torch.no_grad():
            z = pipe.sparse_structure_sampler.sample(flow, noise, **cond, **params, verbose=False).samples
        assert torch.equal(z, ref.latents["sparse_structure"])

    def cli_compare_reports_drift_and_names_decoder():
        out = tmp / "disc.glb"
        r = _cli(["generate", "--model", "trellis", "--weights", str(weights), "--image", str(image),
                  "--out", str(out), "--steps", str(STEPS), "--compare"])
        assert r.exit_code == 1, r.output
        assert not out.exists()
        assert f"{expected()} network calls" in r.output, r.output
        assert "final-latent drift vs uncached: sparse_structure" in r.output, r.output
        last = r.output.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "slat_decoder_mesh" in last and "CUDA" in last, last

    def cli_no_cache_counts_every_forward():
        r = _cli(["generate", "--model", "trellis", "--weights", str(weights), "--image", str(image),
                  "--out", str(tmp / "n.glb"), "--steps", str(STEPS), "--no-cache"])
        assert r.exit_code == 1, r.output
        assert f"sampled in" in r.output and f"{expected()} network calls" in r.output, r.output
        assert "skipped" not in r.output.splitlines()[0], r.output

    def folder_mode_reports_the_decoder_per_image():
        images = tmp / "images"
        images.mkdir()
        shutil.copy(image, images / "a.png")
        r = _cli(["generate", "--model", "trellis", "--weights", str(weights), "--image", str(images),
                  "--out", str(tmp / "meshes"), "--steps", "4"])
        assert r.exit_code == 1, r.output
        assert "slat_decoder_mesh" in r.output and "CUDA" in r.output, r.output
        assert not list((tmp / "meshes").glob("*.glb"))

    def bad_folders_are_clear_errors():
        _raises(lambda: Generator("trellis", str(tmp / "nowhere"), device="cpu"), "no such folder")
        empty = tmp / "empty"
        empty.mkdir()
        _raises(lambda: Generator("trellis", str(empty), device="cpu"), "no pipeline.json")
        broken = tmp / "broken"
        shutil.copytree(weights, broken)
        (broken / "ckpts" / "slat_flow.safetensors").unlink()
        _raises(lambda: Generator("trellis", str(broken), device="cpu"), "ckpts/slat_flow.safetensors")
        other = tmp / "other"
        shutil.copytree(weights, other)
        cfg = json.loads((other / "pipeline.json").read_text())
        cfg["name"] = "Trellis2ImageTo3DPipeline"
        (other / "pipeline.json").write_text(json.dumps(cfg))
        _raises(lambda: Generator("trellis", str(other), device="cpu"), "Trellis2ImageTo3DPipeline")
        garbled = tmp / "garbled"
        shutil.copytree(weights, garbled)
        (garbled / "ckpts" / "ss_flow.safetensors").write_bytes(b"not a safetensors file")
        _raises(lambda: Generator("trellis", str(garbled), device="cpu"), "sparse_structure_flow_model",
                "ckpts/ss_flow")

    def offline_without_weights_names_repo():
        os.environ["HF_HOME"] = str(tmp / "hf-home")
        _raises(lambda: Generator("trellis", None, device="cpu"), "microsoft/TRELLIS-image-large",
                "huggingface-cli download")

    def image_encoder_unavailable_is_clear():
        hub = torch.hub.load

        def offline(*_a, **_k):
            raise OSError("no network")
        torch.hub.load = offline
        try:
            _raises(lambda: Generator("trellis", str(weights), device="cpu"), "dinov2_vitl14_reg",
                    "torch.hub.load")
        finally:
            torch.hub.load = hub

    return [sampler_runs_then_stops_at_mesh_decoder, latents_are_the_samplers_own,
            cli_compare_reports_drift_and_names_decoder, cli_no_cache_counts_every_forward,
            folder_mode_reports_the_decoder_per_image, bad_folders_are_clear_errors,
            offline_without_weights_names_repo, image_encoder_unavailable_is_clear]


# ------------------------------------------------------------------------------ TRELLIS.2

def trellis2_checks(tmp: Path):
    from tests import _upstream_pipelines as P
    from upstream_harness import trellis2_env as T
    P.activate_trellis2()
    weights = P.write_trellis2(tmp / "TRELLIS.2-4B")
    image = P.rgba_disc(tmp / "disc.png")
    from hicache3d.generate import Generator, latent_drift
    sites = ["sparse_structure", "shape_slat", "tex_slat"]
    state = {}

    def expected(keys=tuple(P.V2_PARAMS)):
        return sum(T.expected_calls("interval", STEPS, P.V2_PARAMS[k]["rescale_t"], P.V2_PARAMS[k]["guidance_strength"],
                                    tuple(P.V2_PARAMS[k]["guidance_interval"])) for k in keys)

    def three_samplers_run_then_stop_at_shape_decoder():
        gen = Generator("trellis2", str(weights), device="cpu")
        payload = gen.prepare(image)
        ref = gen.run(payload, steps=STEPS, seed=5, cache=False)
        acc = gen.run(payload, steps=STEPS, seed=5, cache=True)
        state.update(gen=gen, payload=payload, ref=ref)
        for r in (ref, acc):
            assert r.mesh is None and "shape_slat_decoder" in r.reason and "CUDA" in r.reason, r.reason
            assert list(r.latents) == sites, list(r.latents)
        assert ref.network_calls == expected(), (ref.network_calls, expected())
        assert acc.skipped_calls > 0 and acc.network_calls < ref.network_calls, (acc.network_calls, ref.network_calls)
        assert set(acc.stats["sites"]) == set(sites), acc.stats["sites"]
        assert ref.latents["shape_slat"].feats.shape[1] == 32 and ref.latents["tex_slat"].feats.shape[1] == 32
        d = latent_drift(acc.latents["sparse_structure"], ref.latents["sparse_structure"])
        assert 0 < d < 1, d

    def latents_are_the_samplers_own():
        gen, payload, ref = state["gen"], state["payload"], state["ref"]
        pipe = gen.pipe
        torch.manual_seed(5)
        cond = pipe.get_cond([payload], 512)
        flow = pipe.models["sparse_structure_flow_model"]
        noise = torch.randn(1, flow.in_channels, flow.resolution, flow.resolution, flow.resolution)
        params = dict(pipe.sparse_structure_sampler_params, steps=STEPS)
        with torch.no_grad():
            z = pipe.sparse_structure_sampler.sample(flow, noise, **cond, **params, verbose=False).samples
        assert torch.equal(z, ref.latents["sparse_structure"])

    def cascade_stops_at_the_upsampler():
        folder = tmp / "cascade"
        shutil.copytree(weights, folder)
        cfg = json.loads((folder / "pipeline.json").read_text())
        cfg["args"]["default_pipeline_type"] = "1024_cascade"
        (folder / "pipeline.json").write_text(json.dumps(cfg))
        gen = Generator("trellis2", str(folder), device="cpu")
        r = gen.run(gen.prepare(image), steps=STEPS, seed=5, cache=False)
        assert r.mesh is None and "shape_slat_decoder" in r.reason, r.reason
        assert list(r.latents) == ["sparse_structure", "shape_slat"], list(r.latents)    # LR shape run only
        assert r.network_calls == expected(("sparse_structure_sampler", "shape_slat_sampler")), r.network_calls

    def cli_compare_reports_drift_and_names_decoder():
        out = tmp / "disc.glb"
        r = _cli(["generate", "--model", "trellis2", "--weights", str(weights), "--image", str(image),
                  "--out", str(out), "--steps", str(STEPS), "--compare"])
        assert r.exit_code == 1, r.output
        assert not out.exists()
        assert f"uncached" in r.output and f"{expected()} network calls" in r.output, r.output
        assert "final-latent drift vs uncached: sparse_structure" in r.output, r.output
        last = r.output.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "shape_slat_decoder" in last and "CUDA" in last, last

    def rgb_image_and_bad_folders_are_clear_errors():
        from PIL import Image
        rgb = tmp / "rgb.png"
        Image.open(image).convert("RGB").save(rgb)
        _raises(lambda: state["gen"].prepare(rgb), "rgb.png", "RGBA")
        empty = tmp / "empty"
        empty.mkdir()
        _raises(lambda: Generator("trellis2", str(empty), device="cpu"), "no pipeline.json")
        broken = tmp / "broken"
        shutil.copytree(weights, broken)
        (broken / "ckpts" / "tex_flow_512.json").unlink()
        _raises(lambda: Generator("trellis2", str(broken), device="cpu"), "ckpts/tex_flow_512.json")
        v1 = tmp / "v1-layout"
        shutil.copytree(weights, v1)
        cfg = json.loads((v1 / "pipeline.json").read_text())
        cfg["name"] = "TrellisImageTo3DPipeline"
        (v1 / "pipeline.json").write_text(json.dumps(cfg))
        _raises(lambda: Generator("trellis2", str(v1), device="cpu"), "TrellisImageTo3DPipeline")

    def offline_without_weights_names_repo():
        os.environ["HF_HOME"] = str(tmp / "hf-home")
        _raises(lambda: Generator("trellis2", None, device="cpu"), "microsoft/TRELLIS.2-4B",
                "huggingface-cli download")

    def image_encoder_unavailable_is_clear():
        import trellis.modules.image_feature_extractor as fe
        tiny = fe.DinoV3FeatureExtractor

        class Offline:
            def __init__(self, *_a, **_k):
                raise OSError("offline")
        fe.DinoV3FeatureExtractor = Offline
        try:
            _raises(lambda: Generator("trellis2", str(weights), device="cpu"),
                    "facebook/dinov3-vitl16-pretrain-lvd1689m", "huggingface-cli download")
        finally:
            fe.DinoV3FeatureExtractor = tiny

    return [three_samplers_run_then_stop_at_shape_decoder, latents_are_the_samplers_own,
            cascade_stops_at_the_upsampler, cli_compare_reports_drift_and_names_decoder,
            rgb_image_and_bad_folders_are_clear_errors, offline_without_weights_names_repo,
            image_encoder_unavailable_is_clear]


# ------------------------------------------------------------------------------ SAM 3D

def sam3d_checks(tmp: Path):
    from tests import _upstream_pipelines as P
    from upstream_harness import sam3d_env as S
    S.activate()
    weights = P.write_sam3d(tmp / "sam-3d-objects")
    image = P.rgba_disc(tmp / "disc.png")
    from hicache3d.generate import Generator

    def cpu_stops_after_layout_check_naming_cuda():
        msg = _raises(lambda: Generator("sam3d", str(weights), device="cpu"), "InferencePipelinePointMap", "CUDA",
                      "cannot run on cpu", "complete")
        assert str(weights) in msg

    def cli_says_so_in_one_line():
        out = tmp / "disc.glb"
        r = _cli(["generate", "--model", "sam3d", "--weights", str(weights), "--image", str(image),
                  "--out", str(out)])
        assert r.exit_code == 1 and not out.exists(), r.output
        last = r.output.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "CUDA" in last, r.output

    def bad_folders_are_clear_errors():
        empty = tmp / "empty"
        empty.mkdir()
        _raises(lambda: Generator("sam3d", str(empty), device="cpu"), "checkpoints/pipeline.yaml")
        broken = tmp / "broken"
        shutil.copytree(weights, broken)
        (broken / "checkpoints" / "slat_generator.ckpt").unlink()
        _raises(lambda: Generator("sam3d", str(broken), device="cpu"), "slat_generator.ckpt")
        unset = tmp / "unset"
        shutil.copytree(weights, unset)
        cfg = unset / "checkpoints" / "pipeline.yaml"
        cfg.write_text("\n".join(l for l in cfg.read_text().splitlines() if not l.startswith("ss_decoder_ckpt")))
        _raises(lambda: Generator("sam3d", str(unset), device="cpu"), "ss_decoder_ckpt_path (not set")
        other = tmp / "other"
        shutil.copytree(weights, other)
        cfg = other / "checkpoints" / "pipeline.yaml"
        cfg.write_text(cfg.read_text().replace("InferencePipelinePointMap", "SomethingElse"))
        _raises(lambda: Generator("sam3d", str(other), device="cpu"), "SomethingElse",
                "not a SAM 3D Objects inference pipeline")

    def offline_without_weights_names_repo():
        os.environ["HF_HOME"] = str(tmp / "hf-home")
        _raises(lambda: Generator("sam3d", None, device="cpu"), "facebook/sam-3d-objects", "huggingface-cli download")

    def rgb_image_is_refused():
        from PIL import Image

        from hicache3d.pipelines.sam3d import SAM3DPipeline
        _raises(lambda: SAM3DPipeline.prepare(SAM3DPipeline.__new__(SAM3DPipeline),
                                              Image.open(image).convert("RGB")), "RGBA", "mask")

    def accelerate_target_caches_both_real_generators():
        """What ``run`` hands ``accelerate`` (the generators of the pipeline's ``models``
        table) and how it counts (forward hooks on the backbones): fewer backbone calls with
        the cache, both sites, the uncached count as the solver's own schedule gives."""
        from hicache3d import accelerate
        from hicache3d.generate import count_forwards, latent_drift
        from hicache3d.pipelines.sam3d import GENERATORS, _Generators
        models = {"ss_generator": S.build_ss_generator(0), "slat_generator": S.build_slat_generator(1)}
        target = _Generators(models)
        backbones = [models[k].reverse_fn.backbone for k in GENERATORS.values()]

        def both():
            return S.generate_ss(target.ss_generator, seed=2), S.generate_slat(target.slat_generator, seed=2)
        with count_forwards(backbones) as ref_n:
            ref = both()
        with count_forwards(backbones) as acc_n, accelerate(target, "sam3d") as acc:
            out = both()
        d = S.PIPELINE_DEFAULTS
        expected = sum(S.expected_calls(d[k]["steps"], d[k]["rescale_t"], d[k]["cfg_interval"], d[k]["cfg_strength"])
                       for k in ("ss", "slat"))
        assert ref_n["calls"] == expected, (ref_n["calls"], expected)
        assert acc_n["calls"] < ref_n["calls"], (acc_n["calls"], ref_n["calls"])
        assert set(acc.stats["sites"]) == {"sparse_structure", "slat"}, acc.stats["sites"]
        for a, b in zip(out, ref):
            assert 0 < latent_drift(a, b) < 1

    return [cpu_stops_after_layout_check_naming_cuda, cli_says_so_in_one_line, bad_folders_are_clear_errors,
            offline_without_weights_names_repo, rgb_image_is_refused, accelerate_target_caches_both_real_generators]


FAMILIES = {"trellis": trellis_checks, "trellis2": trellis2_checks, "sam3d": sam3d_checks}


def main(family: str, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    checks = FAMILIES[family](Path(tmp))
    results = {}
    for fn in checks:
        try:
            fn()
            results[fn.__name__] = "ok"
        except Exception as e:  # noqa: BLE001 - reported per check
            results[fn.__name__] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
