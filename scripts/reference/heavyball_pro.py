"""Records heavyball 3.2.1's PSGDPRO preconditioner fit (`utils.psgd_pro_update_precond`)
on fixed gradients, for comparing Kron's `'Q0.5EQ1.5'` with heavyball's numerics
(`normEstimator: 'power'`, `procrustesMaxStep: 0.5`, `balanceEvery: 1`,
`balanceWhen: 'beforeFit'`) by hand; not a test (the package's tests need no Python).

    /tmp/venv-torch/bin/pip install heavyball==3.2.1
    /tmp/venv-torch/bin/python scripts/reference/heavyball_pro.py /tmp/heavyball_pro.json
    cargo run --release -p psgd-conformance --example heavyball_pro -- /tmp/heavyball_pro.json

heavyball runs eagerly (`compile_mode = None`) and `stochastic_round_` called with one
argument (the bfloat16 rounding inside its Procrustes normaliser, one `randint_like` draw)
is the identity, so the normaliser is a deterministic float32 power iteration, as Kron's.
The damping noise `randn_like(G)` of each fit is recorded. Factors start at the identity
(init scale 1), the Lipschitz bounds at 0. Writes per case the shape, the fit's step
size, `lower_bound_beta`, and per fit the gradient, the noise and the factors after it.
"""

import json
import sys
from importlib.metadata import version

import heavyball.utils as hu
import torch

CASES = [
    {"shape": [4, 3], "steps": 6, "lr": 0.3, "beta": 0.9, "seed": 1},
    {"shape": [2, 3, 4], "steps": 6, "lr": 0.3, "beta": 0.9, "seed": 2},
    {"shape": [5], "steps": 6, "lr": 0.3, "beta": 0.9, "seed": 3},
    # a large fit step: the Procrustes rotation is clamped at heavyball's 0.5
    {"shape": [6, 5], "steps": 8, "lr": 0.9, "beta": 0.9, "seed": 4},
]


def run(case):
    torch.manual_seed(case["seed"])
    shape = case["shape"]
    # heavyball stacks same-shape params in a leading bucket axis: one param here
    gs = [torch.randn(1, *shape) * (1.0 + 0.5 * torch.arange(shape[-1])) for _ in range(case["steps"])]
    Q = [torch.eye(d).unsqueeze(0) if len(shape) >= 2 and d > 1 else torch.ones(1, d) for d in shape]
    L = [torch.zeros(1, dtype=torch.float64) for _ in shape]
    noise = []
    orig = torch.randn_like

    def recorded(x, *a, **k):
        out = orig(x, *a, **k)
        noise.append(out.clone())
        return out

    out = {"shape": shape, "lr": case["lr"], "beta": case["beta"], "fits": []}
    torch.randn_like = recorded
    try:
        for g in gs:
            hu.psgd_pro_update_precond(g, case["lr"], Q, L, case["beta"], 2, 1e-9, 0.5)
            out["fits"].append({
                "g": g.flatten().tolist(),
                "nu": noise[-1].flatten().tolist(),
                "q": [q.flatten().tolist() for q in Q],
                "l": [float(x) for x in L],
            })
    finally:
        torch.randn_like = orig
    return out


def main():
    assert version("heavyball") == "3.2.1", version("heavyball")
    hu.compile_mode = None
    orig_round = hu.stochastic_round_
    hu.stochastic_round_ = lambda ref, source=None: ref if source is None else orig_round(ref, source)
    torch.set_default_dtype(torch.float32)
    with open(sys.argv[1], "w") as f:
        json.dump([run(c) for c in CASES], f)


if __name__ == "__main__":
    main()
