"""Quantized state is never lost: files, layouts, and `keras_adam.transfer_state`."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_adam
from keras_adam import quantization, state
from tests.helpers import numpy_quantization as nq
from tests.helpers.digits import LOSS, split
from tests.helpers.neutral import JIT_COMPILE


def mlp(first="hidden", second="logits", width=64):
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, activation="relu", name=first),
            keras.layers.Dense(10, name=second),
        ]
    )


def compiled(moment_dtype="int8", jit_compile=False, **options):
    model = mlp()
    model.compile(
        optimizer=keras_adam.Adam(learning_rate=3e-3, moment_dtype=moment_dtype, **options),
        loss=LOSS,
        jit_compile=jit_compile,
    )
    return model


def data():
    (x, y), _ = split()
    return x[:512], y[:512]


def numpy_state(optimizer):
    return [np.array(v.numpy()) for v in optimizer.variables]


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_saved_model_loads_and_resumes_exactly(tmp_path, moment_dtype, jit_compile):
    """fit 2 epochs, save, load, fit 2 more == fit 4, codes and scales included."""
    x, y = data()
    uninterrupted = compiled(moment_dtype, jit_compile, amsgrad=True)
    uninterrupted.fit(x, y, epochs=4, batch_size=64, shuffle=False, verbose=0)

    first_half = compiled(moment_dtype, jit_compile, amsgrad=True)
    first_half.fit(x, y, epochs=2, batch_size=64, shuffle=False, verbose=0)
    first_half.save(tmp_path / "m.keras")
    resumed = keras.saving.load_model(tmp_path / "m.keras")
    assert resumed.optimizer.moment_dtype == moment_dtype
    for a, b in zip(numpy_state(first_half.optimizer), numpy_state(resumed.optimizer), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed.fit(x, y, epochs=2, batch_size=64, shuffle=False, verbose=0)
    for a, b in zip(uninterrupted.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        numpy_state(uninterrupted.optimizer), numpy_state(resumed.optimizer), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_weights_file_round_trips_the_state(tmp_path):
    x, y = data()
    model = compiled("int4")
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    model.save_weights(tmp_path / "m.weights.h5")
    other = compiled("int4")
    other.optimizer.build(other.trainable_variables)
    other.load_weights(tmp_path / "m.weights.h5")
    for a, b in zip(numpy_state(model.optimizer), numpy_state(other.optimizer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_state_loaded_before_build_is_restored_by_build():
    x, y = data()
    model = compiled("int8")
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    store = {}
    model.optimizer.save_own_variables(store)
    assert state.LAYOUT_KEY in store
    other = compiled("int8")
    other.optimizer.load_own_variables(store)
    kept = {}
    other.optimizer.save_own_variables(kept)  # deferred state saves as it came
    assert sorted(kept) == sorted(store)
    other.optimizer.build(other.trainable_variables)
    for a, b in zip(numpy_state(model.optimizer), numpy_state(other.optimizer), strict=True):
        np.testing.assert_array_equal(a, b)


def _trained(model):
    x, y = data()
    model.fit(x[:128], y[:128], epochs=1, batch_size=64, verbose=0)
    return model


def _refused(target, store, match):
    target.optimizer.build(target.trainable_variables) if not target.optimizer.built else None
    before = numpy_state(target.optimizer)
    with pytest.raises(ValueError, match=match):
        target.optimizer.load_own_variables(store)
    for a, b in zip(before, numpy_state(target.optimizer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_float_state_does_not_load_into_a_quantized_optimizer():
    store = {}
    _trained(compiled(None)).optimizer.save_own_variables(store)
    _refused(compiled("int8"), store, "float moments but this optimizer has moment_dtype='int8'")


@pytest.mark.parametrize("kind", ["keras_adam", "keras"])
def test_quantized_state_does_not_load_into_a_float_optimizer(kind):
    store = {}
    _trained(compiled("int8")).optimizer.save_own_variables(store)
    target = mlp()
    optimizer = keras_adam.Adam() if kind == "keras_adam" else keras.optimizers.Adam()
    target.compile(optimizer=optimizer, loss=LOSS)
    target.optimizer.build(target.trainable_variables)
    before = numpy_state(target.optimizer)
    # keras.optimizers.Adam skips state that does not fit, with a warning.
    refusal = (
        pytest.raises(ValueError, match="quantized moments")
        if kind == "keras_adam"
        else pytest.warns(UserWarning, match="Skipping variable loading")
    )
    with refusal:
        target.optimizer.load_own_variables(store)
    for a, b in zip(before, numpy_state(target.optimizer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_int8_state_does_not_load_as_int4():
    store = {}
    _trained(compiled("int8")).optimizer.save_own_variables(store)
    _refused(compiled("int4"), store, "'int8' in format")


@pytest.mark.parametrize(
    "earlier", ["keras_adam.decade_map/1", "keras_adam.code_maps/2", "keras_adam.code_maps/3"]
)
def test_state_in_an_earlier_code_format_is_refused(earlier):
    # Earlier versions decoded int8 codes through other tables, or stored
    # codes and scales apart: loading them as today's would change every
    # moment without a word.
    store = {}
    _trained(compiled("int8")).optimizer.save_own_variables(store)
    record = state.decode_layout(store)
    assert record["format"] == state.FORMAT
    store[state.LAYOUT_KEY] = state.encode_layout({**record, "format": earlier})
    _refused(compiled("int8"), store, f"'int8' in format {earlier!r}")


def test_state_of_an_edited_model_is_refused_by_name():
    store = {}
    _trained(compiled("int8")).optimizer.save_own_variables(store)
    edited = mlp(first="encoder", second="decoder")  # same shapes, other layers
    edited.compile(optimizer=keras_adam.Adam(moment_dtype="int8"), loss=LOSS)
    _refused(edited, store, "the model changed")


def test_keras_numbering_of_layers_is_not_an_edit():
    store = {}
    _trained(compiled("int8")).optimizer.save_own_variables(store)
    renumbered = mlp(first="hidden_7", second="logits_2")
    renumbered.compile(optimizer=keras_adam.Adam(moment_dtype="int8"), loss=LOSS)
    renumbered.optimizer.build(renumbered.trainable_variables)
    renumbered.optimizer.load_own_variables(store)


def test_state_saved_with_quantized_embeddings_is_refused_without_them():
    def recommender(**options):
        keras.utils.set_random_seed(3)
        ids = keras.Input((1,), dtype="int32")
        rows = keras.layers.Embedding(600, 8)(ids)
        model = keras.Model(ids, keras.layers.Dense(10)(keras.layers.Flatten()(rows)))
        model.compile(optimizer=keras_adam.Adam(moment_dtype="int8", **options), loss=LOSS)
        return model

    store = {}
    saving = recommender(quantize_embeddings=True)
    saving.fit(np.arange(64)[:, None], np.arange(64) % 10, epochs=1, verbose=0)
    saving.optimizer.save_own_variables(store)
    _refused(recommender(), store, "quantize_embeddings")


def test_state_of_another_shape_is_refused():
    store = {}
    _trained(compiled("int8")).optimizer.save_own_variables(store)
    wider = mlp(width=80)
    wider.compile(optimizer=keras_adam.Adam(moment_dtype="int8"), loss=LOSS)
    _refused(wider, store, "the model changed")


def test_a_corrupted_array_is_refused():
    store = {}
    _trained(compiled("int8")).optimizer.save_own_variables(store)
    store["2"] = np.zeros(17, np.uint8)
    _refused(compiled("int8"), store, r"holds an array of shape \(17,\)")


# -- transfer_state ------------------------------------------------------------------------------


def _keras_trained(amsgrad=False):
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(3e-3, amsgrad=amsgrad), loss=LOSS)
    return _trained(model)


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
def test_transfer_from_keras_adam_quantizes_its_moments(moment_dtype):
    source = _keras_trained(amsgrad=True).optimizer
    target = keras_adam.Adam(moment_dtype=moment_dtype, amsgrad=True)
    keras_adam.transfer_state(source, target)
    assert int(ops.convert_to_numpy(target.iterations)) == int(
        ops.convert_to_numpy(source.iterations)
    )
    kernel = source._trainable_variables[0]
    moments = target.read_moments(kernel)
    expected = {
        "momentum": (source._momentums[0], True),
        "velocity": (source._velocities[0], False),
        "velocity_hat": (source._velocity_hats[0], False),
    }
    for name, (variable, signed) in expected.items():
        value = np.asarray(variable.numpy())
        codes, scales = nq.quantize(value, moment_dtype, signed)
        reference = nq.dequantize(codes, scales, value.shape, moment_dtype, signed)
        np.testing.assert_allclose(
            np.abs(moments[name] - value),
            np.abs(reference - value),
            atol=1e-6 * np.abs(value).max(),
        )
    # The small variables keep their float moments exactly.
    bias = source._trainable_variables[1]
    np.testing.assert_array_equal(
        target.read_moments(bias)["momentum"], source._momentums[1].numpy()
    )


def test_transfer_back_to_keras_adam_dequantizes():
    model = _trained(compiled("int4"))
    quantized = model.optimizer
    target = keras.optimizers.Adam()
    keras_adam.transfer_state(quantized, target)
    kernel = model.trainable_variables[0]
    np.testing.assert_array_equal(
        target._velocities[0].numpy(), quantized.read_moments(kernel)["velocity"]
    )
    # And on into int8, through float32: each hop is one quantization.
    again = keras_adam.Adam(moment_dtype="int8")
    keras_adam.transfer_state(target, again)
    assert isinstance(again._momentums[0], quantization.QuantizedMoment)
    model.compile(optimizer=again, loss=LOSS)
    x, y = data()
    loss = model.fit(x, y, epochs=1, batch_size=64, verbose=0).history["loss"][-1]
    assert np.isfinite(loss)


@pytest.mark.parametrize(
    ("make_target", "match"),
    [
        (lambda: keras_adam.Adam(moment_dtype="int8", amsgrad=True), "amsgrad"),
        (lambda: _built(keras_adam.Adam(moment_dtype="int8"), width=80), "shape"),
    ],
    ids=["amsgrad", "shapes"],
)
def test_transfer_refuses_mismatches_and_changes_nothing(make_target, match):
    source = _keras_trained().optimizer
    target = make_target()
    before = numpy_state(target) if target.built else None
    with pytest.raises(ValueError, match=match):
        keras_adam.transfer_state(source, target)
    if before is not None:
        for a, b in zip(before, numpy_state(target), strict=True):
            np.testing.assert_array_equal(a, b)


def _built(optimizer, width):
    optimizer.build(mlp(width=width).trainable_variables)
    return optimizer


def test_transfer_from_an_unbuilt_optimizer_is_refused():
    with pytest.raises(ValueError, match="`source` must be built"):
        keras_adam.transfer_state(keras.optimizers.Adam(), keras_adam.Adam(moment_dtype="int8"))
