"""`skip_nonfinite` on torch: a run with a NaN step equals, bit for bit, the run
without that step (the kernels' path included); the all-finite check."""

import numpy as np
import pytest
import torch

import keras_adam
from keras_adam.backends import torch as torch_backend
from tests.helpers.torch_engine import (
    BINARY,
    TORCH_DTYPES,
    WD,
    keras_run,
)

# -- skip_nonfinite -----------------------------------------------------------------

SKIP_CONFIGS = {
    "fused": {},
    "fused=False": dict(fused=False),
    "rectify": dict(rectify=True),
    "fused, accumulation, EMA": dict(gradient_accumulation_steps=2, use_ema=True),
    "fused=False, accumulation, EMA": dict(
        fused=False, gradient_accumulation_steps=2, use_ema=True
    ),
    "fused, AMSGrad, decay, clipnorm": dict(amsgrad=True, weight_decay=WD, clipnorm=1.0),
}


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("config", sorted(SKIP_CONFIGS))
def test_skipped_step_is_a_step_never_taken(config, bad_value, kernel_calls):
    options = dict(**BINARY, skip_nonfinite=True, **SKIP_CONFIGS[config])
    bad = {7: bad_value, 10: bad_value}  # an accumulation call and an update call
    history, state, _ = keras_run(keras_adam.Adam(**options), steps=20, bad=bad)
    fused_calls = len(kernel_calls)
    without, without_state, _ = keras_run(keras_adam.Adam(**options), steps=20, skip=set(bad))
    kept = [i for i in range(20) if i + 1 not in bad]
    np.testing.assert_array_equal(history[kept], without)
    assert int(state[-1]) == 2 and int(without_state[-1]) == 0  # skipped_steps
    for mine, theirs in zip(state[:-1], without_state[:-1], strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert np.all(np.isfinite(history))
    if "fused=False" not in config and "rectify" not in config:
        assert fused_calls == len(kernel_calls) - fused_calls > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_all_finite(dtype):
    big = torch.zeros(4099, dtype=TORCH_DTYPES[dtype])
    assert torch_backend.all_finite([big, None, torch.zeros(0)])
    for position in (0, 1, 7, 8, 15, 500, 4095, 4096, 4098):
        for value in (float("nan"), float("inf"), -float("inf")):
            bad = big.clone()
            bad[position] = value
            assert not torch_backend.all_finite([torch.ones(3), bad])
    # Finite values whose sum of squares overflows are finite.
    largest = torch.finfo(TORCH_DTYPES[dtype]).max
    huge = torch.full((4,), largest, dtype=TORCH_DTYPES[dtype])
    assert torch_backend.all_finite([huge, torch.ones(5)])
    huge[2] = float("nan")
    assert not torch_backend.all_finite([huge, torch.ones(5)])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_all_finite_mixed_dtypes_and_sparse():
    huge = torch.full((3,), 1e300, dtype=torch.float64)
    assert torch_backend.all_finite([huge, torch.ones(2, dtype=torch.bfloat16)])
    nan16 = torch.tensor([float("nan")], dtype=torch.float16)
    assert not torch_backend.all_finite([huge, nan16])
    rows = torch.tensor([[0, 0]])
    repeated = torch.sparse_coo_tensor(rows, torch.tensor([3e38, 3e38]), (3,))
    assert torch_backend.all_finite([repeated])  # a sum of the rows would overflow
    with_nan = torch.sparse_coo_tensor(rows, torch.tensor([1.0, float("nan")]), (3,))
    assert not torch_backend.all_finite([with_nan])
