"""The Adam search space: ranges on 1 − β, the budget rule, validation, and the HyperModel."""

import math

import keras
import keras_tuner
import numpy as np
import pytest

import keras_adam
from tuning import AdamHyperModel, AdamSearchSpace
from tuning.hypermodel import DivergenceGuard
from tuning.space import hp_name


@pytest.mark.parametrize(
    ("max_trials", "expected"),
    [
        (1, ("learning_rate",)),
        (9, ("learning_rate",)),
        (10, ("learning_rate", "beta_1")),
        (24, ("learning_rate", "beta_1")),
        (25, ("learning_rate", "beta_1", "beta_2", "epsilon")),
        (None, ("learning_rate", "beta_1", "beta_2", "epsilon")),
    ],
)
def test_budget_rule_follows_the_tuning_playbook(max_trials, expected):
    assert AdamSearchSpace().tuned_names(max_trials) == expected


def test_weight_decay_is_searched_only_when_given_a_range():
    space = AdamSearchSpace(weight_decay=(1e-5, 1e-2))
    assert space.tuned_names(30)[-1] == "weight_decay"
    assert "weight_decay" not in space.tuned_names(12)
    assert "weight_decay" not in AdamSearchSpace().tuned_names(100)


def test_fixed_numbers_are_never_searched_and_tuned_overrides_the_budget():
    space = AdamSearchSpace(beta_1=0.8, epsilon=1e-8)
    assert space.tuned_names(12) == ("learning_rate", "beta_2")
    assert space.tuned_names(100) == ("learning_rate", "beta_2")
    assert AdamSearchSpace(tuned=("beta_2",)).tuned_names(3) == ("beta_2",)


def test_declare_searches_one_minus_beta_on_a_log_scale():
    space = AdamSearchSpace(beta_1=(0.5, 0.99), beta_2=(0.9, 0.9999)).for_budget(None)
    hp = keras_tuner.HyperParameters()
    values = space.declare(hp)
    by_name = {p.name: p for p in hp.space}
    assert set(by_name) == {"learning_rate", "one_minus_beta_1", "one_minus_beta_2", "epsilon"}
    for name, low, high in [
        ("learning_rate", 1e-5, 1e-1),
        ("one_minus_beta_1", 0.01, 0.5),
        ("one_minus_beta_2", 1e-4, 1e-1),
        ("epsilon", 1e-10, 1e-3),
    ]:
        param = by_name[name]
        assert param.sampling == "log"
        assert math.isclose(param.min_value, low, rel_tol=1e-12)
        assert math.isclose(param.max_value, high, rel_tol=1e-12)
    # Defaults start the search at Keras's defaults.
    assert math.isclose(values["beta_1"], 0.9) and math.isclose(values["beta_2"], 0.999)
    assert values["learning_rate"] == 1e-3 and values["weight_decay"] is None


def test_samples_are_log_uniform_in_one_minus_beta():
    space = AdamSearchSpace().for_budget(None)
    hp = keras_tuner.HyperParameters()
    space.declare(hp)
    param = next(p for p in hp.space if p.name == "one_minus_beta_2")
    samples = np.array([param.random_sample(seed) for seed in range(4000)])
    assert samples.min() >= 1e-4 and samples.max() <= 1e-1
    # Log-uniform over three decades: a third of the mass per decade.
    per_decade = np.histogram(np.log10(samples), bins=[-4, -3, -2, -1])[0] / len(samples)
    np.testing.assert_allclose(per_decade, [1 / 3] * 3, atol=0.04)
    values = space.values_from({hp_name("beta_2"): 0.001, "learning_rate": 0.01})
    assert values["beta_2"] == 1 - 0.001 and values["learning_rate"] == 0.01
    assert values["beta_1"] == 0.9  # not in the trial: Keras's default


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": (1e-2, 1e-3)}, r"`learning_rate`.*low < high.*\(0\.01, 0\.001\)"),
        ({"epsilon": (0.0, 1e-3)}, r"`epsilon`.*log scale.*positive"),
        ({"learning_rate": -1.0}, r"`learning_rate` must be positive.*-1\.0"),
        ({"beta_1": (0.5, 1.0)}, r"`beta_1` must be in \[0, 1\).*1\.0"),
        ({"beta_2": 1.5}, r"`beta_2` must be in \[0, 1\).*1\.5"),
        ({"epsilon": (1e-8,)}, r"`epsilon` must be a number or a \(low, high\) pair"),
        ({"learning_rate": float("nan")}, r"`learning_rate` must be finite"),
        ({"tuned": ("momentum",)}, r"`tuned` may only name"),
        ({"tuned": ("weight_decay",)}, r"`tuned` names 'weight_decay', which has no range"),
        ({"beta_1": 0.9, "tuned": ("beta_1",)}, r"`tuned` names 'beta_1'"),
        ({"tuned": ()}, r"`tuned` must name at least one"),
    ],
)
def test_bad_space_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamSearchSpace(**kwargs)


def test_non_numbers_are_type_errors():
    with pytest.raises(TypeError, match=r"`beta_1`.*'high'"):
        AdamSearchSpace(beta_1="high")
    with pytest.raises(TypeError, match=r"`learning_rate`.*True"):
        AdamSearchSpace(learning_rate=True)


def _build():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def test_hypermodel_compiles_the_sampled_adam_with_fixed_flags():
    hypermodel = AdamHyperModel(
        _build,
        space=AdamSearchSpace().for_budget(30),
        optimizer_options={"amsgrad": True, "beta_2": 0.95},
        loss="mse",
    )
    hp = keras_tuner.HyperParameters()
    hp.values.update({"learning_rate": 0.02, "one_minus_beta_1": 0.2, "epsilon": 1e-9})
    model = hypermodel.build(hp)
    optimizer = model.optimizer
    assert isinstance(optimizer, keras_adam.Adam)
    assert optimizer.amsgrad
    assert math.isclose(float(optimizer.learning_rate), 0.02, rel_tol=1e-6)
    assert math.isclose(optimizer.beta_1, 0.8) and optimizer.beta_2 == 0.95
    assert optimizer.epsilon == 1e-9
    # beta_2 given as an option is fixed, so not searched.
    assert "one_minus_beta_2" not in {p.name for p in hp.space}


def test_every_trial_starts_from_the_same_weights():
    hypermodel = AdamHyperModel(_build, loss="mse", seed=3)
    first = hypermodel.build(keras_tuner.HyperParameters()).get_weights()
    keras.utils.set_random_seed(99)
    second = hypermodel.build(keras_tuner.HyperParameters()).get_weights()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_hypermodel_passes_hp_to_a_builder_that_takes_it():
    def build(hp):
        units = hp.Int("units", 2, 8, default=5)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])

    hp = keras_tuner.HyperParameters()
    model = AdamHyperModel(build, loss="mse").build(hp)
    assert model.output_shape == (None, 5)
    assert "units" in hp.values


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer_options": {"amsgrad": "yes"}}, ValueError, r"`amsgrad`"),
        ({"optimizer_options": {"nesterov": True}}, ValueError, r"nesterov"),
        ({"compile_options": {"optimizer": "sgd"}}, ValueError, r"`compile_options`.*optimizer"),
        ({"seed": -1}, ValueError, r"`seed`.*-1"),
    ],
)
def test_bad_hypermodel_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdamHyperModel(_build, **kwargs)


def test_builder_must_return_a_model():
    with pytest.raises(TypeError, match=r"`build_model` must return a keras.Model.*int"):
        AdamHyperModel(lambda: 3).build(keras_tuner.HyperParameters())


def test_divergence_fails_the_trial_with_its_reason():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adam.Adam(learning_rate=1e30), loss="mse")
    x = np.ones((64, 2), "float32") * 10
    y = np.ones((64, 1), "float32")
    hypermodel = AdamHyperModel(_build, loss="mse")
    with pytest.raises(keras_tuner.errors.FailedTrialError, match=r"diverged: loss=(nan|inf)"):
        hypermodel.fit(keras_tuner.HyperParameters(), model, x, y, epochs=5, verbose=0)
    guard = DivergenceGuard()
    model.compile(optimizer=keras_adam.Adam(learning_rate=1e-3), loss="mse")
    keras.utils.set_random_seed(0)
    model.set_weights([np.zeros((2, 1), "float32"), np.zeros(1, "float32")])
    model.fit(x, y, epochs=1, verbose=0, callbacks=[guard])
    assert guard.reason is None
