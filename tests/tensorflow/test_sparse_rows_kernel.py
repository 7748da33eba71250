"""The sparse-rows Adam kernel (keras_adam/kernels, `KerasAdamSparseApplyAdam`).

`keras_adam.Adam(lazy_sparse=True)` updates the rows a `tf.IndexedSlices`
gradient touches with one op where the fused path applies. The op must
equal a NumPy transcription (coalesce, then maximize, weight decay and
keras.optimizers.Adam's arithmetic per distinct row, with the same scalars:
1 - beta computed in double and rounded once, as Keras does, not from the
rounded beta as ResourceApplyAdam does) to the bit; the optimizer must
equal its `keras.ops` reference path (`fused=False`) to 1e-6 in float32
and the dense fused path to the bit where every row is touched once;
untouched rows and their moments must stay bit-identical; bad input must
raise before anything is written; and the op must be used where it applies
and nowhere else.
"""

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam
from keras_adam import kernels
from tests.helpers.tf_support import needs_compiler, run_python

# With a compiler, the kernel must build: a failure is a test failure.
pytestmark = needs_compiler

HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, epsilon=1e-7)
OPTIONS = {
    "plain": dict(weight_decay=0.0, decoupled_weight_decay=True, maximize=False),
    "maximize": dict(weight_decay=0.0, decoupled_weight_decay=True, maximize=True),
    "decoupled": dict(weight_decay=0.05, decoupled_weight_decay=True, maximize=False),
    "l2": dict(weight_decay=0.05, decoupled_weight_decay=False, maximize=False),
    "l2+maximize": dict(weight_decay=0.05, decoupled_weight_decay=False, maximize=True),
}
REFERENCE_TOLERANCE = {"float32": 1e-6, "float64": 1e-12}


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch):
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)


def module():
    loaded = kernels.load()
    assert loaded is not None, kernels._state.get("error")
    return loaded


# -- the library -------------------------------------------------------------------


def test_one_library_defines_every_op():
    loaded = module()
    assert hasattr(loaded, "keras_adam_sparse_apply_adam")
    assert hasattr(loaded, "keras_adam_multi_tensor_apply_adam")
    assert hasattr(loaded, "keras_adam_quantized_adam")
    assert [path.name for path in kernels.SOURCES] == [
        "multi_tensor_adam.cc",
        "sparse_rows_adam.cc",
        "quantized_adam.cc",
    ]


def test_load_refuses_a_library_without_every_op(monkeypatch, caplog):
    wrappers = {**kernels._WRAPPERS, "KerasAdamNoSuchOp": "keras_adam_no_such_op"}
    monkeypatch.setattr(kernels.loader, "_WRAPPERS", wrappers)
    kernels.reset()
    try:
        assert kernels.load() is None
        assert "does not define KerasAdamNoSuchOp" in caplog.text
    finally:
        kernels.reset()  # the next load() (unpatched) finds the library


@pytest.mark.parametrize(
    "changed",
    [
        "sparse_rows_adam.cc",
        "multi_tensor_adam.cc",
        "quantized_adam.cc",
        "adam_step.h",
        "quantized_adam.h",
    ],
)
def test_cache_key_covers_every_source_and_header(changed, monkeypatch, tmp_path):
    copies = {}
    for path in kernels.SOURCES + kernels.HEADERS:
        copies[path.name] = tmp_path / path.name
        copies[path.name].write_bytes(path.read_bytes())
    monkeypatch.setattr(kernels.builder, "SOURCES", tuple(copies[p.name] for p in kernels.SOURCES))
    monkeypatch.setattr(kernels.builder, "HEADERS", tuple(copies[p.name] for p in kernels.HEADERS))
    compiler = kernels._compiler()
    before = kernels._library_path(compiler)
    assert kernels._library_path(compiler) == before
    copies[changed].write_bytes(copies[changed].read_bytes() + b"// changed\n")
    assert kernels._library_path(compiler) != before


# -- the op against a NumPy transcription ---------------------------------------


def numpy_step(
    var,
    m,
    v,
    values,
    indices,
    t,
    dtype,
    *,
    weight_decay,
    decoupled_weight_decay,
    maximize,
    lr=HYPER["lr"],
):
    """One step on NumPy arrays in `dtype` arithmetic (in place)."""
    scalars = step_scalars(dtype, t, lr)
    lr, alpha, epsilon = scalars["lr"], scalars["alpha"], scalars["epsilon"]
    one_minus_beta1, one_minus_beta2 = scalars["one_minus_beta1"], scalars["one_minus_beta2"]
    wd = dtype(weight_decay)
    totals = {}
    for position, row in enumerate(indices):  # coalesce, in the order of positions
        row = int(row)
        totals[row] = (
            values[position].copy() if row not in totals else totals[row] + values[position]
        )
    for row, g in totals.items():
        if maximize:
            g = -g
        if wd and not decoupled_weight_decay:
            g = g + var[row] * wd
        if wd and decoupled_weight_decay:
            var[row] = var[row] - var[row] * wd * lr
        m[row] = m[row] + (g - m[row]) * one_minus_beta1
        v[row] = v[row] + (g * g - v[row]) * one_minus_beta2
        var[row] = var[row] - (m[row] * alpha) / (np.sqrt(v[row]) + epsilon)


def step_scalars(dtype, t, lr=HYPER["lr"]):
    """The op's scalars at step `t`, computed as Keras computes them, in `dtype`.

    1 - beta in double, rounded once (Keras's `1 - self.beta_1`), not
    `1 - dtype(beta)`; the step size from the β powers in `dtype`.
    """
    one, lr = dtype(1), dtype(lr)
    beta1_power, beta2_power = dtype(HYPER["beta1"] ** t), dtype(HYPER["beta2"] ** t)
    return dict(
        lr=lr,
        alpha=lr * np.sqrt(one - beta2_power) / (one - beta1_power),
        one_minus_beta1=dtype(1 - HYPER["beta1"]),
        one_minus_beta2=dtype(1 - HYPER["beta2"]),
        epsilon=dtype(HYPER["epsilon"]),
    )


def op_scalars(dtype, t, weight_decay=0.0):
    np_dtype = np.dtype(dtype).type
    scalars = {**step_scalars(np_dtype, t), "weight_decay": np_dtype(weight_decay)}
    return {name: tf.constant(value) for name, value in scalars.items()}


def apply_op(
    state, values, indices, t, weight_decay=0.0, decoupled_weight_decay=True, maximize=False
):
    var, m, v = state
    module().keras_adam_sparse_apply_adam(
        var=var.handle,
        m=m.handle,
        v=v.handle,
        grad=values,
        indices=indices,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
        **op_scalars(var.dtype.name, t, weight_decay),
    )


def make_state(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    var = rng.normal(size=shape).astype(dtype)
    m = (0.1 * rng.normal(size=shape)).astype(dtype)
    v = np.abs(0.01 * rng.normal(size=shape)).astype(dtype)
    return [var, m, v], [tf.Variable(x) for x in (var, m, v)]


def batches(rows, row_shape, dtype, index_dtype, steps, seed=1, sizes=(13, 6, 300, 1, 9)):
    """Per step (values, indices): duplicates, all-equal and unsorted indices.

    Only the lower half of the rows is touched.
    """
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        n = sizes[t % len(sizes)]
        if t % 5 == 1:
            indices = np.full(n, rows // 2 - 1)  # all equal
        else:
            indices = rng.integers(0, rows // 2, size=n)  # duplicates; upper half untouched
        values = rng.normal(size=(n, *row_shape)).astype(dtype)
        out.append((values, indices.astype(index_dtype)))
    return out


def numbers(state):
    return [x.numpy() for x in state]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("row_shape", [(5,), (4, 3)])
def test_op_equals_numpy_transcription_to_the_bit(row_shape, option, index_dtype, dtype):
    rows = 40
    expected, state = make_state((rows, *row_shape), dtype)
    initial = [x.copy() for x in expected]
    for t, (values, indices) in enumerate(batches(rows, row_shape, dtype, index_dtype, 5), 1):
        apply_op(state, tf.constant(values), tf.constant(indices), t, **OPTIONS[option])
        numpy_step(*expected, values, indices, t, np.dtype(dtype).type, **OPTIONS[option])
    for ours, theirs, before in zip(numbers(state), expected, initial, strict=True):
        np.testing.assert_array_equal(ours, theirs)
        assert not np.array_equal(ours[: rows // 2], before[: rows // 2])  # it moved
        np.testing.assert_array_equal(ours[rows // 2 :], before[rows // 2 :])  # untouched


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_many_unsorted_indices_take_the_radix_sort_and_still_match(dtype):
    # n >= 256 unsorted indices over 5000 rows: two 11-bit radix passes.
    rows = 5000
    expected, state = make_state((rows, 3), dtype)
    rng = np.random.default_rng(7)
    for t in range(1, 4):
        indices = rng.integers(0, rows, size=3000).astype("int64")
        values = rng.normal(size=(3000, 3)).astype(dtype)
        apply_op(state, tf.constant(values), tf.constant(indices), t, maximize=True)
        numpy_step(*expected, values, indices, t, np.dtype(dtype).type, **OPTIONS["maximize"])
    for ours, theirs in zip(numbers(state), expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_no_indices_is_a_no_op(mode, index_dtype):
    _, state = make_state((6, 2), "float32")
    before = numbers(state)
    call = apply_op if mode == "eager" else tf.function(apply_op)
    call(state, tf.zeros((0, 2)), tf.zeros((0,), index_dtype), 1)
    for ours, theirs in zip(numbers(state), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("bad", [-1, 40, 2**31 - 1])
def test_out_of_range_index_raises_and_writes_nothing(bad, mode):
    _, state = make_state((40, 3), "float32")
    before = numbers(state)
    call = apply_op if mode == "eager" else tf.function(apply_op)
    indices = tf.constant([1, 2, 1, bad, 5], "int64")
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"indices\[3\] = {bad} is not in"):
        call(state, tf.ones((5, 3)), indices, 1)
    for ours, theirs in zip(numbers(state), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_bad_shapes_and_aliasing_raise_instead_of_crashing(mode):
    _, (var, m, v) = make_state((8, 3), "float32")
    before = [x.numpy() for x in (var, m, v)]
    other = tf.Variable(tf.ones((8, 4)))
    wide = tf.Variable(tf.ones((8, 3), "float64"))
    scalar_var = [tf.Variable(1.0) for _ in range(3)]
    indices = tf.constant([0, 1], "int64")
    cases = [
        ((var, m, v), tf.ones((3, 3)), indices, {}, "rows|Dimensions must be equal"),
        ((var, m, v), tf.ones((2, 4)), indices, {}, "rows do not have the shape"),
        ((var, m, v), tf.ones((2, 3, 1)), indices, {}, "rows do not have the shape"),
        ((var, m, other), tf.ones((2, 3)), indices, {}, "v has shape"),
        ((var, var, v), tf.ones((2, 3)), indices, {}, "more than once"),
        ((var, m, wide), tf.ones((2, 3)), indices, {}, "dtype"),
        ((var, m, v), tf.ones((2, 3)), tf.constant([[0, 1]], "int64"), {}, "vector|rank 1"),
        (tuple(scalar_var), tf.ones((2,)), indices, {}, "rank >= 1"),
    ]
    for state, values, index, kwargs, message in cases:
        call = apply_op if mode == "eager" else tf.function(apply_op)
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
            call(state, values, index, 1, **kwargs)
    for ours, theirs in zip((var, m, v), before, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs)


def test_non_scalar_hyperparameter_raises():
    _, (var, m, v) = make_state((8, 3), "float32")
    scalars = {**op_scalars("float32", 1), "lr": tf.constant([0.1, 0.2])}
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="scalar|rank 0"):
        module().keras_adam_sparse_apply_adam(
            var=var.handle,
            m=m.handle,
            v=v.handle,
            grad=tf.ones((1, 3)),
            indices=tf.constant([0]),
            **scalars,
        )


def test_copy_on_write_keeps_a_pending_read_intact():
    expected, state = make_state((50, 4), "float32")
    initial = expected[0].copy()
    held = tf.raw_ops.ReadVariableOp(resource=state[0].handle, dtype=tf.float32)  # shares it
    values = np.ones((3, 4), "float32")
    indices = np.array([4, 9, 4])
    apply_op(state, tf.constant(values), tf.constant(indices), 1)
    numpy_step(*expected, values, indices, 1, np.float32, **OPTIONS["plain"])
    np.testing.assert_array_equal(held.numpy(), initial)
    for ours, theirs in zip(numbers(state), expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


# The pytest process uses one intra-op thread (conftest): check the split of
# the distinct rows over a real thread pool in a fresh process.
THREADED = textwrap.dedent(
    """
    import json
    import numpy as np, tensorflow as tf
    from keras_adam import kernels
    tf.config.threading.set_intra_op_parallelism_threads(4)
    module = kernels.load()
    rng = np.random.default_rng(0)
    rows, width = 20000, 16
    start = rng.normal(size=(rows, width)).astype("float32")
    var = [tf.Variable(start) for _ in range(2)]
    ms = [tf.Variable(tf.zeros((rows, width))) for _ in range(2)]
    vs = [tf.Variable(tf.zeros((rows, width))) for _ in range(2)]
    for t in range(1, 4):
        indices = rng.integers(0, rows, size=30000)
        values = tf.constant(rng.normal(size=(30000, width)), "float32")
        alpha = np.float32(0.01) * np.sqrt(1 - np.float32(0.999**t)) / (1 - np.float32(0.9**t))
        scalars = dict(lr=tf.constant(0.01), alpha=tf.constant(alpha),
                       one_minus_beta1=tf.constant(1 - 0.9), one_minus_beta2=tf.constant(1 - 0.999),
                       epsilon=tf.constant(1e-7), weight_decay=tf.constant(0.01))
        for k, order in enumerate([np.arange(30000), np.argsort(indices, kind="stable")]):
            module.keras_adam_sparse_apply_adam(
                var=var[k].handle, m=ms[k].handle, v=vs[k].handle,
                grad=tf.gather(values, order), indices=tf.constant(indices[order]), **scalars)
    print(json.dumps(dict(
        # Elements where unsorted and presorted differ: weights, m, v.
        mismatched=[int(np.count_nonzero(a.numpy() != b.numpy()))
                    for a, b in ((var[0], var[1]), (ms[0], ms[1]), (vs[0], vs[1]))],
        rows_moved=int(np.count_nonzero(np.any(var[0].numpy() != start, axis=1))),
    )))
    """
)


def test_threaded_split_equals_presorted_order():
    # Unsorted (radix sort, rows split over 4 threads) against the same
    # slices given already sorted by row, positions in the same order. Four
    # intra-op threads must be set before TensorFlow starts.
    measured = run_python(THREADED)
    assert measured["mismatched"] == [0, 0, 0]
    # 90 000 random rows of 20 000: all but about e^-4.5 of them are touched.
    assert measured["rows_moved"] > 19000, measured


# -- the optimizer ---------------------------------------------------------------------


def op_types(step, *args):
    graph = step.get_concrete_function(*args).graph
    types = [op.type for op in graph.get_operations()]
    for function in graph._functions.values():
        types.extend(node.op for node in function.definition.node_def)
    return types


def train(optimizer, dtype, mode, shape=(30, 4), steps=6, index_dtype="int64", seed=0):
    """Lazy sparse training of one table; returns (weights, moments, step, args)."""
    rng = np.random.default_rng(seed)
    table = keras.Variable(rng.normal(size=shape), dtype=dtype, name="table")
    optimizer.build([table])

    def step(values, indices):
        gradient = tf.IndexedSlices(values, indices, tf.constant(shape, "int64"))
        optimizer.apply_gradients([(gradient, table)])

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    # One size for all steps: one trace.
    data = batches(shape[0], shape[1:], dtype, index_dtype, steps, seed=seed + 1, sizes=(13,))
    for values, indices in data:
        step(tf.constant(values), tf.constant(indices))
    args = (tf.constant(data[0][0]), tf.constant(data[0][1]))
    moments = [x.numpy() for x in optimizer.variables[2:4]]
    return table.numpy(), moments, step, args


def relative_deviation(actual, expected):
    scale = max(np.max(np.abs(expected)), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)


OPTIMIZER_OPTIONS = {
    "plain": {},
    "maximize": {"maximize": True},
    "decoupled": {"weight_decay": 0.05},
    "l2": {"weight_decay": 0.05, "decoupled_weight_decay": False},
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("option", sorted(OPTIMIZER_OPTIONS))
def test_optimizer_matches_reference_path_and_numpy(option, mode, dtype):
    kwargs = OPTIMIZER_OPTIONS[option]
    ours, our_moments, step, args = train(
        keras_adam.Adam(learning_rate=0.01, lazy_sparse=True, **kwargs), dtype, mode
    )
    reference, reference_moments, _, _ = train(
        keras_adam.Adam(learning_rate=0.01, lazy_sparse=True, fused=False, **kwargs), dtype, mode
    )
    if mode == "function":
        assert kernels.SPARSE_OP_NAME in op_types(step, *args)
    # NumPy, from the same start (the optimizer's moments start at zero).
    rng = np.random.default_rng(0)
    expected = [rng.normal(size=(30, 4)).astype(dtype)]
    expected += [np.zeros((30, 4), dtype), np.zeros((30, 4), dtype)]
    initial = expected[0].copy()
    decay = {
        "weight_decay": kwargs.get("weight_decay", 0.0),
        "decoupled_weight_decay": kwargs.get("decoupled_weight_decay", True),
        "maximize": kwargs.get("maximize", False),
    }
    data = batches(30, (4,), dtype, "int64", 6, seed=1, sizes=(13,))
    for t, (values, indices) in enumerate(data, 1):
        # The learning-rate variable is float32 (floatx), also for float64 tables.
        lr = float(np.float32(0.01))
        numpy_step(*expected, values, indices, t, np.dtype(dtype).type, lr=lr, **decay)
    tolerance = REFERENCE_TOLERANCE[dtype]
    assert relative_deviation(reference, initial) > 1e-3
    assert relative_deviation(ours, reference) <= tolerance
    assert relative_deviation(ours, expected[0]) <= tolerance
    for a, b, c in zip(our_moments, reference_moments, expected[1:], strict=True):
        assert relative_deviation(a, b) <= 10 * tolerance
        assert relative_deviation(a, c) <= 10 * tolerance
    # Untouched rows (the upper half) and their moments: bit-identical.
    np.testing.assert_array_equal(ours[15:], initial[15:])
    for moment in our_moments:
        np.testing.assert_array_equal(moment[15:], 0.0)


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
def test_optimizer_uses_the_op_with_either_index_dtype(index_dtype):
    optimizer = keras_adam.Adam(learning_rate=0.01, lazy_sparse=True)
    ours, _, step, args = train(optimizer, "float32", "function", index_dtype=index_dtype)
    assert op_types(step, *args).count(kernels.SPARSE_OP_NAME) == 1
    reference, _, _, _ = train(
        keras_adam.Adam(learning_rate=0.01, lazy_sparse=True, fused=False),
        "float32",
        "function",
        index_dtype=index_dtype,
    )
    assert relative_deviation(ours, reference) <= REFERENCE_TOLERANCE["float32"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fused": False},
        {"amsgrad": True},
        {"epsilon_mode": "paper"},
        {"rectify": True},
        {"moment_dtype": "float64"},
    ],
)
def test_not_used_where_the_fused_path_is_not(kwargs):
    optimizer = keras_adam.Adam(learning_rate=0.01, lazy_sparse=True, **kwargs)
    _, _, step, args = train(optimizer, "float32", "function", steps=1)
    types = op_types(step, *args)
    assert kernels.SPARSE_OP_NAME not in types
    assert "ResourceScatterUpdate" in types  # the keras.ops path ran instead


def test_not_used_for_bfloat16_tables():
    optimizer = keras_adam.Adam(learning_rate=0.01, lazy_sparse=True)
    _, _, step, args = train(optimizer, "bfloat16", "function", steps=1)
    assert kernels.SPARSE_OP_NAME not in op_types(step, *args)


def test_not_used_under_xla_and_results_match():
    xla, _, step, args = train(
        keras_adam.Adam(learning_rate=0.01, lazy_sparse=True), "float32", "xla"
    )
    assert kernels.SPARSE_OP_NAME not in op_types(step, *args)
    ours, _, _, _ = train(
        keras_adam.Adam(learning_rate=0.01, lazy_sparse=True), "float32", "function"
    )
    assert relative_deviation(xla, ours) <= REFERENCE_TOLERANCE["float32"]


def test_not_used_when_the_kernels_are_disabled(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    _, _, step, args = train(keras_adam.Adam(lazy_sparse=True), "float32", "function", steps=1)
    assert kernels.SPARSE_OP_NAME not in op_types(step, *args)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("option", sorted(OPTIMIZER_OPTIONS))
def test_every_row_touched_equals_the_dense_fused_path_to_the_bit(option, mode, dtype):
    # Each step touches every row once, in a shuffled order: the lazy op and
    # the dense multi-tensor op then compute the same numbers. One exception,
    # measured: in a tf.function, Grappler's arithmetic optimizer turns the
    # dense path's decoupled decay var - (var * wd) * lr into
    # var - var * (wd * lr), which can round differently: 1 ulp at most
    # (over 50 steps; the difference does not grow).
    shape = (64, 5)
    kwargs = OPTIMIZER_OPTIONS[option]
    rng = np.random.default_rng(3)
    start = rng.normal(size=shape)
    lazy_table = keras.Variable(start, dtype=dtype)
    dense_table = keras.Variable(start, dtype=dtype)
    lazy = keras_adam.Adam(learning_rate=0.01, lazy_sparse=True, **kwargs)
    dense = keras_adam.Adam(learning_rate=0.01, **kwargs)
    lazy.build([lazy_table])
    dense.build([dense_table])

    def step(values, indices, full):
        gradient = tf.IndexedSlices(values, indices, tf.constant(shape, "int64"))
        lazy.apply_gradients([(gradient, lazy_table)])
        dense.apply_gradients([(full, dense_table)])

    if mode == "function":
        step = tf.function(step)
    for _ in range(8):
        order = rng.permutation(shape[0])
        full = rng.normal(size=shape).astype(dtype)
        step(tf.constant(full[order]), tf.constant(order), tf.constant(full))
    if mode == "function":
        types = op_types(step, tf.constant(full), tf.constant(order), tf.constant(full))
        assert kernels.SPARSE_OP_NAME in types and kernels.OP_NAME in types
    assert relative_deviation(lazy_table.numpy(), start.astype(dtype)) > 1e-3
    pairs = [
        (lazy_table, dense_table),
        *zip(lazy.variables[2:4], dense.variables[2:4], strict=True),
    ]
    for a, b in pairs:
        if mode == "function" and option == "decoupled":
            np.testing.assert_array_max_ulp(a.numpy(), b.numpy(), maxulp=1)
        else:
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_embedding_model_fit_matches_reference_path():
    tokens = np.random.default_rng(0).integers(0, 200, size=(64, 4))
    labels = (tokens[:, 0] % 2).astype("float32")

    def fit(**kwargs):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((4,), dtype="int32"),
                keras.layers.Embedding(200, 8),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )
        initial = model.get_weights()[0]
        model.compile(keras_adam.Adam(learning_rate=0.05, lazy_sparse=True, **kwargs), "mse")
        model.fit(tokens, labels, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return initial, model.get_weights()[0]

    initial, ours = fit()
    _, reference = fit(fused=False)
    assert relative_deviation(ours, initial) > 1e-3
    assert relative_deviation(ours, reference) <= REFERENCE_TOLERANCE["float32"]
    untouched = np.setdiff1d(np.arange(200), tokens)
    assert untouched.size > 0
    np.testing.assert_array_equal(ours[untouched], initial[untouched])
