"""Every path against `torch.optim`: float64 to 1e-9, the fused path bit for
bit against `torch.optim.Adam(fused=True)`; RAdam's two branches."""

import numpy as np
import pytest
import torch

import keras_adam
from tests.helpers.torch_engine import (
    BETAS,
    BINARY,
    DEFAULTS,
    STEPS,
    TORCH_BINARY,
    TORCH_DEFAULTS,
    WD,
    keras_run,
    relative_deviation,
    torch_run,
)

# -- parity with torch.optim ----------------------------------------------------

PEERS = {
    "Adam": (dict(epsilon_mode="paper"), lambda p, **kw: torch.optim.Adam(p, **kw)),
    "AdamW": (
        dict(epsilon_mode="paper", weight_decay=WD),
        lambda p, **kw: torch.optim.AdamW(p, weight_decay=WD, **kw),
    ),
    "Adam+L2": (
        dict(epsilon_mode="paper", weight_decay=WD, decoupled_weight_decay=False),
        lambda p, **kw: torch.optim.Adam(p, weight_decay=WD, **kw),
    ),
    "AMSGrad": (
        dict(epsilon_mode="paper", amsgrad=True),
        lambda p, **kw: torch.optim.Adam(p, amsgrad=True, **kw),
    ),
    "maximize": (
        dict(epsilon_mode="paper", maximize=True),
        lambda p, **kw: torch.optim.Adam(p, maximize=True, **kw),
    ),
    "AdamW+AMSGrad+maximize": (
        dict(epsilon_mode="paper", weight_decay=WD, amsgrad=True, maximize=True),
        lambda p, **kw: torch.optim.AdamW(p, weight_decay=WD, amsgrad=True, maximize=True, **kw),
    ),
}
RADAM_PEERS = {
    "RAdam": (dict(rectify=True), lambda p, **kw: torch.optim.RAdam(p, **kw)),
    "RAdam+L2": (
        dict(rectify=True, weight_decay=WD, decoupled_weight_decay=False),
        lambda p, **kw: torch.optim.RAdam(p, weight_decay=WD, **kw),
    ),
    "RAdam+decoupled": (
        dict(rectify=True, weight_decay=WD),
        lambda p, **kw: torch.optim.RAdam(p, weight_decay=WD, decoupled_weight_decay=True, **kw),
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("variant", sorted({**PEERS, **RADAM_PEERS}))
def test_matches_torch_optim(variant, fused, dtype):
    ours, make = {**PEERS, **RADAM_PEERS}[variant]
    history, _, _ = keras_run(keras_adam.Adam(**BINARY, **ours, fused=fused), dtype)
    theirs = torch_run(lambda p: make(p, **TORCH_BINARY), dtype)
    assert relative_deviation(theirs[-1], theirs[0]) > 0.05  # it moved
    bound = 1e-9 if dtype == "float64" else 1e-6
    assert relative_deviation(history, theirs) <= bound


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", ["binary", "defaults"])
@pytest.mark.parametrize("variant", sorted(PEERS))
def test_fused_path_is_torch_fused_adam_bit_for_bit(variant, hyper, dtype):
    """With torch's ε, the default path is `torch.optim`'s fused step: same kernel, same scalars."""
    ours, make = PEERS[variant]
    ours_hyper, torch_hyper = (
        (BINARY, TORCH_BINARY) if hyper == "binary" else (DEFAULTS, TORCH_DEFAULTS)
    )
    history, _, _ = keras_run(keras_adam.Adam(**ours_hyper, **ours), dtype)
    theirs = torch_run(lambda p: make(p, fused=True, **torch_hyper), dtype)
    np.testing.assert_array_equal(history, theirs)


def test_radam_runs_both_branches():
    """With β2 = 1 - 2**-7, ρ_t passes 5 within the 50 steps."""
    rho_inf = 2 / (1 - BETAS[1]) - 1
    rho = [rho_inf - 2 * t * BETAS[1] ** t / (1 - BETAS[1] ** t) for t in range(1, STEPS + 1)]
    assert rho[0] <= 5 < rho[-1]
