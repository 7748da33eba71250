"""The multi-tensor Adam kernel (keras_adam/kernels): one op per dtype and step.

It must equal the per-variable ResourceApplyAdam path (to the last bit, in
practice) and the keras.ops reference path to round-off; be used where it
applies and nowhere else (not under XLA); fall back when disabled or
unavailable; and reject bad input with an error, never a crash.
"""

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam
from keras_adam import kernels
from tests.support import needs_compiler, run_python

# With a compiler, the kernel must build: a failure is a test failure.
pytestmark = needs_compiler

# Size 0, scalar, odd sizes and sizes that are not multiples of any block.
SHAPES = [(3, 4), (), (0,), (1001,), (17, 33), (1,), (0, 5), (3, 4, 5), (65537,), (7, 1, 13)]
TOLERANCE = {"float32": 1e-6, "float64": 1e-12}
REFERENCE_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
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
def test_matches_resource_apply_adam_and_reference(option, mode, dtype, monkeypatch):
    kwargs = OPTIONS[option]
    ours, our_state, _ = run(keras_adam.Adam(learning_rate=0.01, **kwargs), dtype, mode)
    fused, fused_state, step = without_kernel(
        monkeypatch, run, keras_adam.Adam(learning_rate=0.01, **kwargs), dtype, mode
    )
    reference, reference_state, _ = run(
        keras_adam.Adam(learning_rate=0.01, fused=False, **kwargs), dtype, mode
    )
    initial = np.concatenate([np.ravel(v.numpy()) for v in make_variables(dtype)])
    assert relative_deviation(reference, initial) > 1e-2
    assert relative_deviation(ours, fused) <= TOLERANCE[dtype]
    assert relative_deviation(our_state, fused_state) <= TOLERANCE[dtype] * 10
    assert relative_deviation(ours, reference) <= REFERENCE_TOLERANCE[dtype]
    assert relative_deviation(our_state, reference_state) <= REFERENCE_TOLERANCE[dtype] * 10


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
def test_not_used_under_xla_and_results_match(dtype, monkeypatch):
    xla, _, step = run(keras_adam.Adam(learning_rate=0.01), dtype, "xla", steps=20)
    types = op_types(step, dtype)
    assert kernels.OP_NAME not in types
    assert "ResourceApplyAdam" in types
    ours, _, _ = run(keras_adam.Adam(learning_rate=0.01), dtype, "function", steps=20)
    assert relative_deviation(xla, ours) <= REFERENCE_TOLERANCE[dtype]


def test_disabled_by_environment_variable(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.load() is None
    _, _, step = run(keras_adam.Adam(), "float32", "function", steps=1)
    types = op_types(step, "float32")
    assert kernels.OP_NAME not in types
    assert types.count("ResourceApplyAdam") == len(SHAPES)


def test_falls_back_when_the_kernel_cannot_be_built(monkeypatch, tmp_path, caplog):
    def no_compiler():
        raise RuntimeError("no C++ compiler found (set CXX)")

    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", no_compiler)
    kernels.reset()
    try:
        assert kernels.load() is None
        assert "no C++ compiler" in caplog.text
        weights, _, step = run(keras_adam.Adam(learning_rate=0.01), "float32", "function")
        assert "ResourceApplyAdam" in op_types(step, "float32")
        reference, _, _ = run(keras_adam.Adam(learning_rate=0.01, fused=False), "float32", "eager")
        assert relative_deviation(weights, reference) <= REFERENCE_TOLERANCE["float32"]
    finally:
        kernels.reset()  # the next load() (unpatched) builds or finds the library


def scalars(dtype, step=1):
    return dict(
        beta1_power=tf.constant(0.9**step, dtype),
        beta2_power=tf.constant(0.999**step, dtype),
        lr=tf.constant(0.01, dtype),
        beta1=tf.constant(0.9, dtype),
        beta2=tf.constant(0.999, dtype),
        epsilon=tf.constant(1e-7, dtype),
    )


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
        (([var], [m], [v], [tf.ones((3, 4))]), {"lr": tf.constant([0.1, 0.2])}, "scalar|rank 0"),
    ]
    for args, overrides, message in cases:
        call = apply if eager else tf.function(apply)
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
            call(*args, **overrides)
    np.testing.assert_array_equal(var.numpy(), 1.0)  # nothing was written
    np.testing.assert_array_equal(m.numpy(), 1.0)


def test_copy_on_write_keeps_a_pending_read_intact():
    var, m, v = slots((1000,))
    twin = slots((1000,))
    grad = tf.constant(np.linspace(-1, 1, 1000), "float32")
    held = tf.raw_ops.ReadVariableOp(resource=var.handle, dtype=tf.float32)  # shares the buffer
    apply([var], [m], [v], [grad])
    np.testing.assert_array_equal(held.numpy(), 1.0)
    tf.raw_ops.ResourceApplyAdam(
        var=twin[0].handle,
        m=twin[1].handle,
        v=twin[2].handle,
        grad=grad,
        use_locking=False,
        use_nesterov=False,
        **scalars("float32"),
    )
    for ours, theirs in zip((var, m, v), twin, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


# The pytest process uses one intra-op thread (conftest): check the split of
# all tensors' elements over a real thread pool in a fresh process.
THREADED = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    from keras_adam import kernels
    tf.config.threading.set_intra_op_parallelism_threads(4)
    module = kernels.load()
    assert module is not None
    rng = np.random.default_rng(0)
    shapes = [(300001,), (), (0,), (1001,), (257, 513), (5,)] * 3
    for dtype in ("float32", "float64"):
        ours = [[tf.Variable(np.abs(rng.normal(size=s)).astype(dtype)) for s in shapes]
                for _ in range(3)]
        theirs = [[tf.Variable(x.numpy()) for x in row] for row in ours]
        for t in range(1, 6):
            grads = [tf.constant(rng.normal(size=s), dtype) for s in shapes]
            scalars = dict(beta1_power=tf.constant(0.9**t, dtype),
                           beta2_power=tf.constant(0.999**t, dtype),
                           lr=tf.constant(0.01, dtype), beta1=tf.constant(0.9, dtype),
                           beta2=tf.constant(0.999, dtype), epsilon=tf.constant(1e-7, dtype))
            module.keras_adam_multi_tensor_apply_adam(
                var=[x.handle for x in ours[0]], m=[x.handle for x in ours[1]],
                v=[x.handle for x in ours[2]], grad=grads, **scalars)
            for i, g in enumerate(grads):
                tf.raw_ops.ResourceApplyAdam(
                    var=theirs[0][i].handle, m=theirs[1][i].handle, v=theirs[2][i].handle,
                    grad=g, use_locking=False, use_nesterov=False, **scalars)
        for a_row, b_row in zip(ours, theirs):
            for a, b in zip(a_row, b_row):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=0)
    print("ok")
    """
)


def test_threaded_split_matches_resource_apply_adam():
    run_python(THREADED)


def test_environment_variable_disables_in_a_fresh_process():
    script = (
        "import os, tensorflow as tf, keras, keras_adam\n"
        "from keras_adam import kernels\n"
        "assert kernels.load() is None\n"
        "v = keras.Variable([1.0, 2.0])\n"
        "opt = keras_adam.Adam()\n"
        "tf.function(lambda: opt.apply_gradients([(tf.ones(2), v)]))()\n"
        "print('ok')\n"
    )
    # Nothing is built: the cache directory cannot even be created.
    run_python(script, {kernels.ENV_SWITCH: "0", "KERAS_ADAM_CACHE_DIR": "/nonexistent/cache"})
