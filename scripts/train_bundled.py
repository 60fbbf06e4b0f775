#!/usr/bin/env python
"""Train the bundled occupancy flow-matching generator on procedural shapes.

Reproduces the shipped weights (``hicache3d/bundled/weights/``) with the
defaults, e.g.::

    nice python scripts/train_bundled.py --seed 0 --steps 3000 \
        --out hicache3d/bundled/weights/bundled_occ32.safetensors

Recipe: ``--num-train`` training shapes (split ``train``, indices
``0..num_train-1``), random mirror augmentation (the fixed view is symmetric
under swapping world x and z), depth dropout (``--p-no-depth``, so that
silhouette-only user images work) and condition dropout (``--p-uncond``, for
classifier-free guidance).  Rectified-flow objective ``|v(x_t, t) - (eps - x_0)|^2``
with logit-normal ``t``, AdamW at a constant learning rate after a linear
warm-up, EMA of the weights (the EMA weights are shipped).  Because the
learning rate is constant after warm-up, the state after ``k`` steps does not
depend on ``--steps``.  Every ``--eval-every`` steps the EMA model is sampled
(25 steps, default guidance) on ``val`` shapes and the weights are written
to ``--out`` together with a JSON sidecar.  ``--minutes`` is a wall-clock
cap (training stops early when it is reached).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file, save_file  # noqa: E402

from hicache3d.bundled import shapes  # noqa: E402
from hicache3d.bundled.evaluation import evaluate, load_split, summary, without_depth  # noqa: E402
from hicache3d.bundled.generator import DEFAULT_SAMPLING, DEFAULT_WEIGHTS, BundledGenerator, save_weights  # noqa: E402
from hicache3d.bundled.model import ModelConfig, OccupancyVelocityNet, count_parameters, occupancy_to_latent  # noqa: E402


def build_dataset(n: int, cache: str | None):
    if cache and Path(cache).exists():
        d = load_file(cache)
        if d["occ"].shape[0] >= n:
            print(f"loaded {n} training shapes from {cache}", flush=True)
            return d["occ"][:n].bool(), d["cond"][:n]
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threading only adds overhead
    occ = torch.zeros((n,) + (shapes.GRID,) * 3, dtype=torch.bool)
    cond = torch.zeros((n, 2, shapes.IMAGE, shapes.IMAGE))
    for i in range(n):
        occ[i], cond[i] = shapes.make_example("train", i)
        if (i + 1) % 1000 == 0 or i + 1 == n:
            print(f"  shapes {i + 1}/{n}  {time.time() - t0:.0f}s", flush=True)
    torch.set_num_threads(threads)
    if cache:
        save_file({"occ": occ.to(torch.uint8), "cond": cond}, cache)
    return occ, cond


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap including data generation")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--num-train", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--p-no-depth", type=float, default=0.3)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--eval-n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="optional safetensors cache of the training shapes")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    config = ModelConfig()
    net = OccupancyVelocityNet(config)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = count_parameters(net)
    print(f"model: {n_params} parameters ({n_params * 4 / 1e6:.2f} MB fp32)", flush=True)

    occ_all, cond_all = build_dataset(args.num_train, args.cache)
    val_occ, val_cond = load_split("val", args.eval_n)
    print(f"data ready after {time.time() - t_start:.0f}s", flush=True)

    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    n = occ_all.shape[0]
    history = []
    loss_acc, loss_cnt = 0.0, 0
    t_train = time.time()
    step = 0

    def do_eval():
        g = BundledGenerator(ema)
        r = summary(evaluate(g, val_occ, val_cond, seed=1234))
        r_nd = summary(evaluate(g, val_occ, without_depth(val_cond), seed=1234), keys=("fscore", "iou"))
        r.update({f"nodepth_{k}": v for k, v in r_nd.items()})
        r["step"] = step
        r["minutes"] = (time.time() - t_start) / 60
        history.append(r)
        print(f"[eval step {step}] val F@0.1 {r['fscore_mean']:.3f} (min {r['fscore_min']:.3f})  "
              f"IoU {r['iou_mean']:.3f} (min {r['iou_min']:.3f})  CD {r['chamfer_mean']:.4f}  |  "
              f"silhouette-only F {r['nodepth_fscore_mean']:.3f} IoU {r['nodepth_iou_mean']:.3f}", flush=True)
        meta = {
            "name": Path(args.out).stem,
            "training": {k: v for k, v in vars(args).items() if k not in ("out", "cache")},
            "training_seed": args.seed,
            "steps": step,
            "minutes": round((time.time() - t_start) / 60, 2),
            "parameters": n_params,
            "sampling": DEFAULT_SAMPLING,
            "val_history": history,
        }
        save_weights(ema, args.out, meta)

    net.train()
    while step < args.steps:
        if (time.time() - t_start) / 60 > args.minutes:
            print(f"time cap of {args.minutes} min reached at step {step}", flush=True)
            break
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        occ = occ_all[idx]
        cond = cond_all[idx].clone()
        mirror = torch.rand(args.batch, generator=gen) < 0.5
        occ[mirror] = occ[mirror].transpose(-3, -1)
        cond[mirror] = cond[mirror].flip(-1)
        no_depth = torch.rand(args.batch, generator=gen) < args.p_no_depth
        cond[no_depth, 1] = 0
        uncond = torch.rand(args.batch, generator=gen) < args.p_uncond
        cond[uncond] = 0
        x0 = occupancy_to_latent(occ)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(args.batch, generator=gen))
        tb = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * eps
        target = eps - x0

        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        loss = torch.nn.functional.mse_loss(net(x_t, t, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.mul_(decay).add_(p, alpha=1 - decay)
        loss_acc += loss.item()
        loss_cnt += 1
        if step % 25 == 0:
            el = time.time() - t_train
            print(f"step {step}/{args.steps}  loss {loss_acc / loss_cnt:.4f}  lr {lr:.2e}  "
                  f"{step / el:.2f} it/s  elapsed {(time.time() - t_start) / 60:.1f} min", flush=True)
            loss_acc, loss_cnt = 0.0, 0
        if step % args.eval_every == 0:
            do_eval()
    if not history or history[-1]["step"] != step:
        do_eval()
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
