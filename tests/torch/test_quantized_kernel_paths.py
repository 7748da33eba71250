"""The quantized C++ kernel's two paths: AVX-512 by hand and portable C++, bit for bit.

`kernels/quantized_adam_avx512.h` redoes `quantized_adam.h`'s loops with
intrinsics (table lookups by register permutes, a binary search of the
midpoints for int4); it must give the portable loops' numbers exactly,
for every option, short blocks, odd int4 sizes, and values exactly on a
midpoint. The kernel is called directly (ctypes, NumPy buffers); the
Keras-level tests (`tests/any/test_quantized_moments.py`) check the
default path against the NumPy transcription.
"""

import numpy as np
import pytest

from keras_adam.kernels import quantized
from keras_adam.quantization import formats
from tests.helpers.numpy_quantization import split_storage, unpack

OPTIONS = {
    "plain": {},
    "amsgrad_adamw": {"amsgrad": 1, "decoupled": 1, "weight_decay": 0.1},
    "l2_maximize": {"l2": 1, "maximize": 1, "weight_decay": 0.01},
    "paper": {"paper": 1, "bias_correction_2_sqrt": 0.3},
}


@pytest.fixture(scope="module")
def kernel():
    loaded = quantized.load()
    assert loaded is not None, quantized._state.get("error")
    if not loaded.portable_only(False):
        pytest.skip("this machine has no AVX-512 path to compare")
    yield loaded
    loaded.portable_only(False)


def scalars(**options):
    base = dict(alpha=0.01, one_minus_beta1=0.1, one_minus_beta2=0.001, epsilon=1e-7,
                weight_decay=0.0, learning_rate=0.01, bias_correction_2_sqrt=1.0,
                maximize=0, l2=0, decoupled=0, amsgrad=0, paper=0)  # fmt: skip
    return {**base, **options}


def state(sizes, moment_dtype, rng):
    """Each variable's buffers after a first step from zeros (so the codes are varied)."""
    fm, _ = formats(moment_dtype)
    buffers = []
    for size in sizes:
        stored = fm.storage_bytes(size)
        buffers.append({
            "var": rng.normal(size=size).astype(np.float32),
            **{name: np.zeros(stored, np.uint8) for name in ("m", "v", "vh")},
        })  # fmt: skip
    return buffers


def run(kernel, buffers, grads, moment_dtype, portable, **options):
    """`buffers` (copied) after one step per gradient list, on one path."""
    kernel.portable_only(portable)
    buffers = [{name: array.copy() for name, array in b.items()} for b in buffers]
    amsgrad = options.get("amsgrad", 0)
    for grad in grads:
        tensors = {name: [b[name].ctypes.data for b in buffers] for name in buffers[0]
                   if amsgrad or not name.startswith("vh")}  # fmt: skip
        tensors["grad"] = [g.ctypes.data for g in grad]
        kernel.step(tensors, [b["var"].size for b in buffers], formats(moment_dtype),
                    scalars(**options), threads=2)  # fmt: skip
    return buffers


def assert_identical(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        for name in e:
            np.testing.assert_array_equal(a[name].view(np.uint8), e[name].view(np.uint8), name)


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_both_paths_give_the_same_bits(kernel, moment_dtype, options):
    rng = np.random.default_rng(3)
    sizes = [4097, 256 * 7 + 5, 6000]  # short last blocks; odd sizes (int4's padding nibble)
    buffers = state(sizes, moment_dtype, rng)

    def gradient(size):  # magnitudes over nine decades
        return (rng.normal(size=size) * 10.0 ** rng.uniform(-8, 1, size=size)).astype(np.float32)

    grads = [[gradient(size) for size in sizes] for _ in range(4)]
    grads[2][1][:300] = 0.0  # an all-zero block (scale 0) in a step
    fast = run(kernel, buffers, grads, moment_dtype, portable=False, **options)
    portable = run(kernel, buffers, grads, moment_dtype, portable=True, **options)
    assert_identical(fast, portable)
    moved = np.abs(fast[0]["var"] - buffers[0]["var"])
    assert moved.max() > 1e-3  # the step did something to compare


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
def test_midpoints_and_nonfinite_values_encode_alike(kernel, moment_dtype):
    """With beta1 = beta2 = 0 from zeros, m = g and v = g*g: the encoder sees chosen values."""
    fm, fv = formats(moment_dtype)
    m_mid = fm.lookup["magnitude_mid"][:-1]
    v_mid = fv.lookup["magnitude_mid"][:-1]
    # Every midpoint of m, both signs, and the floats just above them, and
    # near v's midpoints; each block led by 1 (its scale); then a block
    # with NaN and infinities.
    values = np.concatenate([m_mid, -m_mid, np.nextafter(m_mid, 2), -np.nextafter(m_mid, 2),
                             np.sqrt(v_mid)]).astype(np.float32)  # fmt: skip
    chunks = np.array_split(values, -(-len(values) // (fm.block_size - 1)))
    finite = np.concatenate([np.concatenate([[1.0], c, np.zeros(fm.block_size - 1 - len(c))])
                             for c in chunks]).astype(np.float32)  # fmt: skip
    size = max(4096, len(finite) + fm.block_size)
    grad = np.zeros(size, np.float32)
    grad[: len(finite)] = finite
    grad[len(finite) : len(finite) + 4] = [1.0, np.nan, np.inf, -np.inf]
    buffers = state([size], moment_dtype, np.random.default_rng(0))
    options = {"one_minus_beta1": 1.0, "one_minus_beta2": 1.0}
    fast = run(kernel, buffers, [[grad]], moment_dtype, portable=False, **options)
    portable = run(kernel, buffers, [[grad]], moment_dtype, portable=True, **options)
    assert_identical(fast, portable)
    # Every value of the finite blocks took a nearest code (scales are 1),
    # ties on a midpoint (rounded to float32) either way.
    code_bytes, scales = split_storage(fast[0]["m"], size, fm.bits)
    codes = unpack(code_bytes, size, moment_dtype)[: len(finite)]
    np.testing.assert_array_equal(scales[: len(chunks)], 1.0)
    table = fm.table.astype(np.float64)
    distance = np.abs(table[codes] - finite)
    best = np.abs(table[None, :] - finite[:, None].astype(np.float64)).min(axis=1)
    assert np.all(distance - best <= 2 * np.spacing(np.abs(finite))), np.max(distance - best)
    assert np.mean(distance > best) < 0.3  # only ties and their neighbours differ
