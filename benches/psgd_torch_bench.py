#!/usr/bin/env python3
"""The PyTorch side of `npm run bench -- --torch`: times psgd_torch's `KronWhiten` (the
same update rule as ours) and heavyball's `PSGDPRO` on the trees of benches/workloads.json
(the same shapes, the same number of leaves), torch on the CPU.

Usage (in the venv made by benches/setup-torch.sh):

    python benches/psgd_torch_bench.py --psgd-torch PATH --workload NAME \\
        --impl psgd-torch --rule PRO [--threads N] [--warmup N] [--repeats N]
    python benches/psgd_torch_bench.py --psgd-torch PATH --workload NAME --impl heavyball

PATH is psgd_torch's psgd.py at commit a8616f1 (it has no licence, so it is fetched, never
committed; its sha256 is checked as the fixture generator does). Prints one JSON line on
stdout with the per-step seconds of an updating step and of an apply-only step; everything
else goes to stderr.

What is timed, per step:
  psgd-torch  `KronWhiten.step(closure)` minus the closure's own cost: `step` takes its
              gradients from a closure through autograd (the loss is sum(p * g), so its
              gradient is g); that gradient pass is timed alone on every step and its
              median subtracted. Rule: dQ = "EQ", "Q0.5EQ1.5" or "QUAD". The update
              decision is `preconditioner_update_probability` 1 (updating) or 0
              (apply-only), as a training run sets it.
  heavyball   `PSGDPRO.step()` with `p.grad` set beforehand (no closure), eager mode
              (`heavyball.utils.compile_mode = None`: torch.compile on 2 cores takes
              minutes per shape and its RNG differs from eager's). The update decision is
              its schedule set to 1.0 then 0.0.

Both run the momentum (0.9) they would in training and update their parameters in place
(our functional step does neither the in-place add nor any gradient pass).

Preconditioner structure, matched to ours (psgd-jax's rule: after a scanned leaf's
leading axis, a leaf of rank < 2 or an axis longer than max_size_triangular is diagonal,
every other axis dense): psgd_torch's `preconditioner_max_size` is max_size_triangular and
its `preconditioner_max_skew` is chosen per workload to give the same dense axes where
that rule can (`d² > skew·numel` makes an axis diagonal); heavyball takes
max_size_triangular and min_ndim_triangular 2 as psgd-jax does. Neither has scanned
layers: a stacked (L, …) leaf is a tensor of one more axis to them, so they keep a small
dense L×L factor on it (and heavyball a dense factor on a stacked 1-D leaf). The record
lists every axis where the structure differs from ours.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

RULES = {"EQ": "EQ", "PRO": "Q0.5EQ1.5", "QUAD": "QUAD"}
DEFAULT_WORKLOADS = Path(__file__).resolve().parent / "workloads.json"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load_psgd_torch(path):
    """psgd_torch's psgd.py from `path`, checked against its sha256 by the fixture
    generator's loader; psgd.py's notes go to stderr."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "reference"))
    from generate_fixtures import load_psgd_torch as load

    out, sys.stdout = sys.stdout, sys.stderr
    try:
        return load(path)
    finally:
        sys.stdout = out


def our_dense(leaf, max_size):
    """Which axes of the leaf (as torch sees it: the whole shape) our Kron keeps dense."""
    shape = leaf["shape"]
    lead = 1 if leaf.get("scanned") else 0
    inner = shape[lead:]
    return [False] * lead + [len(inner) >= 2 and d <= max_size for d in inner]


def torch_dense(shape, max_size, skew):
    """psgd_torch's init_kron rule for the (squeezed) shape."""
    numel = 1
    for d in shape:
        numel *= d
    return [not (d <= 1 or d > max_size or d * d > skew * numel) for d in shape]


def heavyball_dense(shape, max_size):
    return [len(shape) >= 2 and d <= max_size for d in shape]


def mismatches(leaves, dense_of, max_size):
    out = []
    for leaf in leaves:
        ours = our_dense(leaf, max_size)
        theirs = dense_of(leaf["shape"])
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                out.append(f"{leaf['path']}[{i}]={leaf['shape'][i]}: {'dense' if b else 'diagonal'} (ours {'dense' if a else 'diagonal'})")
    return out


def best_skew(leaves, max_size):
    """The max_skew whose structure differs from ours on the fewest axes (ties: the
    fewest extra dense entries)."""
    candidates = {1.0, float("inf")}
    for leaf in leaves:
        numel = 1
        for d in leaf["shape"]:
            numel *= d
        for d in leaf["shape"]:
            r = d * d / numel
            candidates.update({r, r * 0.999, r * 1.001})

    def cost(s):
        m = mismatches(leaves, lambda sh: torch_dense(sh, max_size, s), max_size)
        return (len(m), s)

    return min(sorted(candidates), key=cost)


def median_or_nan(xs):
    return statistics.median(xs) if xs else float("nan")


def timing(xs):
    return {"times_s": xs, "min": min(xs), "median": statistics.median(xs)}


def bench_psgd_torch(module, leaves, rule, options, warmup, repeats):
    max_size = options.get("max_size_triangular", float("inf"))
    skew = best_skew(leaves, max_size)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(l["shape"], generator=gen)) for l in leaves]
    grads = [torch.randn(l["shape"], generator=gen) for l in leaves]
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        opt = module.KronWhiten(
            params,
            preconditioner_max_size=max_size,
            preconditioner_max_skew=skew,
            preconditioner_init_scale=1.0,
            lr_params=options.get("learning_rate", 1e-3),
            lr_preconditioner=0.1,
            momentum=options.get("b1", 0.9),
            preconditioner_update_probability=1.0,
            dQ=RULES[rule],
        )
    finally:
        sys.stdout = out

    def closure():
        return sum((p * g).sum() for p, g in zip(params, grads))

    def gradient_pass():
        with torch.enable_grad():
            torch.autograd.grad(closure(), params)

    def run(prob, n):
        opt.preconditioner_update_probability = prob
        steps, grads_t = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            opt.step(closure)
            steps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            gradient_pass()
            grads_t.append(time.perf_counter() - t0)
        g = median_or_nan(grads_t)
        return [s - g for s in steps], grads_t

    kinds, gradient = {}, {}
    for kind, prob in (("update", 1.0), ("apply", 0.0)):
        run(prob, warmup)
        steps, grads_t = run(prob, repeats)
        kinds[kind] = timing(steps)
        gradient[kind] = timing(grads_t)
    return {
        "impl": "psgd-torch",
        "rule": RULES[rule],
        "preconditioner_max_skew": skew,
        "kinds": kinds,
        "gradient_pass_subtracted": gradient,
        "structure_differs": mismatches(leaves, lambda sh: torch_dense(sh, max_size, skew), max_size),
    }


def bench_heavyball(leaves, options, warmup, repeats):
    import heavyball

    heavyball.utils.compile_mode = None
    max_size = options.get("max_size_triangular", 2048)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(l["shape"], generator=gen)) for l in leaves]
    grads = [torch.randn(l["shape"], generator=gen) for l in leaves]
    opt = heavyball.PSGDPRO(
        params,
        lr=options.get("learning_rate", 1e-3),
        max_size_triangular=max_size,
        min_ndim_triangular=2,
        preconditioner_update_probability=1.0,
    )

    def run(prob, n):
        opt.precond_schedule = prob
        steps = []
        for _ in range(n):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            t0 = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - t0)
        return steps

    kinds = {}
    for kind, prob in (("update", 1.0), ("apply", 0.0)):
        run(prob, warmup)
        kinds[kind] = timing(run(prob, repeats))
    return {
        "impl": "heavyball",
        "version": heavyball.__version__ if hasattr(heavyball, "__version__") else "3.2.1",
        "compile_mode": None,
        "kinds": kinds,
        "structure_differs": mismatches(leaves, lambda sh: heavyball_dense(sh, max_size), max_size),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--psgd-torch", help="path of psgd_torch's psgd.py (commit a8616f1)")
    ap.add_argument("--workloads", type=Path, default=DEFAULT_WORKLOADS)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--impl", choices=["psgd-torch", "heavyball"], required=True)
    ap.add_argument("--rule", choices=sorted(RULES), default="PRO")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args(argv)
    config = json.loads(args.workloads.read_text())
    workload = next((w for w in config["workloads"] if w["name"] == args.workload), None)
    if workload is None:
        sys.exit(f"unknown workload '{args.workload}'")
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else workload.get("warmup", config["warmup"])
    repeats = args.repeats if args.repeats is not None else workload.get("repeats", config["repeats"])
    options = config["variants"]["kron"]
    torch.manual_seed(0)
    with torch.no_grad():
        if args.impl == "psgd-torch":
            if not args.psgd_torch:
                sys.exit("--impl psgd-torch needs --psgd-torch PATH (psgd_torch's psgd.py)")
            record = bench_psgd_torch(load_psgd_torch(args.psgd_torch), workload["leaves"], args.rule, options, warmup, repeats)
        else:
            record = bench_heavyball(workload["leaves"], options, warmup, repeats)
    record.update({
        "workload": workload["name"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
    })
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
