"""The search without training: where the Bayesian oracle spends its trials, the frozen heap."""

import gc
import math
import weakref

import keras_tuner
import numpy as np
import pytest

from tuning import tuners
from tuning.records import SETTLED_METRIC
from tuning.space import AdamSearchSpace

LOG_RANGES = {"learning_rate": (1e-5, 1e-1), "one_minus_beta_1": (0.01, 0.5)}


def unit(values):
    """The trial's point in the unit square of the default ranges (log scales)."""
    return np.array(
        [
            math.log(values[name] / low) / math.log(high / low)
            for name, (low, high) in LOG_RANGES.items()
        ]
    )


def bowl(centre, diverges_above=None):
    """A loss, least (0.08) at `centre` of the unit square, 5% noise; None: a diverged trial."""
    rng = np.random.default_rng(0)

    def loss(u):
        if diverges_above is not None and u[0] > diverges_above:
            return None
        d = (u - np.asarray(centre)) * np.array([4.0, 1.5])
        return 0.08 * math.exp(min(float(d @ d), 30.0)) * (1 + 0.05 * rng.standard_normal())

    return loss


def run_search(oracle, loss, tmp_path, trials=20, settled=None):
    """Drive `oracle` through `trials` trials scored by `loss`; the points and their scores.

    With `settled`, each trial also reports `settled(u)` as its settled
    score (as `AdamTuner` does), and the returned scores are those.
    """
    oracle._set_project_dir(str(tmp_path), "search")
    hp = keras_tuner.HyperParameters()
    AdamSearchSpace().for_budget(20).declare(hp)  # η and β1
    oracle.update_space(hp)
    points, scores = [], []
    for _ in range(trials):
        trial = oracle.create_trial("tuner0")
        values = trial.hyperparameters.values
        u = unit(values)
        score = loss(u)
        if score is None:
            trial.status = "FAILED"
        else:
            metrics = {"val_loss": score}
            if settled is not None:
                score = settled(u)
                metrics[SETTLED_METRIC] = score
            oracle.update_trial(trial.trial_id, metrics)
            trial.status = "COMPLETED"
        oracle.end_trial(trial)
        points.append(u)
        scores.append(score)
    return np.array(points), scores


def bayesian(seed):
    objective = keras_tuner.Objective("val_loss", "min")
    return tuners.make_oracle("bayesian", objective=objective, max_trials=20, epochs=5, seed=seed)


def on_edge(u):
    return bool(np.any(u < 1e-3) | np.any(u > 1 - 1e-3))


def test_guided_trials_stay_off_the_edges_when_the_best_is_inside(tmp_path):
    # KerasTuner's oracle put 57% of these trials on an edge, expected improvement 34%.
    guided, best = [], []
    for seed in range(3):
        points, scores = run_search(bayesian(seed), bowl([0.69, 0.77], 0.93), tmp_path / str(seed))
        guided += [on_edge(u) for u in points[6:]]
        best.append(min(s for s in scores if s is not None))
    assert np.mean(guided) <= 0.15
    assert max(best) < 0.1  # the minimum is 0.08: every search gets within 25% of it


def test_trials_go_to_the_edge_when_the_best_is_beyond_it(tmp_path):
    points, scores = run_search(bayesian(0), bowl([1.1, 0.5]), tmp_path)
    best = points[int(np.nanargmin([np.inf if s is None else s for s in scores]))]
    assert best[0] > 0.95  # η within 5% (of the log range) of its upper bound
    assert sum(u[0] > 0.9 for u in points[6:]) >= 7  # half the guided trials go there


def test_first_trial_is_the_baseline_and_all_are_inside_and_reproducible(tmp_path):
    first, _ = run_search(bayesian(3), bowl([0.3, 0.3]), tmp_path / "a", trials=12)
    again, _ = run_search(bayesian(3), bowl([0.3, 0.3]), tmp_path / "b", trials=12)
    np.testing.assert_allclose(first[0], unit({"learning_rate": 1e-3, "one_minus_beta_1": 0.1}))
    assert np.all((first >= 0) & (first <= 1))
    np.testing.assert_array_equal(first, again)


def test_the_model_fits_the_settled_score_not_the_best_epoch(tmp_path):
    # Best epochs are least near (0.8, 0.8), where curves jump; the settled
    # score, which picks the winner, is least near (0.3, 0.3): the guided
    # trials follow the settled score.
    settled, jumpy = bowl([0.3, 0.3]), bowl([0.8, 0.8])
    oracle = bayesian(0)
    points, _ = run_search(
        oracle, lambda u: min(settled(u), jumpy(u)), tmp_path, trials=16, settled=settled
    )
    guided = points[6:]
    to_settled = np.linalg.norm(guided - [0.3, 0.3], axis=1)
    to_jumpy = np.linalg.norm(guided - [0.8, 0.8], axis=1)
    assert np.mean(to_settled < to_jumpy) >= 0.8, guided
    # The process is fitted to log(settled score) of each completed trial.
    _, y = oracle._observations(oracle._observed())
    completed = [t for t in oracle.trials.values() if t.status == "COMPLETED"]
    expected = [math.log(t.metrics.get_last_value(SETTLED_METRIC)) for t in completed]
    np.testing.assert_allclose(y[: len(expected)], expected)


def test_without_every_settled_score_the_model_fits_the_best_epoch(tmp_path):
    # A search begun before settled scores were reported: like the winner,
    # the model falls back to the best epoch, for every trial alike.
    oracle = bayesian(1)
    run_search(oracle, bowl([0.5, 0.5]), tmp_path, trials=4, settled=lambda u: 0.5)
    run_search(oracle, bowl([0.5, 0.5]), tmp_path, trials=2)  # these report no settled score
    _, y = oracle._observations(oracle._observed())
    expected = [math.log(t.score) for t in oracle.trials.values() if t.status == "COMPLETED"]
    np.testing.assert_allclose(y[: len(expected)], expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_candidates_reflect_into_the_space_never_clipped_to_the_edge(tmp_path, seed):
    oracle = bayesian(seed)
    run_search(oracle, bowl([0.99, 0.99]), tmp_path, trials=7)
    x, y = oracle._observations(oracle._observed())
    candidates = oracle._candidates(x, y)
    bounds = oracle._get_hp_bounds()
    assert candidates.shape == (oracle.candidates, 2)
    assert np.all(candidates >= bounds[:, 0]) and np.all(candidates <= bounds[:, 1])
    assert not np.any(np.isin(candidates, bounds))  # none exactly on an edge


def test_frozen_heap_frees_what_trials_drop_and_unfreezes_on_exit():
    class Cycle:
        pass

    assert gc.get_freeze_count() == 0
    alive = Cycle()
    with tuners.frozen_heap():
        assert gc.get_freeze_count() > 0  # what was alive on entry is left alone
        garbage = Cycle()
        garbage.me = garbage  # a cycle: only the collector frees it
        dropped = weakref.ref(garbage)
        del garbage
        gc.collect()
        assert dropped() is None
    assert gc.get_freeze_count() == 0
    assert alive is not None


def test_frozen_heap_leaves_a_callers_freeze_alone():
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with tuners.frozen_heap():
            pass
        # Not unfrozen (0), nor frozen again (more); frozen objects that other
        # threads free meanwhile leave the count, so it may fall a little.
        assert count - 1000 < gc.get_freeze_count() <= count
    finally:
        gc.unfreeze()
