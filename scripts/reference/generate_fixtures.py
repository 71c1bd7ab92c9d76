#!/usr/bin/env python3
"""Golden-fixture generator: runs the Python reference psgd-jax 0.2.9 and records
what it did, in the case format of shared/spec/conformance.md.

Environment (CPU only; this script installs nothing). The exact command it was run with:

    python3 -m venv .venv-ref
    .venv-ref/bin/pip install "psgd-jax==0.2.9" "jax==0.4.38" "jaxlib==0.4.38" \
        "optax==0.2.4" "flax==0.10.2" "chex==0.1.88" "numpy<2.2" safetensors

(resolved there to numpy 2.1.3 and safetensors 0.8.0, with Python 3.11.)

Usage:

    .venv-ref/bin/python scripts/reference/generate_fixtures.py \
        --cases scripts/reference/cases/kron.json --out fixtures/kron

CASES.json is a list of {name, variant, options, params, steps, hessian, seed}:
  - params: {path: shape}; a FLAT dict, so JAX's leaf order is the sorted path order.
  - options: psgd-jax keyword arguments (snake_case), passed unchanged. Pytree options
    (weight_decay_mask, scanned_layers) are given as flat {path: bool} dicts.
  - seed: drives numpy's default_rng for the problem (initial params, gradients).

The problem, per leaf (leaves in sorted path order, each drawing h, target, p0 in turn):
a fixed ill-conditioned diagonal quadratic with curvature h = exp(U(-2, 2)), target
~ N(0, 1) and initial params p0 ~ N(0, 1). At step t the gradient fed is
g_t = h * (p_t - target) + 0.1 * noise_t (noise ~ N(0, 1), drawn per step for every
leaf in order), computed in float64 and rounded to float32, and
p_{t+1} = optax.apply_updates(p_t, update_t) in float32.
In Hessian mode (variants other than kron) the step additionally draws, after the
noise, vector_t ~ N(0, 1) per leaf and a uniform u_t; hvp_t = h * vector_t (exact for the
quadratic) and update_precond_t = (u_t < preconditioner_update_probability) or t < 2,
mirroring psgd_jax.utils.hessian_helper.

Random draws of the reference are recorded by wrapping jax.random.normal and
jax.random.uniform and running everything eagerly under jax.disable_jit(), so that
lax.cond only runs (and draws in) the branch actually taken. Each case is then re-run
without the wrappers and without disable_jit (plain eager, and jitted) on the same
gradients, and the updates must agree within 1e-5 of the update RMS.
"""

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import sys

import numpy as np

import jax
import jax.numpy as jnp
import optax
from safetensors.numpy import save_file

import psgd_jax
import psgd_jax.kron
import psgd_jax.xmat
import psgd_jax.low_rank_approximation
import psgd_jax.affine

REFERENCE_VERSION = "0.2.9"
SANITY_TOL = 1e-5

# variant name -> optimizer factory (called with the case's options as keyword
# arguments). hessian=True cases pass Hvp/vector/update_preconditioner to update(),
# which kron's update function does not take.
VARIANTS = {
    "kron": {"factory": lambda: psgd_jax.kron.kron, "hessian": False},
    "xmat": {"factory": lambda: psgd_jax.xmat.xmat, "hessian": True},
    "lra": {
        "factory": lambda: psgd_jax.low_rank_approximation.low_rank_approximation,
        "hessian": True,
    },
    "affine": {"factory": lambda: psgd_jax.affine.affine, "hessian": True},
}


# ----------------------------------------------------------------------------------
# recording of psgd-jax's random draws


class DrawRecorder:
    """Wraps jax.random.normal / jax.random.uniform; appends every result to the
    list of the current phase ("init" or a step index)."""

    def __init__(self):
        self.phase = None
        self.draws = {}  # phase -> list of (kind, np.ndarray)

    def set_phase(self, phase):
        self.phase = phase
        self.draws.setdefault(phase, [])

    def _wrap(self, kind, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if self.phase is None:
                raise RuntimeError(f"jax.random.{kind} called outside a recorded phase")
            arr = np.asarray(out)  # fails loudly on a tracer (i.e. not eager)
            self.draws[self.phase].append((kind, arr.astype(np.float32)))
            return out

        return wrapper

    @contextlib.contextmanager
    def patched(self):
        orig_normal, orig_uniform = jax.random.normal, jax.random.uniform
        jax.random.normal = self._wrap("normal", orig_normal)
        jax.random.uniform = self._wrap("uniform", orig_uniform)
        try:
            with jax.disable_jit():
                yield self
        finally:
            jax.random.normal, jax.random.uniform = orig_normal, orig_uniform


# ----------------------------------------------------------------------------------
# the problem


class Problem:
    def __init__(self, params_spec, seed):
        self.paths = sorted(params_spec)
        self.shapes = {p: tuple(int(d) for d in params_spec[p]) for p in self.paths}
        self.rng = np.random.default_rng(seed)
        self.h, self.target, self.p0 = {}, {}, {}
        for p in self.paths:
            s = self.shapes[p]
            self.h[p] = np.exp(self.rng.uniform(-2.0, 2.0, size=s))
            self.target[p] = self.rng.standard_normal(size=s)
            self.p0[p] = self.rng.standard_normal(size=s).astype(np.float32)

    def grad(self, params):
        out = {}
        for p in self.paths:
            noise = self.rng.standard_normal(size=self.shapes[p])
            x = np.asarray(params[p], dtype=np.float64)
            out[p] = (self.h[p] * (x - self.target[p]) + 0.1 * noise).astype(np.float32)
        return out

    def hessian_extras(self, t, prob):
        vector = {
            p: self.rng.standard_normal(size=self.shapes[p]).astype(np.float32)
            for p in self.paths
        }
        hvp = {
            p: (self.h[p] * vector[p].astype(np.float64)).astype(np.float32)
            for p in self.paths
        }
        u = self.rng.uniform()
        return hvp, vector, bool(u < prob or t < 2)


def to_jax(tree):
    return {k: jnp.asarray(v, dtype=jnp.float32) for k, v in tree.items()}


def to_np(tree):
    return {k: np.asarray(v, dtype=np.float32) for k, v in tree.items()}


def make_optimizer(case):
    variant = VARIANTS[case["variant"]]
    return variant["factory"]()(**case.get("options", {}))


def record_case(case):
    """Runs the reference eagerly with the recorder. Returns a dict with the
    per-step inputs, outputs and draws."""
    if case["variant"] not in VARIANTS:
        raise ValueError(f"unknown variant {case['variant']!r}")
    hessian = bool(case.get("hessian", False))
    if hessian and not VARIANTS[case["variant"]]["hessian"]:
        raise ValueError(f"variant {case['variant']} has no Hessian mode")

    problem = Problem(case["params"], case["seed"])
    prob = case.get("options", {}).get("preconditioner_update_probability", 1.0)
    rec = DrawRecorder()
    grads, updates, extras = [], [], []
    with rec.patched():
        opt = make_optimizer(case)
        params = to_jax(problem.p0)
        rec.set_phase("init")
        state = opt.init(params)
        for t in range(case["steps"]):
            rec.set_phase(t)
            g = problem.grad(params)
            kwargs = {}
            if hessian:
                hvp, vector, flag = problem.hessian_extras(t, prob)
                extras.append((hvp, vector, flag))
                kwargs = dict(
                    Hvp=to_jax(hvp),
                    vector=to_jax(vector),
                    update_preconditioner=jnp.asarray(flag),
                )
            u, state = opt.update(to_jax(g), state, params, **kwargs)
            grads.append(g)
            updates.append(to_np(u))
            params = optax.apply_updates(params, u)
            params = {k: v.astype(jnp.float32) for k, v in params.items()}
    rec.phase = None
    return dict(problem=problem, grads=grads, updates=updates, extras=extras,
                draws=rec.draws)


def replay_case(case, rec, jit):
    """Same case, no recorder, no disable_jit, fed the recorded gradients."""
    opt = make_optimizer(case)
    params = to_jax(rec["problem"].p0)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    out = []
    for t in range(case["steps"]):
        kwargs = {}
        if rec["extras"]:
            hvp, vector, flag = rec["extras"][t]
            kwargs = dict(Hvp=to_jax(hvp), vector=to_jax(vector),
                          update_preconditioner=jnp.asarray(flag))
        u, state = update(to_jax(rec["grads"][t]), state, params, **kwargs)
        out.append(to_np(u))
        params = optax.apply_updates(params, u)
    return out


def max_rel_err(expected, got):
    worst = 0.0
    for e_step, g_step in zip(expected, got):
        e = np.concatenate([e_step[k].ravel() for k in sorted(e_step)]).astype(np.float64)
        g = np.concatenate([g_step[k].ravel() for k in sorted(g_step)]).astype(np.float64)
        rms = np.sqrt(np.mean(e * e)) if e.size else 0.0
        err = np.max(np.abs(e - g)) if e.size else 0.0
        worst = max(worst, err / rms if rms > 0 else err)
    return worst


def check_kron_draws(case, rec):
    """For kron with a constant update probability, psgd-jax updates the
    preconditioner deterministically (counter reaching 1/prob). Steps without an
    update must have recorded no draw; steps with one, one uniform (the balance
    draw) followed by one normal per leaf."""
    if case["variant"] != "kron":
        return None
    prob = case.get("options", {}).get("preconditioner_update_probability")
    leaves = rec["problem"].paths
    updated = []
    counter = 0
    for t in range(case["steps"]):
        d = rec["draws"][t]
        did = len(d) > 0
        updated.append(did)
        if did:
            kinds = [k for k, _ in d]
            assert kinds == ["uniform"] + ["normal"] * len(leaves), (t, kinds)
            assert d[0][1].shape == (), d[0][1].shape
            for (_, arr), p in zip(d[1:], leaves):
                assert arr.shape == rec["problem"].shapes[p], (t, p, arr.shape)
        if isinstance(prob, (int, float)):
            counter += 1
            expect = counter >= 1 / prob
            if expect:
                counter = 0
            assert did == expect, f"step {t}: draws {did}, counter rule {expect}"
    assert not rec["draws"]["init"], "kron should not draw at init"
    return updated


# ----------------------------------------------------------------------------------
# output


def write_case(case, rec, out_dir):
    d = os.path.join(out_dir, case["name"])
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    problem = rec["problem"]
    tensors = {}
    for p in problem.paths:
        tensors[f"param.{p}"] = problem.p0[p]
    for t in range(case["steps"]):
        for p in problem.paths:
            tensors[f"grad.{t}.{p}"] = rec["grads"][t][p]
            tensors[f"update.{t}.{p}"] = rec["updates"][t][p]
        if rec["extras"]:
            hvp, vector, flag = rec["extras"][t]
            for p in problem.paths:
                tensors[f"hvp.{t}.{p}"] = hvp[p]
                tensors[f"vector.{t}.{p}"] = vector[p]
            tensors[f"update_precond.{t}"] = np.asarray(1.0 if flag else 0.0, np.float32)
    for k, (_, arr) in enumerate(rec["draws"]["init"]):
        tensors[f"draw.init.{k}"] = arr
    for t in range(case["steps"]):
        for k, (_, arr) in enumerate(rec["draws"][t]):
            tensors[f"draw.{t}.{k}"] = arr
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays into shape [1]
    shapes = {k: np.shape(v) for k, v in tensors.items()}
    tensors = {k: np.array(v, dtype=np.float32, order="C") for k, v in tensors.items()}
    assert all(tensors[k].shape == shapes[k] for k in tensors)
    save_file(tensors, os.path.join(d, "tensors.safetensors"))

    def draw_list(lst):
        return [{"kind": kind, "shape": list(arr.shape)} for kind, arr in lst]

    meta = {
        "variant": case["variant"],
        "options": case.get("options", {}),
        "params": [{"path": p, "shape": list(problem.shapes[p])} for p in problem.paths],
        "steps": case["steps"],
        "hessian": bool(case.get("hessian", False)),
        "seed": case["seed"],
        "init_draws": draw_list(rec["draws"]["init"]),
        "draws": [draw_list(rec["draws"][t]) for t in range(case["steps"])],
        "reference": {
            "package": "psgd-jax",
            "version": REFERENCE_VERSION,
            "jax": jax.__version__,
            "optax": optax.__version__,
        },
    }
    with open(os.path.join(d, "case.json"), "w") as f:
        f.write(dump_json(meta))


def dump_json(meta):
    """JSON with one top-level key per line and one list element per line."""
    lines = []
    for k, v in meta.items():
        if isinstance(v, list) and v:
            items = ",\n".join("  " + json.dumps(x) for x in v)
            lines.append(f" {json.dumps(k)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="generate only these case names")
    args = ap.parse_args()

    jax.config.update("jax_platforms", "cpu")
    installed = importlib.metadata.version("psgd-jax")
    if installed != REFERENCE_VERSION:
        sys.exit(f"psgd-jax {installed} installed, need {REFERENCE_VERSION}")

    with open(args.cases) as f:
        cases = json.load(f)
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        sys.exit("duplicate case names")
    os.makedirs(args.out, exist_ok=True)

    failed = 0
    for case in cases:
        if args.only and case["name"] not in args.only:
            continue
        # psgd-jax prints its preconditioner sizes on init; keep our output readable
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            rec = record_case(case)
            eager = replay_case(case, rec, jit=False)
            jitted = replay_case(case, rec, jit=True)
        updated = check_kron_draws(case, rec)
        err_eager = max_rel_err(rec["updates"], eager)
        err_jit = max_rel_err(rec["updates"], jitted)
        n_draws = sum(len(rec["draws"][t]) for t in range(case["steps"]))
        n_init = len(rec["draws"]["init"])
        ok = err_eager <= SANITY_TOL and err_jit <= SANITY_TOL
        failed += not ok
        upd = ""
        if updated is not None:
            steps_upd = [str(t) for t, u in enumerate(updated) if u]
            upd = " precond-updated-steps=" + (
                "all" if all(updated) else ",".join(steps_upd) or "none")
        print(f"{case['name']}: steps={case['steps']} draws={n_draws} init_draws={n_init}"
              f" sanity eager={err_eager:.2e} jit={err_jit:.2e}"
              f" {'ok' if ok else 'MISMATCH'}{upd}", flush=True)
        write_case(case, rec, args.out)
    if failed:
        sys.exit(f"{failed} case(s) failed the sanity check")


if __name__ == "__main__":
    main()
