"""KerasTuner oracles (search algorithms) for Adam: each starts with default Adam.

`RandomOracle`, `HyperbandOracle` and `BayesianOracle` are KerasTuner's
oracles with `BaselineFirst`, so the first trial measures the baseline the
search is compared with; `BayesianOracle` also proposes by Thompson
sampling. `tuning.tuners.make_oracle` builds one by tuner name, seeded with
`seed_oracle`.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras_tuner
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from tuning.records import SETTLED_METRIC


class BaselineFirst:
    """Oracle mixin: the first trial is default Adam (every hyperparameter at its default).

    `AdamSearchSpace.declare` gives each searched hyperparameter Keras's
    default as its KerasTuner default (η=1e-3, β1=0.9, β2=0.999, ε̂=1e-7,
    or the range's geometric centre when the range excludes it), so the
    search always measures the baseline it is compared with.
    """

    def _random_values(self) -> dict | None:
        if not self._tried_so_far and not getattr(self, "_baseline_given", False):
            self._baseline_given = True
            hps = keras_tuner.HyperParameters()
            for hp in self.hyperparameters.space:
                hps.merge([hp])
                if hps.is_active(hp):
                    hps.values[hp.name] = hp.default
            if not self._duplicate(hps.values):
                return hps.values
        return super()._random_values()


class RandomOracle(BaselineFirst, keras_tuner.oracles.RandomSearchOracle):
    """KerasTuner's random search, starting with default Adam."""


class HyperbandOracle(BaselineFirst, keras_tuner.oracles.HyperbandOracle):
    """KerasTuner's Hyperband, whose first configuration is default Adam."""


class BayesianOracle(BaselineFirst, keras_tuner.oracles.BayesianOptimizationOracle):
    """Bayesian optimization by Thompson sampling, which spends its trials where the best may be.

    KerasTuner's `BayesianOptimizationOracle` proposes the minimum of the
    lower confidence bound μ − 2.6σ of a Gaussian process fitted to the raw
    scores, found by 50 L-BFGS-B runs that each call the process one point
    at a time; failed trials are left out. Its model-guided trials land
    exactly on a range edge far more often than the best value lies there.
    Any acquisition maximized that way is drawn to the edges, expected
    improvement too: σ is largest at the boundary (its points have data on
    one side only), and a maximizer started inside climbs to the bound.
    Neither bounded length scales, a fitted noise term, a pessimistic prior
    mean nor a Latin-hypercube start changes that, and without the
    polishing step the same trials land just inside the edge. (The tuning
    guide, docs/tuning.md, measures both oracles.)

    This oracle:

    - fits the process to each trial's settled score (the objective's mean
      over its last epochs, `records.SETTLED_METRIC`), the score the
      winner is chosen by (`records.best_trial`), where KerasTuner's
      models the best epoch's: the extreme of a noisy curve, which favors
      the trials that jump most from epoch to epoch. Like the winner, it
      falls back to the best epoch when a completed trial has no settled
      score (a search begun before this was recorded);
    - fits the process to log(score) for positive minimized scores (losses
      spanning decades: a few bad trials do not flatten the rest), and
      counts a failed trial as the worst score seen;
    - bounds its length scales below (0.1 of the unit cube), and refits the
      kernel from 2 restarts, not 20;
    - proposes by Thompson sampling: it draws one function from the
      posterior over `candidates` points (half uniform in the space, half
      near the best trials so far) and takes the draw's minimum. A point is
      proposed with the probability that it is the best, so a range edge is
      tried about as often as the best value lies there, and most trials
      go to the edge when the best lies beyond it.

    The first trial is default Adam; the next `num_initial_points - 1` are
    random.
    """

    #: Points the posterior is drawn at: half uniform, half near the best trials.
    candidates = 1000
    #: Standard deviation (unit cube) of the candidates drawn near the best trials.
    local_scale = 0.05
    #: How many of the best trials the local candidates surround.
    local_around = 3

    def _make_gpr(self) -> Any:
        import sklearn.gaussian_process as gp

        kernel = gp.kernels.Matern(nu=2.5, length_scale_bounds=(0.1, 10.0))
        return gp.GaussianProcessRegressor(
            kernel=kernel,
            n_restarts_optimizer=2,
            normalize_y=True,
            alpha=self.alpha,
            random_state=self.seed,
        )

    def populate_space(self, trial_id: str) -> dict:
        """The next trial: the baseline, random ones, then a Thompson sample's minimum."""
        from keras_tuner.src.engine import trial as trial_module

        observed = self._observed()
        dimensions = len(self._nonfixed_space())
        initial = self.num_initial_points or max(3 * dimensions, 3)
        scored = [score for _, score in observed if score is not None]
        if len(observed) < initial or not scored or dimensions == 0:
            return self._random_populate_space()
        x, y = self._observations(observed)
        with warnings.catch_warnings():
            # A length scale at its lower bound (0.1) is by design, not news.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.gpr.fit(x, y)
        points = self._candidates(x, y)
        draw = self._posterior_draw(points)
        values = self._vector_to_values(points[int(np.argmin(draw))])
        return {"status": trial_module.TrialStatus.RUNNING, "values": values}

    def _candidates(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Unit-cube points: half uniform, half normal around the best observed points.

        A local point that falls outside the cube is reflected back into it
        (not clipped, which would put it exactly on the edge).
        """
        bounds = self._get_hp_bounds()
        rng = self._random_state
        uniform = rng.uniform(bounds[:, 0], bounds[:, 1], size=(self.candidates // 2, len(bounds)))
        best = x[np.argsort(y)[: self.local_around]]
        centres = best[rng.randint(len(best), size=self.candidates - len(uniform))]
        local = centres + rng.normal(scale=self.local_scale, size=centres.shape)
        low, span = bounds[:, 0], bounds[:, 1] - bounds[:, 0]
        folded = np.mod(local - low, 2 * span)
        local = low + np.where(folded > span, 2 * span - folded, folded)
        return np.concatenate([uniform, local])

    def _posterior_draw(self, points: np.ndarray) -> np.ndarray:
        """One joint draw of the fitted process at `points`."""
        import scipy.linalg

        mean, covariance = self.gpr.predict(points, return_cov=True)
        jitter = 1e-9 * max(float(np.mean(np.diag(covariance))), 1e-12)
        for _ in range(6):
            try:
                factor = scipy.linalg.cholesky(
                    covariance + jitter * np.eye(len(points)), lower=True
                )
                break
            except np.linalg.LinAlgError:
                jitter *= 100
        else:  # no factor at any jitter: draw each point on its own
            factor = np.diag(np.sqrt(np.clip(np.diag(covariance), 0, None)))
        return mean + factor @ self._random_state.standard_normal(len(points))

    def _observed(self) -> list[tuple[Any, float | None]]:
        """The finished trials and their scores (None for a failed trial), for the model.

        The scores are the trials' settled scores if every completed trial
        has one, else their best epochs' (see the class docstring).
        """
        completed = [t for t in self.trials.values() if t.status == "COMPLETED"]
        settled = all(t.metrics.exists(SETTLED_METRIC) for t in completed)
        observed = []
        for trial in self.trials.values():
            if trial.status == "COMPLETED":
                score = trial.metrics.get_last_value(SETTLED_METRIC) if settled else trial.score
                observed.append((trial, score))
            elif trial.status == "FAILED":
                observed.append((trial, None))
        return observed

    def _observations(
        self, observed: list[tuple[Any, float | None]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit-cube points and (log) scores of `_observed` trials; failures at the worst score."""
        points, scores, failed = [], [], []
        sign = -1.0 if self.objective.direction == "max" else 1.0
        for trial, score in observed:
            vector = []
            for hp in self._nonfixed_space():
                if trial.hyperparameters.is_active(hp) and hp.name in trial.hyperparameters.values:
                    value = trial.hyperparameters.values[hp.name]
                else:
                    value = hp.default
                vector.append(hp.value_to_prob(value))
            if score is None or not np.isfinite(score):
                failed.append(vector)
                continue
            points.append(vector)
            scores.append(sign * float(score))
        y = np.asarray(scores, dtype=float)
        if sign > 0 and len(y) and y.min() > 0:
            y = np.log(y)
        worst = y.max()
        x = np.asarray(points + failed, dtype=float)
        return x, np.concatenate([y, np.full(len(failed), worst)])


def seed_oracle(oracle: keras_tuner.Oracle, seed: int) -> None:
    """Give a fresh oracle exactly `seed`; KerasTuner replaces 0 with a random seed."""
    oracle.seed = seed
    oracle._seed_state = seed
    if isinstance(oracle, keras_tuner.oracles.BayesianOptimizationOracle):
        oracle._random_state = np.random.RandomState(seed)
        oracle.gpr = oracle._make_gpr()
