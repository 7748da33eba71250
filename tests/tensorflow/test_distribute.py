"""keras_adam.Adam under tf.distribute.

- MirroredStrategy on two logical CPU devices: `model.fit` inside
  `strategy.scope()` gives the weights of single-device training with the
  same global batch (to 1e-5), on the fused, reference and lazy sparse
  paths; the slot variables are mirrored, one copy on each device of its
  variable.
- `skip_nonfinite=True` under MirroredStrategy: a NaN in one replica's half
  of a batch makes every replica skip that step (the verdict is
  all-reduced), and the weights match single-device training that skips it.
- MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 with the
  custom-training-loop pattern (examples/multi_worker_training.py) match one
  process, also with a NaN in one worker's half of a batch
  (`--skip-nonfinite`).

- Without a strategy: Keras's sum over replicas is skipped, so a trained
  model's traced step is freed with it (TensorFlow's all-reduce would keep
  it in a process-wide registry).

The strategies run in subprocesses: logical devices must be set before
TensorFlow starts, and each worker is a process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MIRRORED = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import keras_adam

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30, size=(128, 3)).astype("int32")
    features = rng.normal(size=(128, 5)).astype("float32")
    labels = ((features[:, 0] > 0) + tokens[:, 0] % 2).astype("int32")

    def train(strategy, options):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            t = keras.Input((3,), dtype="int32")
            f = keras.Input((5,))
            e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(30, 4)(t))
            h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([e, f]))
            model = keras.Model([t, f], keras.layers.Dense(3)(h))
            model.compile(
                optimizer=keras_adam.Adam(learning_rate=0.01, **options),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        model.fit([tokens, features], labels, batch_size=32, epochs=3, shuffle=False, verbose=0)
        return model

    results = {}
    for name, options in [("fused", {"fused": True}), ("reference", {"fused": False}),
                          ("lazy_sparse", {"lazy_sparse": True})]:
        single = train(tf.distribute.get_strategy(), options)
        mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        mirrored = train(mirrored_strategy, options)
        difference = max(float(np.abs(a - b).max())
                         for a, b in zip(single.get_weights(), mirrored.get_weights()))
        optimizer = mirrored.optimizer
        slots = optimizer._momentums + optimizer._velocities
        placement = []
        for slot, variable in zip(optimizer._momentums, mirrored.trainable_variables):
            slot_devices = sorted(v.device for v in slot.value.values)
            variable_devices = sorted(v.device for v in variable.value.values)
            placement.append(slot_devices == variable_devices and len(slot_devices) == 2)
        results[name] = {
            "difference": difference,
            "steps": int(optimizer.iterations.numpy()),
            "mirrored_slots": all(
                isinstance(s.value, tf.distribute.DistributedValues) for s in slots),
            "colocated": all(placement),
        }
    print(json.dumps(results))
    """
)


SKIP_NONFINITE = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import keras_adam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 5)).astype("float32")
    y = rng.normal(size=(128, 1)).astype("float32")
    x[40, 2] = np.nan  # batch 1 (rows 32-63): in the second replica's half only

    def train(strategy, options):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                                      keras.layers.Dense(1)])
            model.compile(optimizer=keras_adam.Adam(0.01, skip_nonfinite=True, **options),
                          loss="mse")
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        return model

    results = {}
    for name, options in [("fused", {}), ("reference", {"fused": False})]:
        single = train(tf.distribute.get_strategy(), options)
        mirrored = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), options)
        results[name] = {
            "difference": max(float(np.abs(a - b).max())
                              for a, b in zip(single.get_weights(), mirrored.get_weights())),
            "finite": all(bool(np.isfinite(w).all()) for w in mirrored.get_weights()),
            "steps": [int(m.optimizer.iterations.numpy()) for m in (single, mirrored)],
            "skipped": [int(m.optimizer.skipped_steps.numpy()) for m in (single, mirrored)],
        }
    print(json.dumps(results))
    """
)


def run(command, timeout):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_mirrored_strategy_matches_single_device_training(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    results = json.loads(run([sys.executable, str(script)], 600).strip().splitlines()[-1])
    assert set(results) == {"fused", "reference", "lazy_sparse"}
    for name, result in results.items():
        assert result["difference"] <= 1e-5, (name, result)
        assert result["steps"] == 3 * 4, (name, result)  # 128 samples / 32 per step, 3 epochs
        assert result["mirrored_slots"] and result["colocated"], (name, result)


def test_mirrored_strategy_skips_a_step_that_is_nonfinite_on_one_replica(tmp_path):
    script = tmp_path / "skip_nonfinite.py"
    script.write_text(SKIP_NONFINITE)
    results = json.loads(run([sys.executable, str(script)], 600).strip().splitlines()[-1])
    assert set(results) == {"fused", "reference"}
    for name, result in results.items():
        assert result["difference"] <= 1e-5 and result["finite"], (name, result)
        assert result["steps"] == [2 * 3, 2 * 3], (name, result)  # 4 batches, 1 skipped, 2 epochs
        assert result["skipped"] == [2, 2], (name, result)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags", [[], ["--lazy-sparse", "--no-fused"], ["--skip-nonfinite"]], ids=str
)
def test_multi_worker_custom_loop_matches_one_process(flags):
    out = run([sys.executable, str(ROOT / "examples" / "multi_worker_training.py"), "--small",
               *flags], 600)  # fmt: skip
    steps = 9 if "--skip-nonfinite" in flags else 10
    assert f"2 workers vs 1 process, {steps} vs {steps} Adam steps" in out
    if "--skip-nonfinite" in flags:
        assert "skipped steps: workers [1, 1], 1 process 1" in out
    assert out.strip().endswith("match")


def test_without_a_strategy_a_trained_models_graphs_are_freed():
    """Models fitted one after another leave no traced `FuncGraph` behind.

    On TensorFlow 2.21 `keras.optimizers.Adam` leaves one graph and its
    conditionals (about 7 000 Python objects) per trained model: its step
    all-reduces the gradients through a custom gradient, which TensorFlow
    registers for the life of the process.
    """
    import gc

    import keras
    import numpy as np
    from tensorflow.python.framework.func_graph import FuncGraph

    import keras_adam

    def graphs() -> int:
        gc.collect()
        return sum(isinstance(o, FuncGraph) for o in gc.get_objects())

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    def fit_one() -> None:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(
            optimizer=keras_adam.Adam(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    fit_one()  # anything created once per process
    before = graphs()
    for _ in range(3):
        fit_one()
    assert graphs() == before
