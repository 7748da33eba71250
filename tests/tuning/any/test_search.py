"""`tuning.search`: results, files, resume, seeds, failures, and Hyperband's carried Adam state."""

import csv
import json
import math
import os
import warnings

import keras
import numpy as np
import pytest

import keras_adam
import tuning
from tests.helpers.digits import LOSS, linear, search, search_subset
from tuning import AdamSearchSpace
from tuning.records import SETTLED_METRIC


@pytest.fixture(scope="module")
def data():
    return search_subset()


build = linear


def run(data, tmp_path, **kwargs):
    options = {
        "tuner": "random",
        "max_trials": 3,
        "epochs": 2,
        "comparison_repeats": 1,
    }
    return search(data, tmp_path, **{**options, **kwargs})


class RecordValLoss(keras.callbacks.Callback):
    """Appends each training run's per-epoch val_loss to `runs` (shared by KerasTuner's copies)."""

    def __init__(self, runs):
        super().__init__()
        self.runs = runs

    def __deepcopy__(self, memo):
        return RecordValLoss(self.runs)

    def on_train_begin(self, logs=None):
        self.runs.append([])

    def on_epoch_end(self, epoch, logs=None):
        self.runs[-1].append(float(logs["val_loss"]))


def test_search_returns_and_writes_what_people_act_on(data, tmp_path):
    ended, curves = [], []
    result = run(
        data, tmp_path, epochs=7, on_trial_end=ended.append, callbacks=[RecordValLoss(curves)]
    )
    assert [r.trial_id for r in result.trials] == ["0", "1", "2"]
    assert [r.trial_id for r in ended] == ["0", "1", "2"]
    assert all(r.status == "COMPLETED" and r.seconds > 0 for r in result.trials)
    assert result.tuned == ("learning_rate",)
    # Each trial: its best epoch, and the mean of its last 5 epochs, which picks the winner.
    for record, curve in zip(result.trials, curves[:3], strict=True):
        assert record.score == pytest.approx(min(curve), rel=1e-6)
        assert record.settled == pytest.approx(np.mean(curve[-5:]), rel=1e-6)
    # The oracle was told each trial's settled score: it models what picks the winner.
    for record in result.trials:
        with open(tmp_path / "p" / f"trial_{record.trial_id}" / "trial.json") as f:
            reported = json.load(f)["metrics"]["metrics"][SETTLED_METRIC]["observations"]
        assert [value for o in reported for value in o["value"]] == [
            pytest.approx(record.settled, rel=1e-6)
        ]
    best = min(result.trials, key=lambda r: r.settled)
    assert result.score == best.score and result.settled == best.settled
    assert result.best_hyperparameters == best.hyperparameters
    # The ready optimizer is built from the best values.
    assert isinstance(result.optimizer, keras_adam.Adam)
    assert math.isclose(
        float(result.optimizer.learning_rate), best.hyperparameters["learning_rate"], rel_tol=1e-6
    )
    # The comparison is judged on the test data, from initial weights the search never saw.
    assert result.comparison.held_out == "test_data"
    assert result.comparison.metric == "loss"
    assert "test_accuracy" in result.comparison.tuned_metrics
    assert result.comparison.tuned_scores[0] == result.comparison.tuned_metrics["test_loss"]

    paths = result.write()
    with open(paths["best.json"]) as f:
        best_json = json.load(f)
    assert best_json["objective"] == "val_loss"
    assert best_json["score"] == pytest.approx(result.score)
    assert best_json["settled"] == pytest.approx(result.settled)
    assert best_json["trials"] == 3
    assert set(best_json["hyperparameters"]) >= {"learning_rate", "beta_1", "beta_2"}
    rebuilt = keras_adam.Adam.from_config(best_json["optimizer"])
    assert math.isclose(
        float(rebuilt.learning_rate), best.hyperparameters["learning_rate"], rel_tol=1e-6
    )
    assert best_json["baseline"]["score"] == pytest.approx(result.comparison.default_score)
    assert best_json["verdict"]["use"] in ("tuned", "default")
    with open(paths["trials.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["trial_id", "status", "learning_rate", "beta_1", "beta_2"]
    assert list(rows[0])[-5:] == ["score", "settled", "epochs", "seconds", "reason"]
    assert [int(r["epochs"]) for r in rows] == [7, 7, 7]
    assert [r["trial_id"] for r in rows] == ["0", "1", "2"]
    assert float(rows[1]["score"]) == result.trials[1].score
    assert float(rows[1]["settled"]) == result.trials[1].settled
    assert float(rows[0]["beta_1"]) == 0.9  # not searched with 3 trials: Keras's default
    assert os.path.getsize(paths["trials.png"]) > 10_000


def test_resume_keeps_finished_trials_and_runs_only_missing_ones(data, tmp_path):
    first = run(data, tmp_path, max_trials=2, comparison_repeats=0)
    ended = []
    second = run(data, tmp_path, max_trials=3, comparison_repeats=0, on_trial_end=ended.append)
    assert [r.trial_id for r in ended] == ["2"]
    assert second.trials[:2] == first.trials
    again = []
    run(data, tmp_path, max_trials=3, comparison_repeats=0, on_trial_end=again.append)
    assert again == []


def test_seed_zero_is_a_seed(data, tmp_path):
    def values(seed, name):
        result = run(data, tmp_path, seed=seed, project=name, comparison_repeats=0, epochs=1)
        return [r.hyperparameters["learning_rate"] for r in result.trials]

    assert values(0, "a") == values(0, "b")
    assert values(0, "a") != values(1, "c")


class _EpochCounter(keras.callbacks.Callback):
    epochs: list = []

    def on_epoch_end(self, epoch, logs=None):
        _EpochCounter.epochs.append(epoch)


def test_early_stopping_ends_a_trial_that_stops_improving(data, tmp_path):
    _EpochCounter.epochs.clear()
    # η ~ 1e-12 cannot move float32 weights: the validation loss never improves.
    result = run(
        data,
        tmp_path,
        max_trials=1,
        epochs=20,
        early_stopping=2,
        space=AdamSearchSpace(learning_rate=(1e-12, 2e-12)),
        comparison_repeats=0,
        callbacks=[_EpochCounter()],
    )
    assert result.trials[0].status == "COMPLETED"
    assert _EpochCounter.epochs == [0, 1, 2]  # the first epoch, then `patience` more


def regression():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4)).astype("float32") * 10
    return x, x @ np.ones((4, 1), "float32")


def test_diverging_trials_fail_with_their_reason_and_the_search_goes_on(tmp_path):
    x, y = regression()
    ended = []
    result = tuning.search(
        lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
        x,
        y,
        loss="mse",
        metrics=None,
        tuner="grid",
        max_trials=10,
        epochs=2,
        space=AdamSearchSpace(learning_rate=(1e-3, 1e36), tuned=("learning_rate",)),
        directory=str(tmp_path),
        comparison_repeats=0,
        on_trial_end=ended.append,
    )
    assert len(result.trials) == len(ended) == 10
    failed = [r for r in result.trials if r.status == "FAILED"]
    completed = [r for r in result.trials if r.status == "COMPLETED"]
    assert failed and completed
    assert all(r.reason.startswith("diverged: ") for r in failed)
    assert all(r.hyperparameters["learning_rate"] > 1e10 for r in failed)
    assert result.best_hyperparameters["learning_rate"] < 1e10
    rows = list(csv.DictReader(open(result.write(plot=False)["trials.csv"])))
    assert [r["status"] for r in rows].count("FAILED") == len(failed)
    assert all(r["reason"].startswith("diverged") for r in rows if r["status"] == "FAILED")


def test_no_completed_trial_is_a_clear_error(tmp_path):
    x, y = regression()
    with pytest.raises(RuntimeError, match=r"No trial completed.*diverged"):
        tuning.search(
            lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
            x,
            y,
            loss="mse",
            metrics=None,
            max_trials=2,
            tuner="random",
            epochs=1,
            space=AdamSearchSpace(learning_rate=(1e34, 1e36)),
            directory=str(tmp_path),
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_trials": 0}, r"`max_trials` must be a positive integer.*0"),
        ({"epochs": -2}, r"`epochs`.*-2"),
        ({"tuner": "sgd"}, r"`tuner` must be one of random, bayesian, hyperband, grid.*'sgd'"),
        ({"objective": "val_thing"}, r"`objective`.*'val_thing'"),
        ({"validation_split": 1.5}, r"`validation_split`.*1\.5"),
        ({"seed": -1}, r"`seed`.*-1"),
        ({"comparison_repeats": -1}, r"`comparison_repeats`.*-1"),
    ],
)
def test_bad_search_arguments_name_themselves(data, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(data, tmp_path, **kwargs)


class _Probe(keras.callbacks.Callback):
    """Records Adam's variables when training begins and after each epoch (a class-level
    log: KerasTuner deep-copies callbacks)."""

    begins: list = []
    epochs: list = []
    trial: list = [None]

    def _variables(self):
        return [v.numpy().copy() for v in self.model.optimizer.variables]

    def on_train_begin(self, logs=None):
        _Probe.begins.append((_Probe.trial[0], self._variables()))

    def on_epoch_end(self, epoch, logs=None):
        _Probe.epochs.append((_Probe.trial[0].trial_id, logs["val_loss"], self._variables()))


def test_hyperband_continues_trials_with_adams_state(data, tmp_path):
    _Probe.begins.clear()
    _Probe.epochs.clear()

    def begin(trial):
        _Probe.trial[0] = trial

    run(
        data,
        tmp_path,
        tuner="hyperband",
        max_trials=None,
        epochs=3,
        comparison_repeats=0,
        callbacks=[_Probe()],
        on_trial_begin=begin,
    )
    continued = [
        (trial, variables)
        for trial, variables in _Probe.begins
        if "tuner/trial_id" in trial.hyperparameters.values
    ]
    assert continued, "this Hyperband budget continues at least one trial"
    for trial, variables in continued:
        previous = trial.hyperparameters.values["tuner/trial_id"]
        # KerasTuner continues from the previous trial's best epoch (first minimum).
        history = [(loss, v) for trial_id, loss, v in _Probe.epochs if trial_id == previous]
        best = min(range(len(history)), key=lambda i: history[i][0])
        expected = history[best][1]
        assert len(variables) == len(expected) == 6
        for value, saved in zip(variables, expected, strict=True):
            np.testing.assert_array_equal(value, saved)
        steps_per_epoch = math.ceil(600 * 0.8 / 32)
        assert int(variables[0]) == (best + 1) * steps_per_epoch  # the step counter
        assert np.abs(variables[2]).max() > 0  # the first moment


def test_keras_tuner_hyperband_drops_keras_adams_state_but_not_ours(tmp_path):
    """Why AdamHyperband and deferred restoration exist: Keras skips state loaded early."""
    keras.utils.set_random_seed(0)
    x = np.ones((8, 2), "float32")
    results = {}
    for name, make in [("keras", keras.optimizers.Adam), ("ours", keras_adam.Adam)]:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=make(), loss="mse")
        model.fit(x, x[:, :1], epochs=2, verbose=0)
        path = str(tmp_path / f"{name}.weights.h5")
        model.save_weights(path)
        fresh = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        fresh.compile(optimizer=make(), loss="mse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh.load_weights(path)  # as KerasTuner's Hyperband does: optimizer not built
        fresh.optimizer.build(fresh.trainable_variables)
        results[name] = int(fresh.optimizer.iterations)
    assert results == {"keras": 0, "ours": 2}


# --- The footguns of issue 14: each of these failed before it was fixed. ---


def test_default_adam_winning_on_held_out_data_is_reported_as_such(data, tmp_path):
    """Selection on validation data that misleads: the tuned optimizer wins there, loses on test."""
    x, y, x_test, y_test = data
    # Validation labels shifted by one class: any learning makes the validation loss worse, so
    # the search picks the slowest η; default Adam, which learns, wins on the held-out test data.
    # The range excludes Keras's η = 1e-3, so the first trial (the range's centre, not default
    # Adam) cannot end up the winner on every backend's random draw.
    misleading = (x[480:], (y[480:] + 1) % 10)
    result = run(
        data,
        tmp_path,
        max_trials=2,
        epochs=3,
        validation_data=misleading,
        space=AdamSearchSpace(learning_rate=(1e-6, 1e-4)),
        comparison_repeats=2,
    )
    comparison = result.comparison
    assert result.best_hyperparameters["learning_rate"] <= 1e-4
    assert comparison.held_out == "test_data"
    assert comparison.default_score < comparison.tuned_score  # test loss
    assert not comparison.tuned_is_better
    assert "default Adam was as good or better on held-out data" in comparison.summary()
    assert "±" in comparison.summary()
    best_json = json.load(open(result.write(plot=False)["best.json"]))
    assert best_json["verdict"]["tuned_is_better"] is False
    assert "default Adam was as good or better" in best_json["verdict"]["message"]
    assert best_json["baseline"]["score"] == pytest.approx(comparison.default_score)
    assert len(best_json["comparison"]["tuned"]["scores"]) == 2


def test_comparison_runs_start_from_unseen_weights_on_an_automatic_holdout(data, tmp_path):
    x, y, _, _ = data
    result = tuning.search(
        build,
        x,
        y,
        tuner="random",
        max_trials=1,
        epochs=1,
        directory=str(tmp_path),
        comparison_repeats=1,
    )
    comparison = result.comparison
    assert comparison.held_out.startswith("holdout")
    assert "held out" in comparison.summary()
    # The search's only trial and the comparison's tuned run do not share initial weights:
    # the tuned run's validation score differs from the trial's.
    assert comparison.tuned_metrics["val_loss"] != pytest.approx(result.score, rel=1e-6)


def test_a_probability_loss_on_logits_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match=r"Argument `loss`.*logits.*from_logits=True"):
        run(data, tmp_path, loss="sparse_categorical_crossentropy")


def test_loss_and_metrics_are_inferred_from_the_model_and_targets(data, tmp_path):
    inferred = run(data, tmp_path, loss=None, metrics=None, max_trials=1, epochs=1, project="a")
    explicit = run(data, tmp_path, max_trials=1, epochs=1, comparison_repeats=0, project="b")
    assert inferred.score == pytest.approx(explicit.score)  # logits scored as logits
    assert "test_accuracy" in inferred.comparison.tuned_metrics

    x, y = regression()
    result = tuning.search(
        lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
        x / 10,
        y / 10,
        tuner="random",
        max_trials=1,
        epochs=1,
        directory=str(tmp_path),
        comparison_repeats=1,
    )
    assert result.comparison.metric == "loss"
    assert not any("accuracy" in k for k in result.comparison.tuned_metrics)


def test_a_loss_that_cannot_be_inferred_must_be_given(data, tmp_path):
    def odd_output():
        return keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(10), keras.layers.Lambda(lambda t: t * 2)]
        )

    x, y, _, _ = data
    with pytest.raises(ValueError, match=r"Argument `loss` is required"):
        tuning.search(odd_output, x, y, max_trials=1, epochs=1, directory=str(tmp_path))


def test_another_problem_in_the_same_project_is_refused_with_what_changed(data, tmp_path):
    run(data, tmp_path, max_trials=1, epochs=1, comparison_repeats=0)
    with pytest.raises(ValueError, match=r"^Argument `project`.*changed: epochs.*overwrite=True"):
        run(data, tmp_path, max_trials=1, epochs=2, comparison_repeats=0)
    x, y, x_test, y_test = data
    with pytest.raises(ValueError, match=r"changed: data"):
        run((x[:500], y[:500], x_test, y_test), tmp_path, max_trials=1, epochs=1)
    again = run(data, tmp_path, max_trials=1, epochs=2, comparison_repeats=0, overwrite=True)
    assert len(again.trials) == 1


def test_the_default_project_is_named_after_the_search(data, tmp_path):
    a = run(data, tmp_path, project=None, max_trials=1, epochs=1, comparison_repeats=0)
    b = run(data, tmp_path, project=None, max_trials=1, epochs=2, comparison_repeats=0)
    assert os.path.basename(a.project_dir) != "adam"
    assert a.project_dir != b.project_dir


def test_result_optimizer_compiles_two_models(data, tmp_path):
    x, y, _, _ = data
    result = run(data, tmp_path, max_trials=1, epochs=1, comparison_repeats=0)
    assert result.optimizer is not result.optimizer
    for _ in range(2):
        model = build()
        model.compile(optimizer=result.optimizer, loss=LOSS)
        model.fit(x[:64], y[:64], epochs=1, verbose=0)
        assert int(model.optimizer.iterations) == 2


@pytest.mark.parametrize("tuner", ["random", "bayesian", "hyperband"])
def test_the_first_trial_is_default_adam(data, tmp_path, tuner):
    result = run(
        data,
        tmp_path,
        tuner=tuner,
        max_trials=1 if tuner != "hyperband" else 2,
        epochs=2 if tuner == "hyperband" else 1,
        comparison_repeats=0,
        space=AdamSearchSpace(tuned=("learning_rate", "beta_1", "beta_2")),
    )
    first = result.trials[0].hyperparameters
    assert first["learning_rate"] == pytest.approx(1e-3)
    assert first["beta_1"] == pytest.approx(0.9)
    assert first["beta_2"] == pytest.approx(0.999)


def _hparams_plugin_data(directory):
    """The HParams plugin's records in a run's (or the experiment's) event files."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == "hparams":
                        content = value.metadata.plugin_data.content
                        found.append(plugin_data_pb2.HParamsPluginData.FromString(content))
    return found


def test_tensorboard_gets_each_trials_curves_and_hyperparameters(data, tmp_path):
    from tuning.tensorboard import SETTLED_TAG, tags

    board = tmp_path / "board"
    curves = []
    result = run(
        data, tmp_path, max_trials=2, epochs=3, tensorboard=board, comparison_repeats=0,
        callbacks=[RecordValLoss(curves)],
    )  # fmt: skip
    # The experiment: Adam's five hyperparameters, the objective and the settled score.
    (experiment,) = [d.experiment for d in _hparams_plugin_data(board) if d.HasField("experiment")]
    assert {h.name for h in experiment.hparam_infos} == {
        "learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay",
    }  # fmt: skip
    learning_rate = next(h for h in experiment.hparam_infos if h.name == "learning_rate")
    assert (learning_rate.domain_interval.min_value, learning_rate.domain_interval.max_value) == (
        pytest.approx(1e-5),
        pytest.approx(1e-1),
    )
    assert {m.name.tag for m in experiment.metric_infos} >= {"val_loss", SETTLED_TAG}
    # A run per trial: its Adam arguments, its logs at every epoch, its settled score.
    assert sorted(os.listdir(board)) == sorted(
        [*(f for f in os.listdir(board) if f.startswith("events")), "trial_0", "trial_1"]
    )
    for record, curve in zip(result.trials, curves, strict=True):
        run_dir = board / f"trial_{record.trial_id}"
        (start,) = [d.session_start_info for d in _hparams_plugin_data(run_dir)]
        assert start.hparams["learning_rate"].number_value == pytest.approx(
            record.hyperparameters["learning_rate"], rel=1e-6
        )
        assert start.hparams["beta_1"].number_value == pytest.approx(0.9)
        scalars = tags(str(run_dir))
        assert [step for step, _ in scalars["val_loss"]] == [0, 1, 2]
        np.testing.assert_allclose([v for _, v in scalars["val_loss"]], curve, rtol=1e-6)
        assert {"loss", "accuracy", "val_accuracy"} <= set(scalars)
        assert scalars[SETTLED_TAG] == [(2, pytest.approx(record.settled, rel=1e-6))]


def test_tensorboard_must_be_a_directory(data, tmp_path):
    with pytest.raises(ValueError, match=r"tensorboard=3"):
        run(data, tmp_path, tensorboard=3)
    assert not (tmp_path / "p").exists()
