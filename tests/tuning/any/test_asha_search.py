"""`tuning.search(tuner="asha")`: promoted trials go on with Adam's state, one history, resume."""

import csv
import json
import math
import os

import keras
import numpy as np
import pytest

from tests.helpers.digits import search, search_subset
from tuning import asha
from tuning.fingerprint import SearchMismatchError

STEPS_PER_EPOCH = math.ceil(600 * 0.8 / 32)


@pytest.fixture(scope="module")
def data():
    return search_subset()


def run(data, tmp_path, **kwargs):
    """An ASHA search of 6 configurations, rungs at 1 and 3 epochs."""
    options = {"tuner": "asha", "max_trials": 6, "epochs": 3, "comparison_repeats": 0}
    return search(data, tmp_path, **{**options, **kwargs})


class Probe(keras.callbacks.Callback):
    """Logs, per training run, the trial, its first epoch, Adam's variables at the start,
    and each epoch's val_loss and variables (class-level: KerasTuner copies callbacks)."""

    runs: list = []
    trial: list = [None]
    kill_at: list = [None]  # (trial id, epoch): raise KeyboardInterrupt there, once

    def _variables(self):
        return [v.numpy().copy() for v in self.model.optimizer.variables]

    def on_train_begin(self, logs=None):
        trial = Probe.trial[0]
        start = trial.hyperparameters.values[asha.INITIAL_EPOCH_KEY]
        Probe.runs.append(
            {"trial": trial.trial_id, "start": start, "begin": self._variables(), "epochs": []}
        )

    def on_epoch_end(self, epoch, logs=None):
        Probe.runs[-1]["epochs"].append((epoch, float(logs["val_loss"]), self._variables()))
        if Probe.kill_at[0] == (Probe.runs[-1]["trial"], epoch):
            Probe.kill_at[0] = None
            raise KeyboardInterrupt  # the process is killed in the middle of a rung


def begin(trial):
    Probe.trial[0] = trial


@pytest.fixture
def probe():
    Probe.runs.clear()
    Probe.kill_at[0] = None
    return Probe()


def test_promoted_trials_continue_with_adams_state_and_keep_one_history(data, tmp_path, probe):
    result = run(data, tmp_path, callbacks=[probe], on_trial_begin=begin)
    paths = result.write()
    by_trial = {}
    for training in Probe.runs:
        by_trial.setdefault(training["trial"], []).append(training)
    continued = [t for t in Probe.runs if t["start"] > 0]
    assert continued, "6 configurations with rungs at 1 and 3 epochs promote at least 2"
    for training in continued:
        previous = by_trial[training["trial"]][0]
        assert previous["start"] == 0 and training["start"] == 1
        # Weights aside, Adam's variables begin where the first rung ended:
        # the step counter, the moments, all of them.
        last_epoch, _, ended = previous["epochs"][-1]
        assert last_epoch == 0
        assert len(training["begin"]) == len(ended) == 6
        for begun, saved in zip(training["begin"], ended, strict=True):
            np.testing.assert_array_equal(begun, saved)
        assert int(training["begin"][0]) == STEPS_PER_EPOCH  # iterations after one epoch
        assert np.abs(training["begin"][2]).max() > 0  # a first moment
        assert [epoch for epoch, _, _ in training["epochs"]] == [1, 2]
        assert int(training["epochs"][-1][2][0]) == 3 * STEPS_PER_EPOCH
    records = {r.trial_id: r for r in result.trials}
    assert len(records) == 6 and len(Probe.runs) == 6 + len(continued)
    for trial_id, trainings in by_trial.items():
        curve = [loss for t in trainings for _, loss, _ in t["epochs"]]
        record = records[trial_id]
        # One history across the rungs: history.json, the record, the oracle's trial.
        with open(os.path.join(result.project_dir, f"trial_{trial_id}", "history.json")) as f:
            np.testing.assert_allclose(json.load(f)["val_loss"], curve, rtol=1e-6)
        assert record.epochs == len(curve) in (1, 3)
        assert record.final == (record.epochs == 3)
        assert record.score == pytest.approx(min(curve), rel=1e-6)
        assert record.settled == pytest.approx(np.mean(curve), rel=1e-6)
        # Only a trial that may yet be promoted keeps a checkpoint.
        kept = [
            name
            for name in os.listdir(os.path.join(result.project_dir, f"trial_{trial_id}"))
            if name.endswith(".weights.h5")
        ]
        assert kept == ([] if record.final else ["after_1_epochs.weights.h5"])
    # The winner trained all the epochs, and settled best among those that did.
    finals = [r for r in result.trials if r.final]
    assert result.settled == min(r.settled for r in finals)
    assert result.best_hyperparameters == min(finals, key=lambda r: r.settled).hyperparameters
    with open(paths["trials.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {r["trial_id"]: int(r["epochs"]) for r in rows} == {
        r.trial_id: r.epochs for r in result.trials
    }
    assert os.path.getsize(paths["trials.png"]) > 10_000


def test_a_killed_search_resumes_losing_only_the_rung_in_flight(data, tmp_path, probe):
    first = []

    def begin_and_kill(trial):
        begin(trial)
        values = trial.hyperparameters.values
        if values[asha.INITIAL_EPOCH_KEY] == 1 and Probe.kill_at[0] is None and not first:
            first.append(trial.trial_id)
            Probe.kill_at[0] = (trial.trial_id, 1)  # after the first epoch of its second rung

    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path, callbacks=[probe], on_trial_begin=begin_and_kill)
    (killed,) = first
    before = list(Probe.runs)
    trained_before = {t["trial"] for t in before}
    Probe.runs.clear()
    result = run(data, tmp_path, callbacks=[probe], on_trial_begin=begin)
    # The rung in flight runs again from its start, from the checkpoint of the rung before.
    retried = Probe.runs[0]
    assert (retried["trial"], retried["start"]) == (killed, 1)
    first_rung = next(t for t in before if t["trial"] == killed and t["start"] == 0)
    for begun, saved in zip(retried["begin"], first_rung["epochs"][-1][2], strict=True):
        np.testing.assert_array_equal(begun, saved)
    # No trial trained before the kill starts again from scratch.
    assert not [t for t in Probe.runs if t["start"] == 0 and t["trial"] in trained_before]
    record = next(r for r in result.trials if r.trial_id == killed)
    history = json.load(open(os.path.join(result.project_dir, f"trial_{killed}", "history.json")))
    curve = [first_rung["epochs"][0][1]] + [loss for _, loss, _ in retried["epochs"]]
    np.testing.assert_allclose(history["val_loss"], curve, rtol=1e-6)
    assert record.epochs == 3 and record.status == "COMPLETED"
    assert len(result.trials) == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction_factor": 1}, r"`reduction_factor` must be an integer >= 2.*1"),
        ({"reduction_factor": "3"}, r"`reduction_factor` must be an integer >= 2.*'3'"),
        ({"min_epochs": 0}, r"`min_epochs` must be a positive integer.*0"),
        ({"min_epochs": 4}, r"`min_epochs` must be at most `epochs`.*min_epochs=4, epochs=3"),
        ({"max_trials": 0}, r"`max_trials` must be a positive integer.*0"),
        (
            {"tuner": "bayesian", "min_epochs": 2},
            r"`min_epochs` applies to tuner='asha' only.*min_epochs=2 with tuner='bayesian'",
        ),
        (
            {"tuner": "hyperband", "reduction_factor": 3},
            r"`reduction_factor` applies to tuner='asha' only",
        ),
    ],
)
def test_bad_asha_arguments_name_themselves_before_anything_is_written(
    data, tmp_path, kwargs, match
):
    with pytest.raises(ValueError, match=match):
        run(data, tmp_path, **kwargs)
    assert not (tmp_path / "p").exists()


def test_resuming_with_another_strategy_is_refused(data, tmp_path):
    run(data, tmp_path, max_trials=2, epochs=3)  # rungs at 1 and 3 epochs
    for other in ({"tuner": "bayesian"}, {"reduction_factor": 2}, {"min_epochs": 3}):
        with pytest.raises(SearchMismatchError, match=r"changed: tuner.*overwrite=True"):
            run(data, tmp_path, max_trials=2, epochs=3, **other)
    again = run(data, tmp_path, max_trials=2, epochs=3, min_epochs=1)  # the default: resumes
    assert len(again.trials) == 2


def test_tensorboard_runs_go_on_across_rungs(data, tmp_path, probe):
    from tuning.tensorboard import SETTLED_TAG, tags

    board = tmp_path / "board"
    result = run(data, tmp_path, tensorboard=board, callbacks=[probe], on_trial_begin=begin)
    for record in result.trials:
        scalars = tags(str(board / f"trial_{record.trial_id}"))
        curve = [
            loss for t in Probe.runs if t["trial"] == record.trial_id for _, loss, _ in t["epochs"]
        ]
        assert [step for step, _ in scalars["val_loss"]] == list(range(record.epochs))
        np.testing.assert_allclose([v for _, v in scalars["val_loss"]], curve, rtol=1e-6)
        # The settled score at the end of each rung, of all epochs so far.
        expected = [(0, curve[0])] + ([(2, np.mean(curve))] if record.epochs == 3 else [])
        assert [step for step, _ in scalars[SETTLED_TAG]] == [step for step, _ in expected]
        np.testing.assert_allclose(
            [v for _, v in scalars[SETTLED_TAG]], [v for _, v in expected], rtol=1e-6
        )


def test_a_model_kept_in_memory_continues_exactly_as_one_loaded(data, tmp_path, monkeypatch):
    from tuning import tuners

    loads = []
    restore = tuners.restore

    def counted(*args):
        loads.append(args[-1])
        return restore(*args)

    monkeypatch.setattr(tuners, "restore", counted)
    histories = {}
    for cached in (0, 2):
        monkeypatch.setattr(tuners.AdamAsha, "cached_models", cached)
        loads.clear()
        result = run(data, tmp_path / str(cached))
        promoted = sum(r.epochs == 3 for r in result.trials)
        histories[cached] = {
            r.trial_id: json.load(
                open(os.path.join(result.project_dir, f"trial_{r.trial_id}", "history.json"))
            )
            for r in result.trials
        }
        # Without the cache every promotion loads its checkpoint; with it, few do.
        assert len(loads) == promoted if cached == 0 else len(loads) < promoted
    assert histories[0].keys() == histories[2].keys()
    for trial_id, history in histories[0].items():
        for key, values in history.items():
            np.testing.assert_allclose(histories[2][trial_id][key], values, rtol=1e-6, err_msg=key)
