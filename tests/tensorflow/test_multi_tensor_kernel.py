"""The multi-tensor Adam kernel (keras_adam/kernels): one op per dtype and step.

It must give Keras's numbers: the op equals a NumPy transcription of
keras.optimizers.Adam's step with the same scalars to the bit, and the
optimizer equals the keras.ops reference path (`fused=False`, Keras's own
arithmetic) to 1e-6 in float32 (to the bit, in practice). It must be used
where it applies and nowhere else (not under XLA, where the keras.ops path
runs); fall back to the keras.ops path when disabled or unavailable; and
reject bad input with an error, never a crash.

Until issue 15 the op was compared with TensorFlow's ResourceApplyAdam, bit
for bit. No longer: ResourceApplyAdam computes 1 - beta from the beta
rounded to float32 (1 - 0.999f is 1.3e-5 relative off Keras's 1 - 0.999),
while the op takes 1 - beta computed in double and rounded once, as Keras
does.
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

# Size 0, scalar, odd sizes and sizes that are not multiples of any block.
SHAPES = [(3, 4), (), (0,), (1001,), (17, 33), (1,), (0, 5), (3, 4, 5), (65537,), (7, 1, 13)]
REFERENCE_TOLERANCE = {"float32": 1e-6, "float64": 1e-12}
OPTIONS = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.05},
    "weight_decay+exclusion": {"weight_decay": 0.05, "exclude_from_weight_decay": ["w1$"]},
    "l2": {"weight_decay": 0.05, "decoupled_weight_decay": False},
    "maximize": {"maximize": True},
}


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch):
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)


def make_variables(dtype, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [
        keras.Variable(rng.normal(size=shape), dtype=dtype, name=f"w{i}")
        for i, shape in enumerate(shapes)
    ]


def gradients(dtype, step, shapes=SHAPES):
    rng = np.random.default_rng(1000 + step)
    return [tf.constant(rng.normal(size=shape), dtype=dtype) for shape in shapes]


def run(optimizer, dtype, mode, steps=25, shapes=SHAPES):
    """Weights after `steps` steps, and the step function."""
    variables = make_variables(dtype, shapes)
    optimizer.build(variables)

    def step(grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    for i in range(steps):
        step(gradients(dtype, i, shapes))
    weights = np.concatenate([np.ravel(v.numpy()) for v in variables])
    state = np.concatenate([np.ravel(v.numpy()) for v in optimizer.variables[1:]])
    return weights, state, step


def relative_deviation(actual, expected):
    scale = max(np.max(np.abs(expected)), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)


def op_types(step, dtype, shapes=SHAPES):
    graph = step.get_concrete_function(gradients(dtype, 0, shapes)).graph
    types = [op.type for op in graph.get_operations()]
    for function in graph._functions.values():
        types.extend(node.op for node in function.definition.node_def)
    return types


def without_kernel(monkeypatch, function, *args):
    with monkeypatch.context() as patch:
        patch.setenv(kernels.ENV_SWITCH, "0")
        return function(*args)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_matches_the_reference_path(option, mode, dtype, monkeypatch):
    kwargs = OPTIONS[option]
    ours, our_state, step = run(keras_adam.Adam(learning_rate=0.01, **kwargs), dtype, mode)
    disabled, disabled_state, _ = without_kernel(
        monkeypatch, run, keras_adam.Adam(learning_rate=0.01, **kwargs), dtype, mode
    )
    reference, reference_state, _ = run(
        keras_adam.Adam(learning_rate=0.01, fused=False, **kwargs), dtype, mode
    )
    if mode == "function":
        assert kernels.OP_NAME in op_types(step, dtype)
    initial = np.concatenate([np.ravel(v.numpy()) for v in make_variables(dtype)])
    assert relative_deviation(reference, initial) > 1e-2
    tolerance = REFERENCE_TOLERANCE[dtype]
    assert relative_deviation(ours, reference) <= tolerance
    assert relative_deviation(our_state, reference_state) <= tolerance
    # Without the kernel, the keras.ops path runs: the reference itself.
    np.testing.assert_array_equal(disabled, reference)
    np.testing.assert_array_equal(disabled_state, reference_state)


def test_one_op_per_dtype_replaces_resource_apply_adam():
    optimizer = keras_adam.Adam()
    _, _, step = run(optimizer, "float32", "function", steps=1)
    types = op_types(step, "float32")
    assert types.count(kernels.OP_NAME) == 1
    assert "ResourceApplyAdam" not in types


def test_mixed_dtypes_take_one_op_each():
    variables = [
        keras.Variable(np.ones((3, 2)), dtype="float32"),
        keras.Variable(np.ones(5), dtype="float64"),
        keras.Variable(np.ones(4), dtype="float32"),
        keras.Variable(np.ones(2), dtype="bfloat16"),  # keras.ops path
    ]
    optimizer = keras_adam.Adam(learning_rate=0.1)
    optimizer.build(variables)

    @tf.function
    def step():
        grads = [tf.ones_like(v.value) for v in variables]
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    step()
    types = op_types_no_args(step)
    assert types.count(kernels.OP_NAME) == 2
    for variable in variables:
        np.testing.assert_allclose(variable.numpy().astype("float64"), 0.9, rtol=1e-2)


def op_types_no_args(step):
    graph = step.get_concrete_function().graph
    return [op.type for op in graph.get_operations()]


@pytest.mark.parametrize("kwargs", [{"fused": False}, {"amsgrad": True}, {"epsilon_mode": "paper"}])
def test_not_used_where_the_fused_path_is_not(kwargs):
    _, _, step = run(keras_adam.Adam(**kwargs), "float32", "function", steps=1)
    assert kernels.OP_NAME not in op_types(step, "float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_not_used_under_xla_and_results_match(dtype):
    # Under XLA the keras.ops path runs (ResourceApplyAdam, which has an XLA
    # kernel, computes 1 - beta from the rounded beta): Keras's numbers.
    xla, _, step = run(keras_adam.Adam(learning_rate=0.01), dtype, "xla", steps=20)
    types = op_types(step, dtype)
    assert kernels.OP_NAME not in types
    assert "ResourceApplyAdam" not in types
    keras_xla, _, _ = run(keras.optimizers.Adam(learning_rate=0.01), dtype, "xla", steps=20)
    if dtype == "float32":  # float64: Keras rounds its beta powers through float32
        np.testing.assert_array_equal(xla, keras_xla)
    ours, _, _ = run(keras_adam.Adam(learning_rate=0.01), dtype, "function", steps=20)
    assert relative_deviation(xla, ours) <= REFERENCE_TOLERANCE[dtype]


def test_disabled_by_environment_variable(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.load() is None
    _, _, step = run(keras_adam.Adam(), "float32", "function", steps=1)
    types = op_types(step, "float32")
    assert kernels.OP_NAME not in types
    assert "ResourceApplyAdam" not in types  # the keras.ops path


def test_falls_back_when_the_kernel_cannot_be_built(monkeypatch, tmp_path, caplog):
    def no_compiler():
        raise RuntimeError("no C++ compiler found (set CXX)")

    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels.builder, "_compiler", no_compiler)
    kernels.reset()
    try:
        assert kernels.load() is None
        assert "no C++ compiler" in caplog.text
        weights, _, step = run(keras_adam.Adam(learning_rate=0.01), "float32", "function")
        assert kernels.OP_NAME not in op_types(step, "float32")
        reference, _, _ = run(keras_adam.Adam(learning_rate=0.01, fused=False), "float32", "eager")
        assert relative_deviation(weights, reference) <= REFERENCE_TOLERANCE["float32"]
    finally:
        kernels.reset()  # the next load() (unpatched) builds or finds the library


def numpy_scalars(dtype, step=1, lr=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """The op's scalars, computed as Keras computes them, as NumPy scalars of `dtype`."""
    real = np.dtype(dtype).type
    one = real(1)
    beta_1_power, beta_2_power = real(beta_1) ** real(step), real(beta_2) ** real(step)
    return dict(
        alpha=real(lr) * np.sqrt(one - beta_2_power) / (one - beta_1_power),
        one_minus_beta1=real(1 - beta_1),  # in double, rounded once (not 1 - real(beta_1))
        one_minus_beta2=real(1 - beta_2),
        epsilon=real(epsilon),
    )


def scalars(dtype, step=1):
    return {name: tf.constant(value) for name, value in numpy_scalars(dtype, step).items()}


def numpy_adam(var, m, v, g, alpha, one_minus_beta1, one_minus_beta2, epsilon):
    """keras.optimizers.Adam's elementwise step, in the arrays' dtype; new (var, m, v)."""
    m = m + (g - m) * one_minus_beta1
    v = v + (g * g - v) * one_minus_beta2
    return var - (m * alpha) / (np.sqrt(v) + epsilon), m, v


def apply(var, m, v, grad, dtype="float32", **overrides):
    kernels.load().keras_adam_multi_tensor_apply_adam(
        var=[x.handle for x in var],
        m=[x.handle for x in m],
        v=[x.handle for x in v],
        grad=grad,
        **{**scalars(dtype), **overrides},
    )


def slots(shape, dtype="float32"):
    return [tf.Variable(tf.ones(shape, dtype)) for _ in range(3)]


@pytest.mark.parametrize("eager", [True, False])
def test_bad_input_raises_instead_of_crashing(eager):
    var, m, v = slots((3, 4))
    other = tf.Variable(tf.ones((5,)))
    wide = tf.Variable(tf.ones((3, 4), "float64"))
    cases = [
        (([var], [m], [v], [tf.ones((5,))]), {}, "shape"),
        (([var], [m], [other], [tf.ones((3, 4))]), {}, "shape"),
        (([var], [var], [v], [tf.ones((3, 4))]), {}, "more than once"),
        (([var], [m], [wide], [tf.ones((3, 4))]), {}, "dtype"),
        (([var], [m], [v], [tf.ones((3, 4))]), {"alpha": tf.constant([0.1, 0.2])}, "scalar|rank 0"),
    ]
    for args, overrides, message in cases:
        call = apply if eager else tf.function(apply)
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
            call(*args, **overrides)
    np.testing.assert_array_equal(var.numpy(), 1.0)  # nothing was written
    np.testing.assert_array_equal(m.numpy(), 1.0)


def test_copy_on_write_keeps_a_pending_read_intact():
    var, m, v = slots((1000,))
    grad = np.linspace(-1, 1, 1000).astype("float32")
    held = tf.raw_ops.ReadVariableOp(resource=var.handle, dtype=tf.float32)  # shares the buffer
    apply([var], [m], [v], [tf.constant(grad)])
    np.testing.assert_array_equal(held.numpy(), 1.0)
    ones = np.ones(1000, "float32")
    expected = numpy_adam(ones, ones, ones, grad, **numpy_scalars("float32"))
    for ours, theirs in zip((var, m, v), expected, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_op_equals_numpy_transcription_of_keras_to_the_bit(dtype):
    rng = np.random.default_rng(4)
    shapes = [(3, 4), (), (0,), (1001,), (17, 33)]
    state = [[np.abs(rng.normal(size=s)).astype(dtype) for s in shapes] for _ in range(3)]
    ours = [[tf.Variable(x) for x in row] for row in state]
    for t in range(1, 6):
        grads = [rng.normal(size=s).astype(dtype) for s in shapes]
        apply(*ours, [tf.constant(g) for g in grads], dtype=dtype, **scalars(dtype, t))
        for i, g in enumerate(grads):
            new = numpy_adam(state[0][i], state[1][i], state[2][i], g, **numpy_scalars(dtype, t))
            for r in range(3):
                state[r][i] = new[r]
    for our_row, expected_row in zip(ours, state, strict=True):
        for a, b in zip(our_row, expected_row, strict=True):
            np.testing.assert_array_equal(a.numpy(), b)


# The pytest process uses one intra-op thread (conftest): check the split of
# all tensors' elements over a real thread pool in a fresh process, against
# NumPy with the same scalars (Keras's arithmetic), to the bit.
THREADED = textwrap.dedent(
    """
    import json
    import numpy as np, tensorflow as tf
    from keras_adam import kernels
    tf.config.threading.set_intra_op_parallelism_threads(4)
    module = kernels.load()
    rng = np.random.default_rng(0)
    shapes = [(300001,), (), (0,), (1001,), (257, 513), (5,)] * 3
    mismatched = {}
    for dtype in ("float32", "float64"):
        if module is None:
            break
        real = np.dtype(dtype).type
        theirs = [[np.abs(rng.normal(size=s)).astype(dtype) for s in shapes] for _ in range(3)]
        ours = [[tf.Variable(x) for x in row] for row in theirs]
        for t in range(1, 6):
            grads = [rng.normal(size=s).astype(dtype) for s in shapes]
            b1p, b2p = real(0.9) ** real(t), real(0.999) ** real(t)
            alpha = real(0.01) * np.sqrt(real(1) - b2p) / (real(1) - b1p)
            c1, c2, eps = real(1 - 0.9), real(1 - 0.999), real(1e-7)
            module.keras_adam_multi_tensor_apply_adam(
                var=[x.handle for x in ours[0]], m=[x.handle for x in ours[1]],
                v=[x.handle for x in ours[2]], grad=[tf.constant(g) for g in grads],
                alpha=tf.constant(alpha), one_minus_beta1=tf.constant(c1),
                one_minus_beta2=tf.constant(c2), epsilon=tf.constant(eps))
            for i, g in enumerate(grads):
                var, m, v = (theirs[r][i] for r in range(3))
                m = m + (g - m) * c1
                v = v + (g * g - v) * c2
                theirs[0][i], theirs[1][i], theirs[2][i] = (
                    var - (m * alpha) / (np.sqrt(v) + eps), m, v)
        # Elements that differ from NumPy's, per state (var, m, v), over all tensors.
        mismatched[dtype] = [
            sum(int(np.count_nonzero(a.numpy() != b)) for a, b in zip(a_row, b_row))
            for a_row, b_row in zip(ours, theirs)
        ]
    print(json.dumps(dict(kernel_built=module is not None, mismatched=mismatched)))
    """
)


def test_threaded_split_matches_numpy():
    # Four intra-op threads must be set before TensorFlow starts.
    measured = run_python(THREADED)
    assert measured["kernel_built"]
    assert measured["mismatched"] == {"float32": [0, 0, 0], "float64": [0, 0, 0]}


DISABLED = textwrap.dedent(
    """
    import json
    import tensorflow as tf, keras, keras_adam
    from keras_adam import kernels
    v = keras.Variable([1.0, 2.0])
    opt = keras_adam.Adam()
    step = tf.function(lambda: opt.apply_gradients([(tf.ones(2), v)]))
    step()
    graph = step.get_concrete_function().graph
    ops = [op.type for op in graph.get_operations()]
    for function in graph._functions.values():
        ops += [node.op for node in function.definition.node_def]
    print(json.dumps(dict(kernel_built=kernels.load() is not None, ops=ops, v=v.numpy().tolist())))
    """
)


def test_environment_variable_disables_in_a_fresh_process():
    # The switch is read from the environment of a fresh process. Nothing is
    # built: the cache directory cannot even be created.
    measured = run_python(
        DISABLED, env={kernels.ENV_SWITCH: "0", "KERAS_ADAM_CACHE_DIR": "/nonexistent/cache"}
    )
    assert not measured["kernel_built"]
    assert kernels.OP_NAME not in measured["ops"]
    assert measured["v"][0] < 1.0 and measured["v"][1] < 2.0  # the keras.ops path stepped
