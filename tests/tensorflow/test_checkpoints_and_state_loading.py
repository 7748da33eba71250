"""Optimizer state moves between keras_adam.Adam and keras.optimizers.Adam,
and state that does not fit is refused loudly, leaving the optimizer intact."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam
from tests.helpers.tf_support import BINARY, make_problem, make_step

CLASSES = {"keras_adam": keras_adam.Adam, "keras": keras.optimizers.Adam}


def train(optimizer, variables, loss_fn, start, stop):
    step = make_step(optimizer, variables, loss_fn, "function")
    for i in range(start, stop):
        step(tf.constant(i, dtype="int64"))


def values(variables):
    return [np.array(v.numpy()) for v in variables]


def moved_problem(source_variables):
    """A fresh copy of the problem, with the weights of `source_variables`."""
    variables, loss_fn = make_problem("float32")
    for target, source in zip(variables, source_variables, strict=True):
        target.assign(source.numpy())
    return variables, loss_fn


TRANSFERS = [("keras", "keras_adam"), ("keras_adam", "keras")]


def assert_resumes_identically(source, target, variables, loss_fn, copy_variables, copy_loss):
    """Both optimizers, continuing from the same state, stay bit-identical."""
    train(source, variables, loss_fn, 10, 20)
    train(target, copy_variables, copy_loss, 10, 20)
    for a, b in zip(values(variables), values(copy_variables), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(values(source.variables), values(target.variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("source_name", "target_name"), TRANSFERS)
def test_state_transfers_through_own_variables(source_name, target_name, amsgrad):
    source = CLASSES[source_name](amsgrad=amsgrad, **BINARY)
    variables, loss_fn = make_problem("float32")
    train(source, variables, loss_fn, 0, 10)
    store = {}
    source.save_own_variables(store)

    copy_variables, copy_loss = moved_problem(variables)
    target = CLASSES[target_name](amsgrad=amsgrad, **BINARY)
    target.build(copy_variables)
    target.load_own_variables(store)
    assert int(target.iterations.numpy()) == 10
    assert_resumes_identically(source, target, variables, loss_fn, copy_variables, copy_loss)


@pytest.mark.parametrize(("source_name", "target_name"), TRANSFERS)
def test_state_transfers_through_tf_train_checkpoint(tmp_path, source_name, target_name):
    source = CLASSES[source_name](**BINARY)
    variables, loss_fn = make_problem("float32")
    train(source, variables, loss_fn, 0, 10)
    path = tf.train.Checkpoint(optimizer=source).write(str(tmp_path / "ckpt"))

    copy_variables, copy_loss = moved_problem(variables)
    target = CLASSES[target_name](**BINARY)
    target.build(copy_variables)
    tf.train.Checkpoint(optimizer=target).read(path).assert_consumed()
    assert int(target.iterations.numpy()) == 10
    assert_resumes_identically(source, target, variables, loss_fn, copy_variables, copy_loss)


def test_slot_variables_match_keras_names_and_order():
    ours, theirs = keras_adam.Adam(amsgrad=True), keras.optimizers.Adam(amsgrad=True)
    for optimizer in (ours, theirs):
        optimizer.build(make_problem("float32")[0])
    our_names = [v.name for v in ours.variables]
    assert our_names == [v.name for v in theirs.variables]
    assert our_names == [
        "iteration",
        "learning_rate",
        "kernel_momentum",
        "kernel_velocity",
        "bias_momentum",
        "bias_velocity",
        "kernel_velocity_hat",
        "bias_velocity_hat",
    ]


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )
    return model


def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 3, size=64)


def fit(model, epochs=1):
    x, y = data()
    model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0)


@pytest.mark.parametrize(("source_name", "target_name"), TRANSFERS)
def test_state_transfers_through_keras_files(tmp_path, source_name, target_name):
    """A .keras file written with one optimizer loads into a model compiled
    with the other (`model.load_weights`), and training continues identically."""
    model = small_model()
    model.compile(optimizer=CLASSES[source_name](**BINARY), loss=LOSS)
    fit(model)
    path = tmp_path / "model.keras"
    model.save(path)

    target = small_model(seed=1)
    target.compile(optimizer=CLASSES[target_name](**BINARY), loss=LOSS)
    target.optimizer.build(target.trainable_variables)
    target.load_weights(path)
    assert_same_training_state(model, target)


def assert_same_training_state(model, other):
    assert int(other.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
    for a, b in zip(
        values(model.optimizer.variables), values(other.optimizer.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    fit(model)
    fit(other)
    for a, b in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def built_optimizer(**kwargs):
    optimizer = keras_adam.Adam(**kwargs)
    variables, loss_fn = make_problem("float32")
    train(optimizer, variables, loss_fn, 0, 3)
    return optimizer


def assert_load_refused_and_state_unchanged(saved, match):
    optimizer = built_optimizer()
    before = values(optimizer.variables)
    with pytest.raises(ValueError, match=match):
        optimizer.load_own_variables(saved)
    for a, b in zip(before, values(optimizer.variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loading_a_different_variable_count_raises_and_changes_nothing():
    saved = {}
    built_optimizer(amsgrad=True).save_own_variables(saved)
    assert_load_refused_and_state_unchanged(
        saved, r"saved state has 8 variables but this optimizer has 6"
    )


def test_loading_a_different_shape_raises_and_changes_nothing():
    saved = {}
    built_optimizer().save_own_variables(saved)
    saved["4"] = np.zeros((7, 3), "float32")
    assert_load_refused_and_state_unchanged(saved, r"saved variable 4 has shape \(7, 3\).*\(3,\)")


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_state_loaded_before_build_is_restored_by_build(mode):
    """As `model.load_weights` does before the first fit: nothing is dropped,
    and the restored optimizer continues exactly where the saved one was."""
    source = keras_adam.Adam(**BINARY)
    source_variables, source_loss = make_problem("float32")
    train(source, source_variables, source_loss, 0, 3)
    saved = {}
    source.save_own_variables(saved)
    later = keras_adam.Adam(**BINARY)
    later.load_own_variables(saved)
    assert int(later.iterations.numpy()) == int(source.iterations.numpy()) > 0  # at once
    resaved = {}
    later.save_own_variables(resaved)  # not built yet: the pending state is what is saved
    assert sorted(resaved) == sorted(saved)
    for key in saved:
        np.testing.assert_array_equal(resaved[key], saved[key])
    variables, loss_fn = moved_problem(source_variables)
    # `later` builds inside its first (possibly traced) step.
    make_step(later, variables, loss_fn, mode)(tf.constant(3, dtype="int64"))
    make_step(source, source_variables, source_loss, mode)(tf.constant(3, dtype="int64"))
    for ours, theirs in zip(values(later.variables), values(source.variables), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_state_loaded_before_build_that_does_not_fit_fails_at_build():
    saved = {}
    built_optimizer(amsgrad=True).save_own_variables(saved)
    optimizer = keras_adam.Adam()
    optimizer.load_own_variables(saved)
    with pytest.raises(ValueError, match=r"saved state has \d+ variables but this optimizer has"):
        optimizer.build(make_problem("float32")[0])


def test_keras_only_warns_where_we_raise():
    """The behaviour we guard against: Keras skips mismatched state silently."""
    saved = {}
    built_optimizer(amsgrad=True).save_own_variables(saved)
    theirs = keras.optimizers.Adam()
    theirs.build(make_problem("float32")[0])
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        theirs.load_own_variables(saved)


def test_state_saved_before_build_loads_as_zero_moments():
    """An optimizer saved before its first step holds only its step counter
    and learning rate; loading it resets a trained optimizer to that state."""
    unbuilt = {}
    keras_adam.Adam(learning_rate=0.125).save_own_variables(unbuilt)
    assert len(unbuilt) == 2
    optimizer = built_optimizer()
    optimizer.load_own_variables(unbuilt)
    assert int(optimizer.iterations.numpy()) == 0
    assert float(optimizer.learning_rate.numpy()) == 0.125
    for slot in optimizer.variables[2:]:
        assert not np.any(slot.numpy())


def test_set_weights_with_wrong_length_raises():
    optimizer = built_optimizer()
    with pytest.raises(ValueError, match=r"got 2 arrays but the optimizer has 6"):
        optimizer.set_weights([np.array(0), np.array(0.1)])


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_a_build_inside_a_traced_step_makes_the_variables_eagerly(mode, monkeypatch):
    """`fit` (no strategy) builds the optimizer in its first traced step: ours makes
    its moments eagerly, all at once (`TensorFlowEngine.build_scope`), where Keras's
    Adam lifts each out of the trace; the numbers are Keras's."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    made = []
    original = BaseOptimizer.add_variable

    def add_variable(self, *args, **kwargs):
        variable = original(self, *args, **kwargs)
        made.append((type(self).__module__.split(".")[0], variable.name, tf.executing_eagerly()))
        return variable

    monkeypatch.setattr(BaseOptimizer, "add_variable", add_variable)
    results = {}
    for name, cls in CLASSES.items():
        optimizer = cls(**BINARY)
        variables, loss_fn = make_problem("float32")
        train_step = make_step(optimizer, variables, loss_fn, mode)
        for i in range(3):
            train_step(tf.constant(i, dtype="int64"))
        results[name] = values(variables) + values(optimizer.variables)
    moments = [(owner, eager) for owner, name, eager in made if "momentum" in name]
    moments += [(owner, eager) for owner, name, eager in made if "velocity" in name]
    assert sorted(set(moments)) == [("keras", False), ("keras_adam", True)]
    for ours, theirs in zip(results["keras_adam"], results["keras"], strict=True):
        np.testing.assert_array_equal(ours, theirs)
