#!/usr/bin/env python3
"""The psgd-jax side of the side-by-side benchmark: times one optimizer step of the
Python reference on the workloads of benches/workloads.json.

Usage (in the venv made by benches/setup-reference.sh):

    python benches/psgd_jax_bench.py --workload transformer --variant kron \
        [--kinds update,apply] [--repeats N] [--warmup N] [--workloads FILE]
    python benches/psgd_jax_bench.py --workload transformer      # each of its variants
    python benches/psgd_jax_bench.py --all [--kinds ...] [--repeats N] [--warmup N]

Prints one JSON line per (workload, variant) on stdout; everything else goes to stderr
(psgd-jax prints preconditioner sizes on stdout, so stdout is rerouted while it runs).
Warmup and repeats come from the command line, else from the workload's own entry, else
from the file's top level (the Rust bench and the Node runner read them the same way).

Step kinds:
  update  a step that updates the preconditioner, then preconditions the gradient;
  apply   a step that only preconditions the gradient.
The kind is chosen through preconditioner_update_probability, the same knob a training
run uses, so each timed call is exactly a real psgd-jax step:
  - kron: probability 1.0 updates every step; with APPLY_PROBABILITY the deterministic
    counter (update when counter >= 1/p) never gets there. When both kinds run, the two
    are one schedule over the step number (kron takes a callable probability), so one
    compiled program serves both kinds.
  - xmat, lra, affine: probability 1.0 / 0.0. Their update functions take an
    `update_preconditioner` argument, but it is overwritten from the probability unless
    a Hessian-vector product is passed too, and they force an update on the first
    FORCED_UPDATE_STEPS steps (count < 2); those steps are always run untimed.
The kinds run in order on one chain of states, as in the Rust bench: the first starts
from the optimizer's initial state, and each later kind goes on from the state the one
before it left, so the apply kind needs no forced updates of its own.

Memory: state_bytes is the size of the initial optimizer state (every leaf, the step
counters and PRNG keys included). RSS figures come from /proc/self/status; VmHWM is
reset at the start of each (workload, variant) where the kernel allows it
(hwm_reset), so that one run's peak does not carry into the next.
"""
import argparse
import gc
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from psgd_jax.affine import affine
from psgd_jax.kron import kron
from psgd_jax.low_rank_approximation import low_rank_approximation
from psgd_jax.xmat import xmat

CONSTRUCTORS = {
    "kron": kron,
    "xmat": xmat,
    "lra": low_rank_approximation,
    "affine": affine,
}
KINDS = ("update", "apply")
# Small enough that kron's update counter (an int32 compared with 1/p) can never reach
# 1/p in a benchmark, yet not 0.0, for which kron would divide by zero.
APPLY_PROBABILITY = 1e-9
# xmat, lra and affine update on every step while count < 2, whatever the probability.
FORCED_UPDATE_STEPS = 2

DEFAULT_WORKLOADS = Path(__file__).resolve().parent / "workloads.json"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def proc_status_bytes(field):
    """A memory field of /proc/self/status (reported in kB) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_problem(leaves):
    """Flat {path: array} params and grads, so that JAX's leaf order is the sorted path
    order the other implementations use."""
    rng = np.random.default_rng(0)
    paths = sorted(leaf["path"] for leaf in leaves)
    shapes = {leaf["path"]: tuple(leaf["shape"]) for leaf in leaves}
    params = {
        p: jnp.asarray(rng.standard_normal(shapes[p], dtype=np.float32) * np.float32(0.02))
        for p in paths
    }
    grads = {p: jnp.asarray(rng.standard_normal(shapes[p], dtype=np.float32)) for p in paths}
    return params, grads


def kron_kinds_schedule(update_steps):
    """Kron's probability as a schedule of the step number: the first `update_steps` steps
    update, the later ones only apply. One compiled program then serves both kinds (kron
    takes a callable probability; the other variants take a float only)."""
    return lambda count: jnp.where(count <= update_steps, 1.0, APPLY_PROBABILITY)


def make_optimizer(variant, options, leaves, kind, probability=None):
    options = dict(options)
    if "preconditioner_update_probability" in options:
        log(f"note: {variant}: preconditioner_update_probability from the workloads file "
            "is replaced by the step kind's")
    if variant == "kron":
        options["preconditioner_update_probability"] = (
            probability if probability is not None
            else 1.0 if kind == "update" else APPLY_PROBABILITY
        )
        if any(leaf.get("scanned", False) for leaf in leaves):
            # Same structure as params (a flat dict); vmap rather than lax.map, which
            # trades speed for memory.
            options["scanned_layers"] = {
                leaf["path"]: bool(leaf.get("scanned", False)) for leaf in leaves
            }
            options["lax_map_scanned_layers"] = False
    else:
        # These variants precondition one flattened vector of all params, so a stacked
        # leading axis needs no special handling.
        options["preconditioner_update_probability"] = 1.0 if kind == "update" else 0.0
    return CONSTRUCTORS[variant](**options)


def timed_step(step, grads, state, params):
    t0 = time.perf_counter()
    updates, new_state = step(grads, state, params)
    jax.block_until_ready((updates, new_state))
    return time.perf_counter() - t0, new_state


def untimed_steps(variant, steps_before, warmup):
    # At least one, to hold compilation, and for xmat/lra/affine enough to pass their
    # forced updates if the chain has not passed them yet.
    forced = 0 if variant == "kron" else FORCED_UPDATE_STEPS - steps_before
    return max(warmup, 1, forced)


def run_kind(step, variant, params, grads, state, steps_before, warmup, repeats):
    """Runs one kind with the jitted `step` from `state` (after `steps_before` steps of the
    chain); returns its timings and the state it leaves."""
    untimed = untimed_steps(variant, steps_before, warmup)
    warmup_times = []
    for _ in range(untimed):
        dt, state = timed_step(step, grads, state, params)
        warmup_times.append(dt)
    times = []
    for _ in range(repeats):
        dt, state = timed_step(step, grads, state, params)
        times.append(dt)
    return {
        "times_s": times,
        "min": min(times) if times else None,
        "median": statistics.median(times) if times else None,
        "warmup": untimed,
        # The first call traces, compiles and runs one step (kron's apply kind, when it
        # follows the update kind, reuses that kind's program: see kron_kinds_schedule).
        "compile_s": warmup_times[0],
        "warmup_s": warmup_times[1:],
    }, state, untimed + repeats


def bench(workload, variant, variant_options, kinds, warmup, repeats):
    hwm_reset = reset_peak_rss()
    leaves = workload["leaves"]
    params, grads = make_problem(leaves)
    if variant == "kron" and kinds == ["update", "apply"]:
        shared = make_optimizer(variant, variant_options, leaves, None, kron_kinds_schedule(
            untimed_steps(variant, 0, warmup) + repeats))
        txs = dict.fromkeys(kinds, shared)
    else:
        txs = {kind: make_optimizer(variant, variant_options, leaves, kind) for kind in kinds}
    # one jitted step per distinct optimizer, so a shared one compiles once
    jitted = {id(tx): jax.jit(tx.update) for tx in txs.values()}
    steps = {kind: jitted[id(tx)] for kind, tx in txs.items()}
    # The initial state does not depend on the update probability: one serves all kinds.
    state0 = txs[kinds[0]].init(params)
    jax.block_until_ready(state0)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state0))

    rss_before = proc_status_bytes("VmRSS")
    hwm_before = proc_status_bytes("VmHWM")
    results = {}
    state, done = state0, 0
    for kind in kinds:
        log(f"{workload['name']}/{variant}/{kind}: running")
        results[kind], state, n = run_kind(steps[kind], variant, params, grads, state, done,
                                           warmup, repeats)
        done += n
        log(f"{workload['name']}/{variant}/{kind}: compile+first {results[kind]['compile_s']:.3f}s, "
            f"median {results[kind]['median'] * 1e3:.3f} ms")
    peak_rss = proc_status_bytes("VmHWM")

    return {
        "impl": "psgd-jax",
        "workload": workload["name"],
        "variant": variant,
        "jax": jax.__version__,
        "psgd_jax": version("psgd-jax"),
        "devices": str(jax.devices()),
        "kinds": results,
        "state_bytes": state_bytes,
        "rss_before_bytes": rss_before,
        "hwm_before_bytes": hwm_before,
        "peak_rss_bytes": peak_rss,
        "hwm_reset": hwm_reset,
        "compile_s": sum(r["compile_s"] for r in results.values()),
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", type=Path, default=DEFAULT_WORKLOADS)
    ap.add_argument("--workload", help="a workload name from the workloads file (alone: each "
                    "variant it lists)")
    ap.add_argument("--variant", choices=sorted(CONSTRUCTORS),
                    help="one variant (alone: on each workload that lists it)")
    ap.add_argument("--all", action="store_true",
                    help="every (workload, variant) of the workloads file, one line each")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help="comma-separated step kinds (default: update,apply)")
    ap.add_argument("--repeats", type=int, help="timed steps per kind (default: the file's)")
    ap.add_argument("--warmup", type=int, help="untimed steps per kind (default: the file's)")
    args = ap.parse_args(argv)
    if args.all == bool(args.workload or args.variant):
        ap.error("give either --all or --workload and/or --variant")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad or not args.kinds:
        ap.error(f"--kinds: expected a list of {', '.join(KINDS)}, got {bad or 'nothing'}")
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv):
    args = parse_args(argv)
    config = json.loads(args.workloads.read_text())
    workloads = {w["name"]: w for w in config["workloads"]}
    if args.workload and args.workload not in workloads:
        sys.exit(f"unknown workload '{args.workload}' (have: {', '.join(workloads)})")
    runs = [(w, v) for w in config["workloads"] if args.workload in (None, w["name"])
            for v in w["variants"] if args.variant in (None, v) and v in CONSTRUCTORS]
    if not runs:
        sys.exit(f"no workload lists variant '{args.variant}'"
                 + (f" (workload '{args.workload}')" if args.workload else ""))

    log(f"jax {jax.__version__}, psgd-jax {version('psgd-jax')}, devices {jax.devices()}")
    out = sys.stdout
    # psgd-jax prints on stdout (preconditioner and momentum sizes); keep stdout for the
    # JSON lines alone.
    sys.stdout = sys.stderr
    failed = 0
    for workload, variant in runs:
        warmup = args.warmup if args.warmup is not None else workload.get("warmup", config["warmup"])
        repeats = (args.repeats if args.repeats is not None
                   else workload.get("repeats", config["repeats"]))
        try:
            line = bench(workload, variant, config["variants"][variant],
                         args.kinds, warmup, repeats)
        except Exception as e:  # with several runs, one failing should not stop the rest
            if len(runs) == 1:
                raise
            failed += 1
            log(f"{workload['name']}/{variant}: FAILED: {type(e).__name__}: {e}")
            continue
        finally:
            # Drop compiled steps and buffers before the next run's RSS readings.
            jax.clear_caches()
            gc.collect()
        out.write(json.dumps(line) + "\n")
        out.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
