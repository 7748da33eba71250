"""A NumPy transcription of block-wise quantized moments, for tests.

Written from the description in `keras_adam.quantization`'s docstring,
independently of its code: the code tables are built from their
definitions as sets (int8: numbers with 3 or 4 mantissa bits below 1; int4:
decades), and each value takes the nearest code by brute force (an argmin
over the whole table), where the library computes it from the value's bits.
"""

import math

import numpy as np

from tests.helpers import numpy_adam

#: (bits, block size) of each quantized moment dtype.
SIZES = {"int8": (8, 256), "int4": (4, 128)}


def table(bits, signed):
    """The code values, ascending.

    int8: signed, the largest 127 numbers 2**e * (1 + j/8) (e < 0, j =
    0..7) up to 1, 0 and their negatives; unsigned, the largest 256 of 1,
    2**e * (1 + j/16) for -8 <= e < 0 (j = 0..15) and 2**e * (1 + j/8)
    below. int4: decades
    (0.1, 1], (0.01, 0.1], ... halving their count; signed: 3 magnitude
    bits, 0 and ± each magnitude; unsigned (no zero): 4 magnitude bits, and
    one more decade of one code.
    """
    if bits == 8:
        fine = range(-8 if not signed else 0, 0)  # v: 4 mantissa bits in the top 8 binades
        grid = {2.0**e * (1 + j / 16) for e in fine for j in range(16)} | {1.0}
        grid |= {2.0**e * (1 + j / 8) for e in range(-40, fine.start) for j in range(8)}
        magnitudes = set(sorted(grid)[-(127 if signed else 256) :])
        values = sorted(magnitudes | ({0.0} | {-x for x in magnitudes} if signed else set()))
        return np.array(values, dtype=np.float32)
    magnitude_bits = bits - 1 if signed else bits
    counts = [2 ** (magnitude_bits - 1 - k) for k in range(magnitude_bits)]
    if not signed:
        counts.append(1)
    magnitudes = set()
    for decade, count in enumerate(counts):
        bottom, top = 10.0 ** -(decade + 1), 10.0**-decade
        magnitudes |= {bottom + (top - bottom) * j / count for j in range(1, count + 1)}
    values = sorted(magnitudes | ({0.0} | {-x for x in magnitudes} if signed else set()))
    return np.array(values, dtype=np.float32)


def quantize(x, moment_dtype, signed):
    """`(codes, scales)` of `x`: one code per value (unpacked), one absmax per block."""
    bits, block = SIZES[moment_dtype]
    codes_table = table(bits, signed)
    flat = np.asarray(x, np.float32).reshape(-1)
    blocks = math.ceil(flat.size / block)
    padded = np.zeros(blocks * block, np.float32)
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, block)
    scales = np.abs(padded).max(axis=1)
    inverse = np.float32(1) / np.where(scales > 0, scales, np.float32(1))
    normalized = (padded * inverse[:, None]).reshape(-1)[: flat.size]
    codes = np.abs(normalized[:, None] - codes_table[None, :]).argmin(axis=1)
    return codes, scales


def dequantize(codes, scales, shape, moment_dtype, signed):
    """The float32 values of unpacked `codes` with block `scales`."""
    bits, block = SIZES[moment_dtype]
    values = table(bits, signed)[codes]
    per_value = np.repeat(scales, block)[: values.size]
    return (values * per_value).reshape(shape).astype(np.float32)


def unpack(stored, size, moment_dtype):
    """The stored bytes as one code per value (two per byte for int4, low nibble first)."""
    stored = np.asarray(stored, np.uint8)
    if moment_dtype == "int8":
        return stored.astype(np.int64)
    pairs = np.stack([stored & 15, stored >> 4], axis=1).reshape(-1)
    return pairs[:size].astype(np.int64)


def split_storage(stored, size, bits):
    """A stored moment's `(code bytes, scales)`: the buffer holds one
    little-endian float32 scale per block first, then the code bytes."""
    block = {8: 256, 4: 128}[bits]
    stored = np.asarray(stored, np.uint8)
    blocks = math.ceil(size / block)
    scales = np.frombuffer(stored[: 4 * blocks].tobytes(), "<f4")
    codes = stored[4 * blocks :]
    assert codes.size == math.ceil(size * bits / 8), (codes.size, size, bits)
    return codes, scales


def join_storage(code_bytes, scales):
    """`split_storage`'s inverse: one buffer of the scales' bytes, then the codes."""
    scale_bytes = np.frombuffer(np.asarray(scales, "<f4").tobytes(), np.uint8)
    return np.concatenate([scale_bytes, np.asarray(code_bytes, np.uint8)])


def step(theta, g, m, v, v_hat, t, moment_dtype, **hyper):
    """One step on decoded state: "dequantize, Adam, quantize".

    Args:
        theta, g: The variable and its gradient.
        m, v, v_hat: The decoded float32 moments before the step (v_hat
            None without AMSGrad).
        t: The step number.
        moment_dtype: "int8" or "int4".
        **hyper: `numpy_adam.step`'s hyperparameters.

    Returns:
        `(theta, {"m": (m_t, codes, scales), "v": ..., "v_hat": ...})`:
        the new variable, and each new moment before quantization with its
        codes and scales.
    """
    v_max = v if v_hat is None else v_hat
    theta, m, v, v_max = numpy_adam.step(theta, g, m, v, v_max, t, **hyper)
    moments = {"m": (m, True), "v": (v, False)}
    if v_hat is not None:
        moments["v_hat"] = (v_max, False)
    return theta, {
        name: (value, *quantize(value, moment_dtype, signed))
        for name, (value, signed) in moments.items()
    }


def assert_same_but_for_flipped_codes(weights, expected, learning_rate):
    """Two trainings whose sums rounded differently: a value at a midpoint
    between two codes may take the other, and a few weights then move by a
    fraction of η more or less. Fewer than 1% differ by more than 1e-5."""
    differences = np.concatenate(
        [np.abs(a - b).ravel() for a, b in zip(weights, expected, strict=True)]
    )
    assert np.mean(differences > 1e-5) < 0.01, np.mean(differences > 1e-5)
    assert differences.max() < learning_rate, differences.max()


def stored_state(optimizer):
    """The optimizer's variables as NumPy arrays, each quantized moment's
    stored buffer as two: its code bytes and its scales (`split_storage`)."""
    from keras_adam.quantization import QuantizedMoment

    slots = [
        *optimizer._momentums,
        *optimizer._velocities,
        *(getattr(optimizer, "_velocity_hats", None) or []),
    ]
    moments = {id(s.variable): s for s in slots if isinstance(s, QuantizedMoment)}
    arrays = []
    for variable in optimizer.variables:
        array = np.array(variable.numpy())
        moment = moments.get(id(variable))
        if moment is None:
            arrays.append(array)
        else:
            arrays += split_storage(array, moment.size, moment.fmt.bits)
    return arrays


def assert_same_state_but_for_flipped_codes(state, expected):
    """Two optimizers' variables (`stored_state`), as
    `assert_same_but_for_flipped_codes`: under 1e-3 of the codes differ;
    scales and float moments agree to 1e-5."""
    for a, b in zip(state, expected, strict=True):
        if a.dtype == np.uint8:
            assert np.mean(a != b) < 1e-3
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)


def fit_classifier(jit_compile, epochs=3, samples=128, **options):
    """A 64-96-10 classifier (its hidden kernel quantized) fit on random data.

    Returns:
        `(model, per-epoch losses)`; the optimizer is `keras_adam.Adam(0.01, **options)`.
    """
    import keras

    import keras_adam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 64)).astype("float32")
    y = rng.integers(0, 10, size=samples).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(96, activation="relu", name="hidden"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras_adam.Adam(0.01, **options),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    history = model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    return model, history.history["loss"]
