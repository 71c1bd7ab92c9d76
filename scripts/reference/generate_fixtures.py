#!/usr/bin/env python3
"""Golden-fixture generator: runs a Python reference (psgd-jax 0.2.9, psgd_torch's
psgd.py for "reference": "psgd-torch" cases, distributed-kron 2.0.0's `pro` for
"reference": "distributed-kron" cases, heavyball 3.2.1's `PSGDPRO` for "reference":
"heavyball" cases) and records what it did, in the case format of
shared/spec/conformance.md.

Environment (CPU only; this script installs nothing). The exact commands it was run with:

    python3 -m venv .venv-ref
    .venv-ref/bin/pip install "psgd-jax==0.2.9" "jax==0.4.38" "jaxlib==0.4.38" \
        "optax==0.2.4" "flax==0.10.2" "chex==0.1.88" "numpy<2.2" safetensors

(resolved there to numpy 2.1.3 and safetensors 0.8.0, with Python 3.11), and for the
psgd-torch cases (a separate venv; jax is not needed there):

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch opt_einsum numpy safetensors

(resolved to torch 2.15.0, opt_einsum 3.4.0, numpy 2.4.6, safetensors 0.8.0, Python
3.11.7; torch runs on the CPU). psgd_torch's psgd.py is fetched, never committed (it has
no licence): `git show a8616f1:psgd.py` in a clone of github.com/lixilinx/psgd_torch,
sha256 23fd61872406cc917779d674aeb3c12eba77af6c127c7473e500df27091f38f9.

and for the distributed-kron cases (another venv: distributed-kron 2.0.0 imports only on
jax < 0.6, and imports flax without declaring it):

    python3 -m venv /tmp/venv-dk
    /tmp/venv-dk/bin/pip install distributed-kron==2.0.0 jax==0.5.3 jaxlib==0.5.3 \
        flax==0.10.4 chex==0.1.89 optax==0.2.6 safetensors numpy

Usage:

    .venv-ref/bin/python scripts/reference/generate_fixtures.py \
        --cases scripts/reference/cases/kron.json --out fixtures/kron
    /tmp/venv-torch/bin/python scripts/reference/generate_fixtures.py \
        --cases scripts/reference/cases/kron_torch.json --out fixtures/kron-torch \
        --psgd-torch /tmp/psgd.py
    /tmp/venv-dk/bin/python scripts/reference/generate_fixtures.py \
        --cases scripts/reference/cases/kron_dk.json --out fixtures/kron-dk
    /tmp/venv-torch/bin/pip install heavyball==3.2.1
    /tmp/venv-torch/bin/python scripts/reference/generate_fixtures.py \
        --cases scripts/reference/cases/kron_hb.json --out fixtures/kron-hb

Each reference is imported only when a case needs it.

distributed-kron cases: its `pro` (options: its own keyword arguments) runs jitted on the
problem below. It has no sequential generator: every draw is a pure function of the
1-based step and a block index (dense 2-D blocks: keys split from
fold_in(PRNGKey(42), step), one per block of every dense leaf in tree order, each layer's
blocks row-major; 1-D leaves: fold_in(PRNGKey(46), step) split per layer). The draws are
recomputed from that schedule with jax.random and laid out as this package's Kron takes
them (dk_draws): leaves merged by pro's own _merge_dims, cut into unpadded blocks
grouped by shape, per part the noise, then per dense factor the norm-bound subspace and
(PRO) the Procrustes one, each cut from pro's padded (block_size) draws to the block's
valid size. pro balances deterministically every 100th step, which draws nothing
(the checker maps it to balanceEvery: 100).

heavyball cases: PSGDPRO (options: its own keyword arguments) runs eagerly
(heavyball.utils.compile_mode = None) with heavyball.utils.stochastic_round_ the identity
when called with one argument (its bfloat16 rounding of the Procrustes normaliser, which
draws randint_like; Kron's 'power' estimator is that normaliser in float32). Each step
sets p.grad = g_t and calls opt.step(). The tape (as for psgd-torch) records its
randn_like draws, one damping noise per bucket and fit; every case has leaves of distinct
shapes without size-1 axes (heavyball stacks same-shape params in one bucket and squeezes
size-1 axes), so each bucket is one leaf and its draw is put in sorted-path order. The
update of a step is taken where heavyball applies it (utils._compilable_update_,
p <- p*(1 - wd*lr) - lr*u) as -lr*u - lr*wd*p (float64 from its float32 operands, then
float32; heavyball's own float32 parameter difference would carry the parameters'
round-off, ~1e-4 of an update at lr 1e-3). Each case is replayed under another torch
seed from the tape and must agree bitwise, and heavyball's final parameters must equal
the initial ones plus the recorded updates within 1e-6. case.json's
"procrustes_clamped_steps" lists the steps where heavyball's clamp of its Procrustes step
acted (-c1/c2 outside [0, 0.5]).

CASES.json is a list of {name, variant, options, params, steps, hessian, seed}:
  - params: {path: shape}; a FLAT dict, so JAX's leaf order is the sorted path order.
  - options: psgd-jax keyword arguments (snake_case), passed unchanged. Pytree options
    (weight_decay_mask, scanned_layers) are given as flat {path: bool} dicts.
  - seed: drives numpy's default_rng for the problem (initial params, gradients).
  - reference (optional): "psgd-torch" runs psgd_torch's KronWhiten instead (variant
    "kron"), or with "hessian": true its KronNewton; the options are that class's own
    keyword arguments, and the seed also seeds torch (torch.manual_seed) before the run.

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

psgd-torch cases: KronWhiten.step is given a closure whose loss is sum(p * g_t), so its
autograd gradient is exactly the problem's g_t, and the parameters move by psgd_torch's
own step (p -= lr_params * u). The draws are recorded by a tape over torch.randn,
torch.randn_like and torch.rand, in call order (uniform draws are 0-d). The update of a
step is recorded where psgd_torch subtracts it from a parameter (-lr_params * u, float32).
psgd_torch clips each preconditioned gradient (RMS above grad_clip_max_amps[0] is scaled
down to it, then elements are clamped to +-grad_clip_max_amps[1]); whether that acted,
and the largest RMS and element of the preconditioned gradients before it, are recorded
in case.json under "update_clip" (the checker maps grad_clip_max_amps to Kron's
updateClipRms and updateClipElement). Each case is then replayed under
another torch seed with the tape handing back the recorded draws, and the updates must
agree bitwise: the tape holds every random number the run used.

psgd-torch Newton cases ("hessian": true, KronNewton): the closure's loss is
sum(p * g_t) + sum(0.5 * h * (p - p_t)^2), so the gradient at p_t is exactly g_t and the
Hessian-vector product of KronNewton's probe V is h * V (h the problem's curvature).
KronNewton draws its update decision and its probes itself; those draws are not on the
case's tape: the probe and the Hessian-vector product each fit used are recorded as
vector.t.path and hvp.t.path, and the decision as update_precond.t (zeros and 0 on a
step that did not fit), which is what this package's Hessian mode takes from its caller.
The tape keeps the fit's own draws (the damping noise, the subspaces, the balance
uniform) in order. KronNewton has no update clip (grad_clip_max_norm is infinite);
"update_clip" records the largest RMS and element of its preconditioned gradients.
"""

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import sys

import hashlib
import importlib.util

import numpy as np
from safetensors.numpy import save_file

# imported by import_jax() when a psgd-jax case needs them
jax = jnp = optax = psgd_jax = None

REFERENCE_VERSION = "0.2.9"
PSGD_TORCH_SHA256 = "23fd61872406cc917779d674aeb3c12eba77af6c127c7473e500df27091f38f9"
PSGD_TORCH_COMMIT = "a8616f1"
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


def import_jax():
    """Imports jax, optax and psgd-jax (once), checking psgd-jax's version."""
    global jax, jnp, optax, psgd_jax
    if psgd_jax is not None:
        return
    import jax as _jax
    import jax.numpy as _jnp
    import optax as _optax
    import psgd_jax as _psgd_jax
    import psgd_jax.kron  # noqa: F401
    import psgd_jax.xmat  # noqa: F401
    import psgd_jax.low_rank_approximation  # noqa: F401
    import psgd_jax.affine  # noqa: F401

    jax, jnp, optax, psgd_jax = _jax, _jnp, _optax, _psgd_jax
    jax.config.update("jax_platforms", "cpu")
    installed = importlib.metadata.version("psgd-jax")
    if installed != REFERENCE_VERSION:
        sys.exit(f"psgd-jax {installed} installed, need {REFERENCE_VERSION}")


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
# psgd_torch (KronWhiten), for "reference": "psgd-torch" cases

# KronWhiten's keyword arguments (psgd.py at PSGD_TORCH_COMMIT) a case may set
TORCH_KRON_OPTIONS = {
    "dQ", "lr_params", "lr_preconditioner", "betaL", "damping", "momentum",
    "grad_clip_max_amps", "preconditioner_max_size", "preconditioner_max_skew",
    "preconditioner_init_scale", "preconditioner_update_probability", "whiten_grad",
    "update_preconditioner_first",
}


def load_psgd_torch(path):
    """psgd_torch's psgd.py from `path`, checked against its sha256; imports torch."""
    if path is None:
        sys.exit("psgd-torch cases need --psgd-torch PATH (psgd_torch's psgd.py)")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != PSGD_TORCH_SHA256:
        sys.exit(f"{path}: sha256 {digest}, need {PSGD_TORCH_SHA256} "
                 f"(psgd.py at commit {PSGD_TORCH_COMMIT})")
    spec = importlib.util.spec_from_file_location("psgd_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TorchTape:
    """Wraps torch.randn, torch.randn_like and torch.rand. Recording, it appends every
    result to the list of the current phase; replaying, it hands back the recorded
    arrays in order instead (failing on another kind or shape)."""

    def __init__(self, torch):
        self.torch = torch
        self.phase = None
        self.draws = {}  # phase -> list of (kind, np.ndarray)
        self.replay = None  # phase -> list, when replaying

    def set_phase(self, phase):
        self.check_used()
        self.phase = phase
        self.draws.setdefault(phase, [])
        self.cursor = 0

    def check_used(self):
        """Replaying: every recorded draw of the current phase was handed back."""
        if self.replay is not None and self.phase is not None:
            if self.cursor != len(self.replay[self.phase]):
                raise RuntimeError(f"phase {self.phase}: {len(self.replay[self.phase])} "
                                   f"draws recorded, {self.cursor} used")

    def _wrap(self, kind, fn):
        torch = self.torch

        def wrapper(*args, **kwargs):
            if self.phase is None:
                raise RuntimeError(f"torch draw ({kind}) outside a recorded phase")
            out = fn(*args, **kwargs)
            if self.replay is not None:
                recorded = self.replay[self.phase]
                if self.cursor >= len(recorded):
                    raise RuntimeError(f"phase {self.phase}: more draws than recorded")
                rkind, arr, _ = recorded[self.cursor]
                self.cursor += 1
                if rkind != kind or tuple(arr.shape) != tuple(out.shape):
                    raise RuntimeError(f"phase {self.phase}: drew {kind} {tuple(out.shape)}, "
                                       f"recorded {rkind} {arr.shape}")
                return torch.from_numpy(arr.copy()).to(out.dtype)
            if out.dtype != torch.float32:
                raise RuntimeError(f"torch draw of dtype {out.dtype}; cases are float32")
            # the function that drew (a comprehension's frame stands for its function)
            frame = sys._getframe(1)
            while frame.f_code.co_name.startswith("<") and frame.f_back is not None:
                frame = frame.f_back
            caller = frame.f_code.co_name
            self.draws[self.phase].append((kind, out.detach().numpy().copy(), caller))
            return out

        return wrapper

    @contextlib.contextmanager
    def patched(self, replay=None):
        torch = self.torch
        self.replay = replay
        orig = torch.randn, torch.randn_like, torch.rand
        torch.randn = self._wrap("normal", orig[0])
        torch.randn_like = self._wrap("normal", orig[1])
        torch.rand = self._wrap("uniform", orig[2])
        try:
            yield self
        finally:
            torch.randn, torch.randn_like, torch.rand = orig
            self.phase = None


# KronNewton's keyword arguments, for "hessian": true psgd-torch cases
TORCH_KRON_NEWTON_OPTIONS = {
    "dQ", "lr_params", "lr_preconditioner", "betaL", "damping", "momentum",
    "grad_clip_max_norm", "preconditioner_max_size", "preconditioner_max_skew",
    "preconditioner_init_scale", "preconditioner_update_probability",
}


def torch_kron_options(case):
    options = dict(case.get("options", {}))
    newton = bool(case.get("hessian"))
    known = TORCH_KRON_NEWTON_OPTIONS if newton else TORCH_KRON_OPTIONS
    unknown = set(options) - known
    if unknown:
        cls = "KronNewton" if newton else "KronWhiten"
        raise ValueError(f"{case['name']}: not {cls} options: {sorted(unknown)}")
    if newton and options.get("preconditioner_init_scale") is None:
        raise ValueError(f"{case['name']}: KronNewton's automatic initial scale reads the "
                         "probes; give preconditioner_init_scale")
    if case["variant"] != "kron":
        raise ValueError(f"{case['name']}: psgd-torch cases are kron cases")
    if "grad_clip_max_amps" in options:
        options["grad_clip_max_amps"] = tuple(options["grad_clip_max_amps"])
    return options


def run_torch_case(case, ref, tape, grads=None, replay=None):
    """Runs KronWhiten over the case's steps. With `grads` (a list per step) those are fed,
    else the problem's gradients at the current params. Returns (problem, grads, updates,
    clip), clip = per step the largest RMS and element of the preconditioned gradients
    before psgd_torch's clip."""
    torch = tape.torch
    problem = Problem(case["params"], case["seed"])
    options = torch_kron_options(case)
    max_amps = options.get("grad_clip_max_amps", (2.0, 10.0))
    params = [torch.nn.Parameter(torch.from_numpy(np.array(problem.p0[p], dtype=np.float32)))
              for p in problem.paths]
    newton = bool(case.get("hessian"))
    seen = {"pre": [], "updates": {}, "pairs": []}
    h = [torch.from_numpy(np.array(problem.h[p], dtype=np.float32)) for p in problem.paths]

    def precond_recorder(orig):
        def wrapper(*args, **kwargs):
            out = orig(*args, **kwargs)
            seen["pre"].append(out.detach().clone())  # before the in-place clip
            return out
        return wrapper

    def pair_recorder(orig):
        # KronNewton's fit: the probe V and the Hessian-vector product it was given
        def wrapper(QL, exprs, v, hvp, **kwargs):
            seen["pairs"].append((v.detach().numpy().copy(), hvp.detach().numpy().copy()))
            return orig(QL, exprs, v, hvp, **kwargs)
        return wrapper

    orig_subtract = torch.Tensor.subtract_

    def subtract_recorder(self, other, alpha=1):
        for i, p in enumerate(params):
            if self is p:
                u = (other.detach().reshape(p.shape) * (-alpha)).numpy().copy()
                seen["updates"][problem.paths[i]] = u.astype(np.float32)
        return orig_subtract(self, other, alpha=alpha)

    out_grads, updates, clip, extras = [], [], [], []
    torch.Tensor.subtract_ = subtract_recorder
    try:
        torch.manual_seed(case["seed"] + (1 if replay is not None else 0))
        with tape.patched(replay), contextlib.redirect_stdout(open(os.devnull, "w")):
            tape.set_phase("init")
            opt = (ref.KronNewton if newton else ref.KronWhiten)(params, **options)
            opt._precond_grad = precond_recorder(opt._precond_grad)
            if newton:
                opt._update_precond = pair_recorder(opt._update_precond)
            for t in range(case["steps"]):
                tape.set_phase(t)
                g = step_grad(problem, params, grads, t)
                gt = [torch.from_numpy(np.array(g[p], dtype=np.float32)) for p in problem.paths]

                def closure():
                    # gradient exactly g_t at p_t; Hessian h (diagonal): HVP = h * v
                    loss = sum((x * gx).sum() for x, gx in zip(params, gt))
                    if newton:
                        loss = loss + sum((0.5 * hx * (x - x.detach()) ** 2).sum()
                                          for x, hx in zip(params, h))
                    return loss

                seen["pre"], seen["updates"], seen["pairs"] = [], {}, []
                opt.step(closure)
                if sorted(seen["updates"]) != problem.paths:
                    raise RuntimeError(f"step {t}: updates of {sorted(seen['updates'])}")
                out_grads.append(g)
                updates.append(dict(seen["updates"]))
                if newton:
                    extras.append(newton_extras(problem, seen["pairs"]))
                rms = max(float(torch.sqrt(torch.mean(x * x))) for x in seen["pre"])
                amax = max(float(x.abs().max()) for x in seen["pre"])
                clip.append({"max_rms": rms, "max_abs": amax,
                             "acted": not newton and (rms > max_amps[0] or amax > max_amps[1])})
            tape.check_used()
    finally:
        torch.Tensor.subtract_ = orig_subtract
    return problem, out_grads, updates, clip, extras


def step_grad(problem, params, grads, t):
    """The gradient of step `t`: `grads[t]` when given, else the problem's gradient at the
    torch parameters `params`."""
    if grads is not None:
        return grads[t]
    return problem.grad({p: x.detach().numpy() for p, x in zip(problem.paths, params)})


def newton_extras(problem, pairs):
    """One step's (hvp, vector, updated) as the case format has them: the pairs KronNewton
    fitted on (in leaf order, shaped like the params), or zeros and False on a step that
    did not fit."""
    if not pairs:
        zeros = {p: np.zeros(problem.shapes[p], np.float32) for p in problem.paths}
        return zeros, dict(zeros), False
    if len(pairs) != len(problem.paths):
        raise RuntimeError(f"{len(pairs)} fitted pairs for {len(problem.paths)} leaves")
    vector = {p: v.reshape(problem.shapes[p]) for p, (v, _) in zip(problem.paths, pairs)}
    hvp = {p: hv.reshape(problem.shapes[p]) for p, (_, hv) in zip(problem.paths, pairs)}
    return hvp, vector, True


def record_torch_case(case, ref):
    import torch

    torch.set_default_dtype(torch.float32)
    tape = TorchTape(torch)
    problem, grads, updates, clip, extras = run_torch_case(case, ref, tape)
    draws = tape.draws
    replayed = TorchTape(torch)
    _, _, again, _, _ = run_torch_case(case, ref, replayed, grads=grads, replay=draws)
    bitwise = all(np.array_equal(a[p], b[p]) for a, b in zip(updates, again) for p in a)
    if case.get("hessian"):
        # KronNewton's own draws (the update decision, the probes) are the caller's side
        # of this package's Hessian mode: the case hands them over as update_precond and
        # vector, and only the fit's draws stay on the tape
        draws = {k: [(kind, arr) for kind, arr, caller in v if caller != "step"]
                 for k, v in draws.items()}
    else:
        draws = {k: [(kind, arr) for kind, arr, _ in v] for k, v in draws.items()}
    return dict(problem=problem, grads=grads, updates=updates, extras=extras, draws=draws,
                clip=clip, replay_bitwise=bitwise, torch_version=torch.__version__)


# ----------------------------------------------------------------------------------
# distributed-kron 2.0.0 (`pro`), for "reference": "distributed-kron" cases

DK_VERSION = "2.0.0"
# pro's keyword arguments a case may set
DK_PRO_OPTIONS = {
    "learning_rate", "lr_style", "b1", "weight_decay", "max_size_dense", "preconditioner_lr",
    "preconditioner_init_scale", "preconditioner_update_style", "scanned_layers", "block_size",
    "noise_scale",
}
DK_SUBSPACE = 32


def import_dk():
    """Imports jax, optax and distributed-kron's `pro` module (shadowed in the package by
    the function of the same name), checking distributed-kron's version."""
    global jax, jnp, optax
    import jax as _jax
    import jax.numpy as _jnp
    import optax as _optax
    import distributed_kron  # noqa: F401

    jax, jnp, optax = _jax, _jnp, _optax
    jax.config.update("jax_platforms", "cpu")
    installed = importlib.metadata.version("distributed-kron")
    if installed != DK_VERSION:
        sys.exit(f"distributed-kron {installed} installed, need {DK_VERSION}")
    return sys.modules["distributed_kron.pro"]


def dk_merge_dims(shape):
    """distributed-kron pro's `_merge_dims` (the package's own function is used; this
    wrapper only turns its numpy ints into ints)."""
    merged = sys.modules["distributed_kron.pro"]._merge_dims(tuple(shape))
    return tuple(int(d) for d in merged)


def our_parts(shape, scanned, block_size):
    """This package's layout of a leaf under mergeDims 'twoD' and blockSize (see
    crates/psgd/src/variants/kron/layout.rs): per part (blocks of one shape, in the order
    their first block appears in the row-major block grid) the block shape and its blocks'
    grid coordinates; the part stacks its blocks block-major, then the layers."""
    B = shape[0] if scanned else 1
    merged = dk_merge_dims(shape[1:] if scanned else shape)
    if len(merged) <= 1:
        return B, merged, [(merged, [()])]
    lengths = []
    for d in merged:
        nb = -(-d // block_size)
        lengths.append([block_size] * (nb - 1) + [d - block_size * (nb - 1)])
    parts = []
    for r, h in enumerate(lengths[0]):
        for c, w in enumerate(lengths[1]):
            for shp, blocks in parts:
                if shp == (h, w):
                    blocks.append((r, c))
                    break
            else:
                parts.append(((h, w), [(r, c)]))
    return B, merged, parts


def dk_draws(case, problem, step):
    """The draws distributed-kron pro makes at 1-based step `step`, recomputed from its
    key schedule with jax.random and laid out in the order and shapes this package's Kron
    consumes them: per leaf (sorted paths) and part, the noise (the part's shape), per
    dense factor the subspace of its norm bound and, under PRO, of its Procrustes step
    ((B, 32, d), or (32, d) for a part of one unscanned block). pro balances
    deterministically every 100th step (`balanceEvery: 100` here), which draws nothing."""
    o = case["options"]
    style = o.get("preconditioner_update_style", "PRO")
    bs = o.get("block_size", 256)
    scanned = o.get("scanned_layers") or {}
    layouts = {p: our_parts(problem.shapes[p], scanned.get(p, False), bs) for p in problem.paths}
    # dense blocks of every 2-D leaf in tree order, each layer's blocks row-major
    n_dense = sum(B * len(lengths_of(merged, bs)[0]) * len(lengths_of(merged, bs)[1])
                  for B, merged, _ in layouts.values() if len(merged) == 2)
    dense_keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(42), step), max(n_dense, 1))
    one_d_key = jax.random.fold_in(jax.random.PRNGKey(46), step)
    out = []
    offset = 0
    for p in problem.paths:
        B, merged, parts = layouts[p]
        if len(merged) <= 1:
            m = int(np.prod(merged)) if merged else 1
            keys = jax.random.split(one_d_key, B)
            nu = np.stack([np.asarray(jax.random.normal(keys[b], (m,))) for b in range(B)])
            # the part's shape: the merged axes, after the layer axis of a scanned leaf
            shape = ((B,) if scanned.get(p, False) else ()) + tuple(merged)
            out.append(("normal", nu.reshape(shape).astype(np.float32)))
            continue
        nr, nc = (len(x) for x in lengths_of(merged, bs))
        stacked = len(parts) > 1 or len(parts[0][1]) > 1 or scanned.get(p, False)
        for (h, w), blocks in parts:
            nus, spd_l, skh_l, spd_r, skh_r = [], [], [], [], []
            for (r, c) in blocks:
                for b in range(B):
                    key = dense_keys[offset + b * nr * nc + r * nc + c]
                    k1, k2 = jax.random.split(key)
                    nus.append(np.asarray(jax.random.normal(k2, (bs, bs)))[:h, :w])
                    k3, k4 = jax.random.split(k1)
                    for k, d, spd, skh in ((k3, h, spd_l, skh_l), (k4, w, spd_r, skh_r)):
                        if style == "PRO":
                            a, b_ = jax.random.split(k)
                            spd.append(np.asarray(jax.random.normal(a, (DK_SUBSPACE, bs)))[:, :d])
                            skh.append(np.asarray(jax.random.normal(b_, (DK_SUBSPACE, bs)))[:, :d])
                        else:
                            spd.append(np.asarray(jax.random.normal(k, (DK_SUBSPACE, bs)))[:, :d])
            fix = (lambda x: np.stack(x)) if stacked else (lambda x: x[0])
            out.append(("normal", fix(nus).astype(np.float32)))
            for spd, skh in ((spd_l, skh_l), (spd_r, skh_r)):
                out.append(("normal", fix(spd).astype(np.float32)))
                if style == "PRO":
                    out.append(("normal", fix(skh).astype(np.float32)))
        offset += B * nr * nc
    return out


def lengths_of(merged, bs):
    """Block lengths per axis of a merged 2-D shape (distributed-kron's rows and columns)."""
    out = []
    for d in merged:
        nb = -(-d // bs)
        out.append([bs] * (nb - 1) + [d - bs * (nb - 1)])
    return out


def record_dk_case(case, dk):
    """Runs distributed-kron's `pro` on the problem; the draws are recomputed from its key
    schedule (dk_draws). Leaves must be dense (every merged side at most max_size_dense)
    or 1-D."""
    unknown = set(case.get("options", {})) - DK_PRO_OPTIONS
    if unknown:
        raise ValueError(f"{case['name']}: not pro options: {sorted(unknown)}")
    if case["variant"] != "kron" or case.get("hessian"):
        raise ValueError(f"{case['name']}: distributed-kron cases are kron whitening cases")
    problem = Problem(case["params"], case["seed"])
    o = dict(case["options"])
    for p in problem.paths:
        scanned = (o.get("scanned_layers") or {}).get(p, False)
        merged = dk_merge_dims(problem.shapes[p][1:] if scanned else problem.shapes[p])
        if any(d > o.get("max_size_dense", 16384) for d in merged) and len(merged) == 2:
            raise ValueError(f"{case['name']}: leaf {p} takes pro's LARGE path")
    if "scanned_layers" in o:
        o["scanned_layers"] = {p: bool(o["scanned_layers"].get(p, False)) for p in problem.paths}
    opt = dk.pro(**o)
    params = to_jax(problem.p0)
    grads, updates, draws = [], [], {"init": []}
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(case["steps"]):
        g = problem.grad(params)
        u, state = update(to_jax(g), state, params)
        grads.append(g)
        updates.append(to_np(u))
        draws[t] = dk_draws(case, problem, t + 1)
        params = optax.apply_updates(params, u)
        params = {k: v.astype(jnp.float32) for k, v in params.items()}
    return dict(problem=problem, grads=grads, updates=updates, extras=[], draws=draws)


# ----------------------------------------------------------------------------------
# heavyball 3.2.1 (`PSGDPRO`), for "reference": "heavyball" cases

HB_VERSION = "3.2.1"
# PSGDPRO's keyword arguments a case may set (the checker maps or refuses each by name)
HB_PRO_OPTIONS = {
    "lr", "beta", "betas", "weight_decay", "preconditioner_update_probability",
    "max_size_triangular", "min_ndim_triangular", "memory_save_mode",
    "momentum_into_precond_update", "lower_bound_beta", "dampening",
    "precond_update_power_iterations", "precond_init_scale", "precond_init_scale_scale",
    "precond_init_scale_power", "precond_lr",
}


def import_heavyball():
    """Imports heavyball (checking its version) set up as the heavyball cases run it:
    eagerly (`compile_mode = None`; the compiled helpers draw from another generator than
    the eager ones), with `stochastic_round_` called with one argument (the bfloat16
    rounding of its Procrustes normaliser, one `randint_like` draw) the identity, so that
    normaliser is a deterministic float32 power iteration, as Kron's `normEstimator:
    'power'`. Its two-argument form (a copy into a bfloat16 tensor) is left alone; the
    cases keep everything in float32, where it is a plain copy."""
    import torch
    import heavyball
    import heavyball.utils as hu

    installed = importlib.metadata.version("heavyball")
    if installed != HB_VERSION:
        sys.exit(f"heavyball {installed} installed, need {HB_VERSION}")
    hu.compile_mode = None
    orig_round = hu.stochastic_round_

    def round_(ref, source=None):
        return ref if source is None else orig_round(ref, source)

    hu.stochastic_round_ = round_
    torch.set_default_dtype(torch.float32)
    return heavyball


def hb_leaf_of_draw(problem, shape):
    """The leaf whose bucket a `randn_like` draw of `shape` belongs to: heavyball stacks
    same-shape parameters in a leading bucket axis, so each case has leaves of distinct
    shapes (a bucket of one, shape `(1, *leaf)`), and none with a size-1 axis (heavyball
    squeezes those away, which Kron does not)."""
    if shape[0] != 1:
        raise RuntimeError(f"a bucket of {shape[0]} parameters (shape {shape})")
    for p in problem.paths:
        if tuple(shape[1:]) == problem.shapes[p]:
            return p
    raise RuntimeError(f"no leaf of shape {shape[1:]}")


def run_hb_case(case, heavyball, tape, grads=None, replay=None):
    """Runs PSGDPRO over the case's steps (each step: `p.grad = g_t`, `opt.step()`). With
    `grads` (a list per step) those are fed, else the problem's gradients at the current
    params. Returns (problem, grads, updates, draws): a step's update is recorded where
    heavyball applies it (`utils._compilable_update_`: `p ← p·(1 − wd·lr) − lr·u`) as
    `−lr·u − lr·wd·p` (in float64 from its float32 operands, then float32); its draws (one
    damping noise per bucket and fit) are put in this package's order (sorted paths)."""
    import torch
    import heavyball.utils as hu

    problem = Problem(case["params"], case["seed"])
    for p in problem.paths:
        if 1 in problem.shapes[p]:
            raise ValueError(f"{case['name']}: leaf {p} has a size-1 axis, which heavyball "
                             "squeezes away")
    if len(set(problem.shapes.values())) != len(problem.paths):
        raise ValueError(f"{case['name']}: leaves of one shape share a heavyball bucket")
    options = dict(case.get("options", {}))
    unknown = set(options) - HB_PRO_OPTIONS
    if unknown:
        raise ValueError(f"{case['name']}: not PSGDPRO options: {sorted(unknown)}")
    if isinstance(options.get("preconditioner_update_probability"), (int, float)):
        options["preconditioner_update_probability"] = float(
            options["preconditioner_update_probability"])
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    params = [torch.nn.Parameter(torch.from_numpy(np.array(problem.p0[p], dtype=np.float32)))
              for p in problem.paths]
    seen = {}
    orig_update = hu._compilable_update_

    def update_recorder(ps, us, decay, lr, *rest):
        for p_, u_ in zip(ps, us):
            i = next(i for i, x in enumerate(params) if x.data_ptr() == p_.data_ptr())
            shape = problem.shapes[problem.paths[i]]
            lr64 = float(lr)
            p64 = p_.detach().double().reshape(shape)
            u64 = u_.detach().double().reshape(shape)
            upd = -lr64 * u64 - lr64 * float(decay) * p64
            seen[problem.paths[i]] = upd.float().numpy().copy()
        return orig_update(ps, us, decay, lr, *rest)

    orig_randint = torch.randint_like
    orig_clamp = torch.Tensor.clamp

    def clamp_recorder(self, *args, **kwargs):
        # the Procrustes step a = clamp(−c1/c2, 0, 0.5): whether the cap acted
        if kwargs.get("max") == 0.5 and sys._getframe(1).f_code.co_name == "psgd_pro_update_precond":
            clamped[-1] = clamped[-1] or bool(((self > 0.5) | (self < 0)).any())
        return orig_clamp(self, *args, **kwargs)

    def no_randint(*args, **kwargs):
        raise RuntimeError("randint_like: stochastic rounding was not patched out")

    out_grads, updates, clamped = [], [], []
    hu._compilable_update_ = update_recorder
    torch.randint_like = no_randint
    torch.Tensor.clamp = clamp_recorder
    try:
        torch.manual_seed(case["seed"] + (1 if replay is not None else 0))
        with tape.patched(replay), warnings_off():
            tape.set_phase("init")
            opt = heavyball.PSGDPRO(params, **options)
            for t in range(case["steps"]):
                tape.set_phase(t)
                g = step_grad(problem, params, grads, t)
                for p, x in zip(problem.paths, params):
                    x.grad = torch.from_numpy(np.array(g[p], dtype=np.float32))
                seen.clear()
                clamped.append(False)
                opt.step()
                if sorted(seen) != problem.paths:
                    raise RuntimeError(f"step {t}: updates of {sorted(seen)}")
                out_grads.append(g)
                updates.append(dict(seen))
            tape.check_used()
    finally:
        hu._compilable_update_ = orig_update
        torch.randint_like = orig_randint
        torch.Tensor.clamp = orig_clamp
    draws = {}
    for phase, lst in tape.draws.items():
        by_leaf = {}
        for kind, arr, caller in lst:
            if kind != "normal" or caller != "psgd_pro_update_precond":
                raise RuntimeError(f"phase {phase}: unexpected draw {kind} in {caller}")
            p = hb_leaf_of_draw(problem, arr.shape)
            if p in by_leaf:
                raise RuntimeError(f"phase {phase}: two noises for leaf {p}")
            by_leaf[p] = arr.reshape(problem.shapes[p])
        if by_leaf and sorted(by_leaf) != problem.paths:
            raise RuntimeError(f"phase {phase}: noise for {sorted(by_leaf)} only")
        draws[phase] = [("normal", by_leaf[p]) for p in problem.paths if p in by_leaf]
    return problem, out_grads, updates, draws, params, clamped


@contextlib.contextmanager
def warnings_off():
    """heavyball warns once about a fixed precond_init_scale; the cases set it on purpose."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def record_hb_case(case, heavyball):
    """Runs heavyball's PSGDPRO on the problem (see run_hb_case), then replays it under
    another torch seed with the tape handing back the recorded draws: the updates must
    agree bitwise (the tape holds every random number the run used). Also checks that
    heavyball's parameters moved by the recorded updates (to float32 round-off)."""
    import torch

    if case["variant"] != "kron" or case.get("hessian"):
        raise ValueError(f"{case['name']}: heavyball cases are kron whitening cases")
    tape = TorchTape(torch)
    problem, grads, updates, draws, params, clamped = run_hb_case(case, heavyball, tape)
    recorded = tape.draws
    again_tape = TorchTape(torch)
    _, _, again, _, _, _ = run_hb_case(case, heavyball, again_tape, grads=grads,
                                       replay=recorded)
    bitwise = all(np.array_equal(a[p], b[p]) for a, b in zip(updates, again) for p in a)
    # the final params: p0 plus every update, within float32 round-off of the params
    drift = 0.0
    for p, x in zip(problem.paths, params):
        ours = problem.p0[p].astype(np.float64) + sum(u[p].astype(np.float64) for u in updates)
        scale = max(1.0, float(np.max(np.abs(ours))))
        drift = max(drift, float(np.max(np.abs(ours - x.detach().double().numpy()))) / scale)
    return dict(problem=problem, grads=grads, updates=updates, extras=[], draws=draws,
                replay_bitwise=bitwise, param_drift=drift, clamped=clamped,
                torch_version=torch.__version__)


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
    }
    if case.get("reference") == "psgd-torch":
        meta["reference"] = "psgd-torch"
        meta["reference_version"] = {
            "package": "psgd_torch psgd.py",
            "commit": PSGD_TORCH_COMMIT,
            "sha256": PSGD_TORCH_SHA256,
            "torch": rec["torch_version"],
        }
        clip = rec["clip"]
        meta["update_clip"] = {
            "acted": any(c["acted"] for c in clip),
            "max_rms": max(c["max_rms"] for c in clip),
            "max_abs": max(c["max_abs"] for c in clip),
            "note": "the largest RMS and element of psgd_torch's preconditioned gradients "
                    "before its clip (grad_clip_max_amps), over steps and leaves; "
                    "acted: whether that clip changed any of them",
        }
    elif case.get("reference") == "heavyball":
        meta["reference"] = "heavyball"
        meta["reference_version"] = {
            "package": "heavyball",
            "version": HB_VERSION,
            "torch": rec["torch_version"],
            "compile_mode": None,
            "stochastic_round_": "the identity when called with one argument",
        }
        # the steps where clamp(-c1/c2, 0, 0.5) of the Procrustes step acted
        meta["procrustes_clamped_steps"] = [t for t, c in enumerate(rec["clamped"]) if c]
    elif case.get("reference") == "distributed-kron":
        meta["reference"] = "distributed-kron"
        meta["reference_version"] = {
            "package": "distributed-kron",
            "version": DK_VERSION,
            "jax": jax.__version__,
            "optax": optax.__version__,
        }
    else:
        meta["reference"] = {
            "package": "psgd-jax",
            "version": REFERENCE_VERSION,
            "jax": jax.__version__,
            "optax": optax.__version__,
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


def report_taped(case, rec, out_dir, fields):
    """Prints one line for a case recorded on a torch tape (whether its replay under
    another seed matched bitwise, then `fields`, (name, text) pairs) and writes it."""
    n_draws = sum(len(rec["draws"][t]) for t in range(case["steps"]))
    print(f"{case['name']}: steps={case['steps']} draws={n_draws}"
          f" replay {'bitwise' if rec['replay_bitwise'] else 'MISMATCH'}"
          + "".join(f" {k}={v}" for k, v in fields), flush=True)
    write_case(case, rec, out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="generate only these case names")
    ap.add_argument("--psgd-torch", help="path of psgd_torch's psgd.py (psgd-torch cases)")
    args = ap.parse_args()

    with open(args.cases) as f:
        cases = json.load(f)
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        sys.exit("duplicate case names")
    cases = [c for c in cases if not args.only or c["name"] in args.only]
    torch_ref = None
    if any(c.get("reference") == "psgd-torch" for c in cases):
        torch_ref = load_psgd_torch(args.psgd_torch)
    hb = None
    if any(c.get("reference") == "heavyball" for c in cases):
        hb = import_heavyball()
    dk = None
    if any(c.get("reference") == "distributed-kron" for c in cases):
        dk = import_dk()
    if any(c.get("reference", "psgd-jax") == "psgd-jax" for c in cases):
        import_jax()
    os.makedirs(args.out, exist_ok=True)

    failed = 0
    for case in cases:
        if case.get("reference") == "distributed-kron":
            rec = record_dk_case(case, dk)
            n_draws = sum(len(rec["draws"][t]) for t in range(case["steps"]))
            print(f"{case['name']}: steps={case['steps']} draws={n_draws}", flush=True)
            write_case(case, rec, args.out)
            continue
        if case.get("reference") == "heavyball":
            rec = record_hb_case(case, hb)
            failed += not (rec["replay_bitwise"] and rec["param_drift"] < 1e-6)
            fitted = [str(t) for t in range(case["steps"]) if rec["draws"][t]]
            clamped = [str(t) for t, c in enumerate(rec["clamped"]) if c]
            report_taped(case, rec, args.out, [
                ("param-drift", f"{rec['param_drift']:.1e}"),
                ("fitted-steps", ",".join(fitted) or "none"),
                ("procrustes-clamped-steps", ",".join(clamped) or "none"),
            ])
            continue
        if case.get("reference") == "psgd-torch":
            rec = record_torch_case(case, torch_ref)
            clip = rec["clip"]
            failed += not rec["replay_bitwise"]
            acted = [str(t) for t, c in enumerate(clip) if c["acted"]]
            balanced = [str(t) for t in range(case["steps"])
                        if any(k == "uniform" and arr < 0.01
                               for k, arr in rec["draws"][t][0 if case.get("hessian") else 1:])]
            report_taped(case, rec, args.out, [
                ("max-rms", f"{max(c['max_rms'] for c in clip):.3f}"),
                ("clip-acted", ",".join(acted) or "never"),
                ("balanced-steps", ",".join(balanced) or "none"),
            ])
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
