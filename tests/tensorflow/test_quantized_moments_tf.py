"""Quantized moments on TensorFlow: tf.train.Checkpoint and MirroredStrategy."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam
from keras_adam import kernels
from tests.helpers.numpy_quantization import (
    assert_same_but_for_flipped_codes,
    assert_same_state_but_for_flipped_codes,
    stored_state,
)
from tests.tensorflow.test_distribute import run


def test_tf_train_checkpoint_round_trips_quantized_state(tmp_path):
    kernel = keras.Variable(np.linspace(-1, 1, 80 * 64, dtype=np.float32).reshape(80, 64))
    optimizer = keras_adam.Adam(moment_dtype="int4", amsgrad=True)
    for t in range(3):
        optimizer.apply([tf.sin(kernel.value * (t + 1))], [kernel])
    path = tf.train.Checkpoint(optimizer=optimizer).write(str(tmp_path / "ckpt"))
    other = keras_adam.Adam(moment_dtype="int4", amsgrad=True)
    other.build([keras.Variable(np.zeros((80, 64), np.float32))])
    tf.train.Checkpoint(optimizer=other).read(path).assert_consumed()
    assert len(other.variables) == len(optimizer.variables) == 2 + 3  # one per moment
    for a, b in zip(optimizer.variables, other.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


MIRRORED = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import keras_adam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 64)).astype("float32")
    y = rng.integers(0, 10, size=128).astype("int32")

    def train(strategy, moment_dtype):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(96, activation="relu"),
                                      keras.layers.Dense(10)])
            model.compile(optimizer=keras_adam.Adam(0.01, moment_dtype=moment_dtype),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        return model, history.history["loss"]

    results = {}
    for moment_dtype in ("int8", "int4"):
        single, single_loss = train(tf.distribute.get_strategy(), moment_dtype)
        mirrored, mirrored_loss = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                                        moment_dtype)
        codes = mirrored.optimizer._momentums[0].variable
        pairs = zip(single.get_weights(), mirrored.get_weights())
        differences = np.concatenate([np.abs(a - b).ravel() for a, b in pairs])
        results[moment_dtype] = {
            "difference": float(differences.max()),
            "flipped": float(np.mean(differences > 1e-5)),
            "losses": [single_loss, mirrored_loss],
            "mirrored_codes": isinstance(codes.value, tf.distribute.DistributedValues),
            "steps": int(mirrored.optimizer.iterations.numpy()),
        }
    print(json.dumps(results))
    """
)


def test_mirrored_strategy_matches_single_device_training(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    results = json.loads(run([sys.executable, str(script)], 600).strip().splitlines()[-1])
    for name, result in results.items():
        # Sums over two replicas round differently from one batch, so a value
        # at a midpoint between two codes may take the other: a few weights
        # then move by a fraction of η = 0.01 more or less.
        assert result["flipped"] < 0.01 and result["difference"] < 0.01, (name, result)
        np.testing.assert_allclose(*result["losses"], rtol=1e-4)
        assert result["mirrored_codes"] and result["steps"] == 12, (name, result)


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
@pytest.mark.parametrize(
    "options",
    [{}, {"amsgrad": True, "weight_decay": 0.1}, {"epsilon_mode": "paper", "maximize": True}],
    ids=["plain", "amsgrad_adamw", "paper_maximize"],
)
def test_the_op_gives_the_keras_ops_step(moment_dtype, options):
    """tf.function: our op against fused=False (keras.ops), from the same start."""
    rng = np.random.default_rng(1)
    values = [rng.normal(size=shape).astype("float32") for shape in [(97, 61), (33, 129), (40,)]]

    def run(**fused):
        variables = [keras.Variable(v) for v in values]
        optimizer = keras_adam.Adam(0.01, moment_dtype=moment_dtype, **options, **fused)
        step = tf.function(lambda grads: optimizer.apply(grads, variables))
        for t in range(5):
            grads = [tf.constant(np.sin(v * (t + 1)) * 10.0 ** (t - 3), tf.float32) for v in values]
            step(grads)
        graph = step.get_concrete_function(grads).graph
        ops_used = {op.type for op in graph.get_operations()}
        state = stored_state(optimizer)
        return [v.numpy() for v in variables], state, ops_used

    weights, state, ops_used = run()
    assert kernels.QUANTIZED_MULTI_TENSOR_OP_NAME in ops_used  # both large variables, in place
    assert kernels.QUANTIZED_OP_NAME not in ops_used
    reference_weights, reference_state, reference_ops = run(fused=False)
    assert kernels.QUANTIZED_MULTI_TENSOR_OP_NAME not in reference_ops
    assert_same_but_for_flipped_codes(weights, reference_weights, 1e-4)
    assert_same_state_but_for_flipped_codes(state, reference_state)


def test_the_op_of_many_variables_leaves_values_read_before_it_unchanged():
    # In one tf.function, a read of the variable and of its codes before the
    # step shares their buffers with them: the op must update copies.
    rng = np.random.default_rng(0)
    kernel = keras.Variable(rng.normal(size=(80, 64)).astype(np.float32))
    optimizer = keras_adam.Adam(0.01, moment_dtype="int8")
    optimizer.build([kernel])
    codes = optimizer._momentums[0].variable
    gradient = tf.constant(rng.normal(size=(80, 64)), tf.float32)
    optimizer.apply([gradient], [kernel])
    first_value, first_codes = kernel.numpy(), codes.numpy()

    @tf.function
    def step(g):
        before = (tf.identity(kernel.value), tf.identity(codes.value))
        optimizer.apply([g], [kernel])
        return before

    before_value, before_codes = step(tf.constant(rng.normal(size=(80, 64)), tf.float32))
    np.testing.assert_array_equal(before_value.numpy(), first_value)
    np.testing.assert_array_equal(before_codes.numpy(), first_codes)
    assert np.abs(kernel.numpy() - first_value).max() > 1e-3  # and the step happened
    assert np.mean(codes.numpy() != first_codes) > 0.5


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ("m", "resource 1 of variable 0"),  # float32 where the uint8 moment belongs
        ("v_lut", "has 0 values; int8 takes 6"),  # not int8's float map parameters
    ],
)
def test_the_op_of_many_variables_refuses_wrong_inputs(wrong, message):
    kernel = keras.Variable(np.ones((80, 64), np.float32))
    optimizer = keras_adam.Adam(moment_dtype="int8")
    optimizer.build([kernel])
    m, v = optimizer._momentums[0], optimizer._velocities[0]
    lookups = {"m": m.fmt.lookup, "v": v.fmt.lookup}
    before = [np.asarray(x.numpy()) for x in optimizer.variables]
    inputs = {
        "m": [m.variable.value.handle],
        "v_lut": lookups["v"]["lut"],
    }
    if wrong == "m":
        inputs["m"] = [tf.Variable(tf.zeros(m.variable.shape, tf.float32)).handle]
    else:
        inputs["v_lut"] = np.zeros((0,), np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        kernels.load().keras_adam_multi_tensor_quantized_adam(
            var=[kernel.value.handle],
            v=[v.variable.value.handle],
            v_hat=[],
            grad=[tf.ones((80, 64))],
            m_table=lookups["m"]["table"],
            m_mid=lookups["m"]["magnitude_mid"],
            m_lut=lookups["m"]["lut"],
            v_table=lookups["v"]["table"],
            v_mid=lookups["v"]["magnitude_mid"],
            scalars=tf.ones(7),
            bits=8,
            block=256,
            m_zero=lookups["m"]["zero"],
            lut_shift=lookups["m"]["lut_shift"],
            m_lut_base=lookups["m"]["lut_base"],
            v_lut_base=lookups["v"]["lut_base"],
            maximize=False,
            l2=False,
            decoupled=False,
            amsgrad=False,
            paper=False,
            **inputs,
        )
    for a, b in zip(before, optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_array_equal(kernel.numpy(), 1.0)


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
@pytest.mark.parametrize(
    "options",
    [{}, {"amsgrad": True, "weight_decay": 0.1}, {"epsilon_mode": "paper", "maximize": True}],
    ids=["plain", "amsgrad_adamw", "paper_maximize"],
)
def test_under_xla_the_custom_call_gives_the_ops_numbers(moment_dtype, options):
    """jit_compile=True: the XLA custom calls against our op, bit for bit; 40 variables, 2 calls."""
    rng = np.random.default_rng(3)
    shapes = [(97, 61), (33, 129)] + [(64, 64)] * 38
    values = [rng.normal(size=shape).astype("float32") for shape in shapes]
    grads = [
        [rng.normal(size=shape).astype("float32") * 10.0 ** (t - 3) for shape in shapes]
        for t in range(4)
    ]

    def run(jit_compile):
        variables = [keras.Variable(v) for v in values]
        optimizer = keras_adam.Adam(0.01, moment_dtype=moment_dtype, **options)
        step = tf.function(lambda g: optimizer.apply(g, variables), jit_compile=jit_compile)
        for step_grads in grads:
            step([tf.constant(g) for g in step_grads])
        graph = step.get_concrete_function([tf.constant(g) for g in grads[0]]).graph
        ops_used = [op.type for op in graph.get_operations()]
        state = [np.asarray(v.numpy()) for v in optimizer.variables]
        return [v.numpy() for v in variables], state, ops_used

    weights, state, ops_used = run(jit_compile=True)
    assert ops_used.count("XlaCustomCallV2") == 2
    assert kernels.QUANTIZED_MULTI_TENSOR_OP_NAME not in ops_used
    reference_weights, reference_state, reference_ops = run(jit_compile=False)
    assert kernels.QUANTIZED_MULTI_TENSOR_OP_NAME in reference_ops
    for ours, theirs in zip(weights + state, reference_weights + reference_state, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_under_xla_without_the_custom_call_the_keras_ops_step_runs(monkeypatch):
    from keras_adam.kernels import quantized_tf_xla

    monkeypatch.setattr(quantized_tf_xla, "available", lambda: False)
    kernel = keras.Variable(np.ones((80, 64), np.float32))
    optimizer = keras_adam.Adam(moment_dtype="int8")
    step = tf.function(lambda g: optimizer.apply([g], [kernel]), jit_compile=True)
    gradient = tf.fill((80, 64), 0.5)
    step(gradient)
    graph = step.get_concrete_function(gradient).graph
    ops_used = {op.type for op in graph.get_operations()}
    assert kernels.QUANTIZED_OP_NAME not in ops_used and "XlaCustomCallV2" not in ops_used
    np.testing.assert_allclose(kernel.numpy(), 1 - 1e-3, rtol=1e-6)


def test_the_xla_target_registers_once_though_its_library_loads_from_two_paths(tmp_path):
    # XLA aborts the process on a second registration of a name at another
    # address; tests and the build command load the library from several
    # caches in one process.
    from keras_adam.kernels import quantized_tf_xla

    built = quantized_tf_xla.build()
    copy = tmp_path / built.name
    copy.write_bytes(built.read_bytes())
    script = textwrap.dedent(
        f"""
        import ctypes
        import tensorflow as tf
        first = ctypes.CDLL({str(built)!r}).keras_adam_quantized_tf_xla_register()
        second = ctypes.CDLL({str(copy)!r}).keras_adam_quantized_tf_xla_register()
        print(first, second)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "0"]
