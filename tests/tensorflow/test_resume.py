"""Interrupted training resumes exactly: from a `.keras` file (see tests/any/test_serialization.py),
from `tf.train.Checkpoint` with `CheckpointManager`, and with
`keras.callbacks.BackupAndRestore` after the process is killed mid-epoch.

Each resumed run ends with the same weights and optimizer variables as
uninterrupted training, bit for bit. Data is not shuffled (`shuffle=False`):
Keras draws each epoch's shuffle from the process's random state, which a
restarted process does not continue.
"""

import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam

EPOCHS = 4


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype("float32")
    return x, (x @ rng.normal(size=(6, 3))).argmax(axis=1)


def model(**optimizer_options):
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )
    m.compile(
        optimizer=keras_adam.Adam(learning_rate=0.01, **optimizer_options),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return m


def fit(m, initial_epoch=0, epochs=EPOCHS, **kwargs):
    x, y = data()
    m.fit(x, y, batch_size=16, epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
          verbose=0, **kwargs)  # fmt: skip
    return m


def state(m):
    return [v.numpy() for v in m.weights] + [v.numpy() for v in m.optimizer.variables]


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("build_first", [True, False])
@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "fused": False}])
def test_checkpoint_manager_resumes_exactly(tmp_path, build_first, options):
    reference = state(fit(model(**options)))

    first = fit(model(**options), epochs=2)
    checkpoint = tf.train.Checkpoint(model=first, optimizer=first.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2)
    manager.save()

    second = model(**options)
    if build_first:
        second.optimizer.build(second.trainable_variables)
    restored = tf.train.Checkpoint(model=second, optimizer=second.optimizer)
    status = restored.restore(manager.latest_checkpoint)
    if build_first:
        status.assert_existing_objects_matched()
    fit(second, initial_epoch=2)
    status.assert_consumed()
    assert_identical(state(second), reference)


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import keras, numpy as np
    from test_resume import data, fit, model, state

    backup, output, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]

    class KillMidEpoch(keras.callbacks.Callback):
        # SIGKILL: no cleanup, no flush, as when a machine is preempted.
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if kill_at != "none" and (self.epoch, batch) == tuple(map(int, kill_at.split(","))):
                os.kill(os.getpid(), signal.SIGKILL)

    m = model()
    fit(m, callbacks=[keras.callbacks.BackupAndRestore(backup), KillMidEpoch()])
    np.savez(output, *state(m))
    """
)


def run_script(path, backup, output, kill_at):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(path), str(backup), str(output), kill_at],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.slow
def test_backup_and_restore_resumes_exactly_after_the_process_is_killed(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))

    uninterrupted = run_script(script, tmp_path / "backup_a", tmp_path / "a.npz", "none")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    killed = run_script(script, tmp_path / "backup_b", tmp_path / "b.npz", "2,4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "b.npz").exists()
    assert (tmp_path / "backup_b").is_dir()  # the end of epoch 2 was backed up

    resumed = run_script(script, tmp_path / "backup_b", tmp_path / "b.npz", "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
