"""`moment_dtype="int8"` / `"int4"`: codes and steps against a NumPy transcription.

The transcription (`tests.helpers.numpy_quantization`) builds the code
tables from their definition and quantizes by brute force; the step is
"dequantize, Adam (`tests.helpers.numpy_adam`), quantize". Each step of
`keras_adam.Adam` is compared with the transcription applied to the state
it started from, on every mode of this backend.
"""

import math

import hypothesis.extra.numpy as hnp
import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import keras_adam
from keras_adam import quantization
from tests.helpers import numpy_quantization as nq
from tests.helpers.neutral import BACKEND, MODES

FORMATS = [(dtype, signed) for dtype in ("int8", "int4") for signed in (True, False)]


def _format(moment_dtype, signed):
    m_format, v_format = quantization.formats(moment_dtype)
    return m_format if signed else v_format


def _heavy_tailed(rng, size, signed=True):
    x = rng.standard_normal(size) * np.exp(rng.uniform(-14, 3, size))
    return (x if signed else np.abs(x)).astype(np.float32)


# -- the codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("moment_dtype", "signed"), FORMATS)
def test_code_tables_are_the_float_and_decade_maps(moment_dtype, signed):
    expected = nq.table(nq.SIZES[moment_dtype][0], signed)
    np.testing.assert_array_equal(_format(moment_dtype, signed).table, expected)
    assert len(expected) <= 2 ** nq.SIZES[moment_dtype][0]
    assert expected.max() == 1.0
    assert (0.0 in expected) == signed  # v's map has no zero


@pytest.mark.parametrize(("moment_dtype", "signed"), FORMATS)
def test_every_code_maps_back_to_itself(moment_dtype, signed):
    fmt = _format(moment_dtype, signed)
    table = fmt.table
    # Each block holds the table, padded with copies of 1 (so absmax = 1).
    block = fmt.block_size
    values = np.concatenate([table, np.ones(block - len(table) % block, np.float32)])
    for scale in (1.0, 3.0e-5, 2.0**40):
        codes, scales = quantization.encode(ops.convert_to_tensor(values * scale), fmt)
        unpacked = nq.unpack(ops.convert_to_numpy(codes), values.size, moment_dtype)
        np.testing.assert_array_equal(unpacked[: len(table)], np.arange(len(table)))
        decoded = ops.convert_to_numpy(quantization.decode(codes, scales, values.shape, fmt))
        np.testing.assert_allclose(decoded, values * np.float32(scale), rtol=1e-6)


@pytest.mark.parametrize(("moment_dtype", "signed"), FORMATS)
@pytest.mark.parametrize("size", [1, 127, 128, 255, 256, 257, 4097, 10_001])
def test_encoding_is_the_nearest_code_of_each_block(moment_dtype, signed, size):
    rng = np.random.default_rng(size)
    fmt = _format(moment_dtype, signed)
    x = _heavy_tailed(rng, size, signed).reshape(-1, 1) if size > 1 else np.float32([[0.5]])
    codes, scales = quantization.encode(ops.convert_to_tensor(x), fmt)
    assert tuple(codes.shape) == (math.ceil(size * fmt.bits / 8),)  # a short last block
    expected_codes, expected_scales = nq.quantize(x, moment_dtype, signed)
    np.testing.assert_array_equal(ops.convert_to_numpy(scales), expected_scales)
    decoded = ops.convert_to_numpy(quantization.decode(codes, scales, x.shape, fmt))
    expected = nq.dequantize(expected_codes, expected_scales, x.shape, moment_dtype, signed)
    # Nearest: as near as the brute-force choice (they differ only at exact ties).
    np.testing.assert_allclose(
        np.abs(decoded - x), np.abs(expected - x), atol=1e-6 * np.abs(x).max()
    )
    unpacked = nq.unpack(ops.convert_to_numpy(codes), size, moment_dtype)
    mismatched = unpacked != expected_codes
    assert mismatched.mean() < 1e-3


@pytest.mark.parametrize(("moment_dtype", "signed"), FORMATS)
@pytest.mark.parametrize("size", [4097, 4096 + 129])  # short last blocks, an odd int4 size
def test_a_moment_is_one_buffer_of_its_scales_then_its_codes(moment_dtype, signed, size):
    # The layout every path reads and writes, and files hold: one uint8
    # variable per moment (as many buffers as a float moment), the blocks'
    # little-endian float32 scales first, then the codes.
    rng = np.random.default_rng(size)
    fmt = _format(moment_dtype, signed)
    x = _heavy_tailed(rng, size, signed).reshape(-1, 1)
    variable = keras.Variable(np.zeros(fmt.storage_bytes(size), np.uint8), trainable=False)
    moment = quantization.QuantizedMoment(variable, x.shape, fmt)
    moment.assign(ops.convert_to_tensor(x))
    stored = np.asarray(variable.numpy())
    blocks = math.ceil(size / fmt.block_size)
    assert stored.dtype == np.uint8
    assert stored.shape == (4 * blocks + math.ceil(size * fmt.bits / 8),)
    code_bytes, scales = nq.split_storage(stored, size, fmt.bits)
    _, expected_scales = nq.quantize(x, moment_dtype, signed)
    np.testing.assert_array_equal(scales, expected_scales)
    codes, own_scales = quantization.encode(ops.convert_to_tensor(x), fmt)
    np.testing.assert_array_equal(code_bytes, ops.convert_to_numpy(codes))
    np.testing.assert_array_equal(stored, nq.join_storage(code_bytes, own_scales))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(moment.value),
        ops.convert_to_numpy(quantization.decode(codes, own_scales, x.shape, fmt)),
    )


@pytest.mark.parametrize(("moment_dtype", "signed"), FORMATS)
def test_each_value_gets_the_code_below_which_no_midpoint_lies(moment_dtype, signed):
    # The rule every path shares (keras.ops here, the C++ kernels, the XLA
    # call): the magnitude index is the number of float32 midpoints strictly
    # below |y| (a value at a midpoint takes the smaller magnitude; NaN the
    # largest), the sign from y < 0. Checked where it is hardest: at every
    # midpoint, one ulp either side, 0, -0, denormals, 1, ±inf and NaN.
    fmt = _format(moment_dtype, signed)
    table = fmt.table.astype(np.float64)
    # Midpoints of the exact (float64) map, rounded to float32.
    magnitudes = np.sort(np.append(fmt.magnitudes, [0.0] if signed else []))
    midpoints = ((magnitudes[:-1] + magnitudes[1:]) / 2).astype(np.float32)
    special = np.float32([0.0, -0.0, 1e-45, 1e-40, 2.0**-33, 1.0, np.inf, np.nan, 1e-3])
    y = np.concatenate(
        [midpoints, np.nextafter(midpoints, 2), np.nextafter(midpoints, 0), special]
        + [_heavy_tailed(np.random.default_rng(0), 5000, signed=False).clip(0, 1)]
    )
    if signed:
        y = np.concatenate([y, -y])
    codes = ops.convert_to_numpy(quantization.nearest_codes(ops.convert_to_tensor(y), fmt))
    k = np.searchsorted(midpoints, np.abs(y), side="left")
    k = np.where(np.isnan(y), len(midpoints), k)
    if signed:
        zero = int(np.flatnonzero(table == 0)[0])
        expected = zero + np.where(y < 0, -k, k)
    else:
        expected = k
    np.testing.assert_array_equal(codes, expected)
    # And it is a nearest code wherever the midpoint's rounding allows.
    finite = np.isfinite(y)
    gap = np.abs(table[codes[finite]] - y[finite]) - np.abs(table[None] - y[finite, None]).min(1)
    assert gap.max() <= 2.0**-24 * np.abs(y[finite]).max()


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 700),
        elements=st.floats(0, 2.0**100, width=32, allow_subnormal=False),
    ),
    moment_dtype=st.sampled_from(["int8", "int4"]),
)
def test_v_never_decodes_to_zero_in_a_nonzero_block(x, moment_dtype):
    fmt = _format(moment_dtype, False)
    codes, scales = quantization.encode(ops.convert_to_tensor(x), fmt)
    decoded = ops.convert_to_numpy(quantization.decode(codes, scales, x.shape, fmt))
    block_max = np.repeat(ops.convert_to_numpy(scales), fmt.block_size)[: x.size]
    assert np.all(decoded[block_max > 0] > 0)
    assert np.all(decoded[block_max == 0] == 0)
    assert np.all(np.isfinite(decoded))
    assert np.all(decoded <= block_max)


# -- the step ---------------------------------------------------------------------------------

SHAPE = (7, 971)  # 6797 values: short last blocks, an odd count of int4 codes
VARIANTS = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "adamw": {"weight_decay": 0.25},
    "l2_maximize": {"weight_decay": 0.125, "decoupled_weight_decay": False, "maximize": True},
    "radam_paper": {"rectify": True, "beta_2": 0.9, "epsilon_mode": "paper", "epsilon": 1e-6},
}
STEPS = 8


def _hyper(options):
    hyper = dict(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    hyper.update(
        {
            k: options.get(k, default)
            for k, default in [
                ("beta_2", 0.999),
                ("epsilon", 1e-7),
                ("epsilon_mode", "hat"),
                ("amsgrad", False),
                ("weight_decay", 0.0),
                ("decoupled_weight_decay", True),
                ("maximize", False),
                ("rectify", False),
            ]
        }
    )
    return hyper


def _stored(moment):
    """The moment's stored codes and scales, split by the transcription."""
    return nq.split_storage(moment.variable.numpy(), math.prod(moment.shape), moment.fmt.bits)


def _decoded(moment, moment_dtype, signed):
    packed, scales = _stored(moment)
    codes = nq.unpack(packed, math.prod(moment.shape), moment_dtype)
    return nq.dequantize(codes, scales, moment.shape, moment_dtype, signed)


def _stepper(optimizer, variables, mode):
    def apply(grads):
        optimizer.apply(grads, variables)

    if mode in ("function", "xla"):
        import tensorflow as tf

        return tf.function(apply, jit_compile=mode == "xla")
    if mode == "jit":
        import jax

        @jax.jit
        def pure(optimizer_values, values, grads):
            new_values, new_optimizer = optimizer.stateless_apply(optimizer_values, grads, values)
            return new_values, new_optimizer

        def run(grads):
            new_values, new_optimizer = pure(
                [v.value for v in optimizer.variables], [v.value for v in variables], grads
            )
            for variable, value in zip(
                [*variables, *optimizer.variables], [*new_values, *new_optimizer], strict=True
            ):
                variable.assign(value)

        return run
    return apply


def _assert_moment(moment, expected, moment_dtype, signed):
    value, _, expected_scales = expected
    _, scales = _stored(moment)
    np.testing.assert_allclose(scales, expected_scales, rtol=2e-6, atol=1e-30)
    decoded = _decoded(moment, moment_dtype, signed)
    library = ops.convert_to_numpy(moment.value)
    np.testing.assert_array_equal(library, decoded)
    # Our code is a nearest code of the transcription's value, up to round-off.
    size = math.prod(moment.shape)
    block = nq.SIZES[moment_dtype][1]
    tolerance = 1e-5 * np.repeat(expected_scales, block)[:size].reshape(moment.shape)
    ref = nq.dequantize(*expected[1:], moment.shape, moment_dtype, signed)
    assert np.all(np.abs(decoded - value) <= np.abs(ref - value) + tolerance)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
def test_each_step_is_dequantize_adam_quantize(moment_dtype, variant, mode):
    options = VARIANTS[variant]
    hyper = _hyper(options)
    rng = np.random.default_rng(0)
    kernel = keras.Variable(rng.standard_normal(SHAPE).astype(np.float32), name="kernel")
    bias = keras.Variable(rng.standard_normal(SHAPE[1]).astype(np.float32), name="bias")
    optimizer = keras_adam.Adam(learning_rate=0.01, moment_dtype=moment_dtype, **options)
    optimizer.build([kernel, bias])
    m, v = optimizer._momentums[0], optimizer._velocities[0]
    v_hat = optimizer._velocity_hats[0] if hyper["amsgrad"] else None
    assert isinstance(m, quantization.QuantizedMoment)
    assert keras.backend.standardize_dtype(optimizer._momentums[1].dtype) == "float32"
    step = _stepper(optimizer, [kernel, bias], mode)
    for t in range(1, STEPS + 1):
        grads = [
            _heavy_tailed(rng, SHAPE[0] * SHAPE[1]).reshape(SHAPE),
            _heavy_tailed(rng, SHAPE[1]),
        ]
        before = kernel.numpy()
        state = [
            _decoded(m, moment_dtype, True),
            _decoded(v, moment_dtype, False),
            None if v_hat is None else _decoded(v_hat, moment_dtype, False),
        ]
        theta, expected = nq.step(before, grads[0], *state, t, moment_dtype, **hyper)
        step([ops.convert_to_tensor(g) for g in grads])
        moved = np.abs(theta - before).max()
        np.testing.assert_allclose(
            kernel.numpy(), theta, rtol=0, atol=1e-6 * np.abs(before).max() + 1e-4 * moved
        )
        _assert_moment(m, expected["m"], moment_dtype, True)
        _assert_moment(v, expected["v"], moment_dtype, False)
        if v_hat is not None:
            _assert_moment(v_hat, expected["v_hat"], moment_dtype, False)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == STEPS


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
def test_state_bytes_per_value(moment_dtype):
    kernel = keras.Variable(np.zeros((1000, 1000), np.float32))
    optimizer = keras_adam.Adam(moment_dtype=moment_dtype, amsgrad=True)
    optimizer.build([kernel])
    state = (
        sum(
            np.asarray(v.numpy()).nbytes
            for v in optimizer.variables
            if v is not optimizer.iterations
        )
        - 4
    )  # the learning rate
    per_value = state / kernel.numpy().size
    expected = {"int8": 3 * (1 + 4 / 256), "int4": 3 * (0.5 + 4 / 128)}[moment_dtype]
    assert per_value == pytest.approx(expected, rel=1e-3)


# -- the options around the step ----------------------------------------------------------------


def _fit_digits(moment_dtype, **options):
    from tests.helpers import digits

    (x, y), (x_val, y_val) = digits.split()
    keras.utils.set_random_seed(1)
    model = digits.mlp(seed=1)
    model.compile(
        optimizer=keras_adam.Adam(learning_rate=3e-3, moment_dtype=moment_dtype, **options),
        loss=digits.LOSS,
        jit_compile=False if BACKEND == "torch" else "auto",
    )
    history = model.fit(x, y, epochs=4, batch_size=64, verbose=0, shuffle=False)
    return history.history["loss"][-1], model.evaluate(x_val, y_val, verbose=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"amsgrad": True, "weight_decay": 0.01},
        {"gradient_accumulation_steps": 2, "use_ema": True, "clipnorm": 1.0},
        {"skip_nonfinite": True, "global_clipnorm": 1.0, "rectify": True},
    ],
    ids=["plain", "amsgrad_decay", "accumulation_ema_clip", "skip_radam"],
)
def test_training_is_as_good_as_float32(options):
    float_loss, float_val = _fit_digits(None, **options)
    for moment_dtype in ("int8", "int4"):
        loss, val = _fit_digits(moment_dtype, **options)
        assert np.isfinite(loss)
        assert val < float_val * 1.25 + 0.05, (moment_dtype, val, float_val)


def test_a_skipped_step_leaves_quantized_state_exactly():
    kernel = keras.Variable(np.ones((64, 80), np.float32))
    optimizer = keras_adam.Adam(moment_dtype="int8", skip_nonfinite=True)
    good = ops.convert_to_tensor(np.linspace(-1, 1, 64 * 80, dtype=np.float32).reshape(64, 80))
    optimizer.apply([good], [kernel])
    before = [np.asarray(v.numpy()) for v in optimizer.variables]
    weights = kernel.numpy()
    bad = ops.where(ops.equal(good, good[0, 0]), float("nan"), good)
    optimizer.apply([bad], [kernel])
    after = [np.asarray(v.numpy()) for v in optimizer.variables]
    for old, new, variable in zip(before, after, optimizer.variables, strict=True):
        if variable is optimizer.skipped_steps:
            assert int(new) == int(old) + 1
        else:
            np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(kernel.numpy(), weights)


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"moment_dtype": "int2"}, "moment_dtype='int2'"),
        ({"moment_dtype": "int8", "lazy_sparse": True}, "lazy_sparse=True, moment_dtype='int8'"),
        ({"moment_dtype": "int4", "fused": True}, "fused=True, moment_dtype='int4'"),
        (
            {"moment_dtype": "bfloat16", "quantize_embeddings": True},
            "quantize_embeddings=True, moment_dtype='bfloat16'",
        ),
        ({"quantize_embeddings": True}, "quantize_embeddings=True, moment_dtype=None"),
        ({"moment_dtype": "int8", "quantize_embeddings": "yes"}, "quantize_embeddings='yes'"),
    ],
)
def test_combinations_that_cannot_work_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        keras_adam.Adam(**arguments)


# -- embedding tables ---------------------------------------------------------------------


def _embedding_model():
    keras.utils.set_random_seed(0)
    ids = keras.Input((3,), dtype="int32")
    rows = keras.layers.Embedding(1000, 8, name="table")(ids)  # 8000 values
    return keras.Model(ids, keras.layers.Dense(4096, name="wide")(rows))


def _moment_kinds(optimizer, model):
    return {
        variable.name: type(optimizer._momentums[optimizer._get_variable_index(variable)])
        for variable in model.trainable_variables
    }


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
def test_embedding_tables_keep_float32_moments_unless_asked(moment_dtype):
    model = _embedding_model()
    plain = keras_adam.Adam(moment_dtype=moment_dtype)
    plain.build(model.trainable_variables)
    kinds = _moment_kinds(plain, model)
    assert kinds["embeddings"] is not quantization.QuantizedMoment
    assert kinds["kernel"] is quantization.QuantizedMoment  # 8 x 4096 values
    assert kinds["bias"] is quantization.QuantizedMoment  # 4096 values
    table = plain._momentums[plain._get_variable_index(model.get_layer("table").embeddings)]
    assert keras.backend.standardize_dtype(table.dtype) == "float32"

    asked = keras_adam.Adam(moment_dtype=moment_dtype, quantize_embeddings=True)
    asked.build(model.trainable_variables)
    assert set(_moment_kinds(asked, model).values()) == {quantization.QuantizedMoment}
    assert keras_adam.Adam.from_config(asked.get_config()).quantize_embeddings is True


def test_an_embedding_table_steps_as_float_adam_next_to_quantized_moments():
    # Varied gradients: quantized moments of the table would miss by about 1e-3.
    rng = np.random.default_rng(0)
    model, reference = _embedding_model(), _embedding_model()
    steps = [[rng.standard_normal(v.shape).astype(np.float32) for v in model.trainable_variables]]
    steps *= 3
    for optimizer, net in (
        (keras_adam.Adam(learning_rate=0.1, moment_dtype="int8"), model),
        (keras_adam.Adam(learning_rate=0.1), reference),
    ):
        for grads in steps:
            optimizer.apply([ops.convert_to_tensor(g) for g in grads], net.trainable_variables)
    table, expected = model.get_layer("table").embeddings, reference.get_layer("table").embeddings
    np.testing.assert_allclose(table.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    kernel, other = model.get_layer("wide").kernel, reference.get_layer("wide").kernel
    assert np.abs(kernel.numpy() - other.numpy()).max() > 1e-5  # quantized: not float Adam
