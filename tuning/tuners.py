"""KerasTuner tuners for Adam: trial timing and reports, and a Hyperband that keeps Adam's state.

`make_tuner` builds one of four searches by name (`TUNERS`). All share
`AdamTuner`, which times every trial (`trial_<id>/seconds.json`, so resumed
and distributed searches keep their times) and reports each finished trial
to a callback.

Hyperband trains a promising configuration further by starting a new trial
from the old one's best-epoch checkpoint. Keras 3 weight files hold the
optimizer's variables too, but KerasTuner's `Hyperband` loads them into an
optimizer that is not built yet, and `keras.optimizers.Adam` then skips them
with a warning: Adam restarts with zero moments at step 1, and its bias
correction treats the continued run as brand new. `AdamHyperband` builds
the optimizer before loading, so a continued trial resumes Adam's moments
and step counter exactly. (`keras_adam.Adam` also keeps state loaded before
it is built and restores it in `build`, so KerasTuner's own `Hyperband`
carries it as well.)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
import keras_tuner
import numpy as np
from keras_tuner.src.engine import tuner_utils
from sklearn.exceptions import ConvergenceWarning

from tuning.results import atomic_open

#: Tuner names accepted by `make_tuner` and the `--tuner` option.
TUNERS = ("random", "bayesian", "hyperband", "grid")

SECONDS_FILE = "seconds.json"
#: Each trial's per-epoch logs (`History.history`), beside KerasTuner's `trial.json`.
HISTORY_FILE = "history.json"


class AdamTuner(keras_tuner.Tuner):
    """A `keras_tuner.Tuner` that times trials and reports each one as it ends.

    Args:
        oracle: The KerasTuner oracle (the search algorithm).
        hypermodel: The `tuning.AdamHyperModel`.
        on_trial_end: Called with `(tuner, trial_id, seconds)` after each
            trial has been recorded by the oracle, or None.
        on_trial_begin: Called with `(tuner, trial)` as a trial starts, or None.
        **kwargs: `keras_tuner.Tuner` arguments (directory, project_name,
            overwrite, ...).
    """

    def __init__(
        self,
        oracle: keras_tuner.Oracle,
        hypermodel: keras_tuner.HyperModel,
        *,
        on_trial_end: Callable[[AdamTuner, str, float], None] | None = None,
        on_trial_begin: Callable[[AdamTuner, Any], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """See the class docstring."""
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)
        self._report_end = on_trial_end
        self._report_begin = on_trial_begin
        self._started = 0.0

    def on_trial_begin(self, trial: Any) -> None:
        """Start the trial's clock."""
        super().on_trial_begin(trial)
        # Nothing of the previous trial is recorded for this one if it fails before `fit`.
        for name in ("fit_seconds", "history"):
            if hasattr(self.hypermodel, name):
                setattr(self.hypermodel, name, None)
        self._started = time.perf_counter()
        if self._report_begin is not None:
            self._report_begin(self, trial)

    #: Whether trials save their best epoch's weights (only Hyperband reads them back).
    checkpoints = False

    def search(self, *args: Any, **kwargs: Any) -> None:
        """KerasTuner's search, with the heap alive at its start frozen (see `frozen_heap`)."""
        with frozen_heap():
            super().search(*args, **kwargs)

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        """Build and train the trial's model; KerasTuner's own, less the checkpoint it never reads.

        KerasTuner saves the model's weights at every improving epoch of
        every trial, for `get_best_models`; `search` never calls it, and
        the writes are most of KerasTuner's per-trial cost on small models.
        """
        if self.checkpoints:
            return super().run_trial(trial, *args, **kwargs)
        original = kwargs.pop("callbacks", [])
        callbacks = self._deepcopy_callbacks(original)
        self._configure_tensorboard_dir(callbacks, trial, 0)
        callbacks.append(tuner_utils.TunerCallback(self, trial))
        return [self._build_and_fit_model(trial, *args, **copy.copy(kwargs), callbacks=callbacks)]

    def on_trial_end(self, trial: Any) -> None:
        """Record the trial's seconds and epochs, let the oracle score it, then report it."""
        seconds = time.perf_counter() - self._started
        directory = self.get_trial_dir(trial.trial_id)
        fit_seconds = getattr(self.hypermodel, "fit_seconds", None)
        with atomic_open(os.path.join(directory, SECONDS_FILE)) as f:
            json.dump({"seconds": seconds, "fit_seconds": fit_seconds}, f)
        history = getattr(self.hypermodel, "history", None)
        if history is not None:
            with atomic_open(os.path.join(directory, HISTORY_FILE)) as f:
                json.dump(history, f, allow_nan=True)
        super().on_trial_end(trial)
        if self._report_end is not None:
            self._report_end(self, trial.trial_id, seconds)

    def trial_seconds(self, trial_id: str, key: str = "seconds") -> float | None:
        """Seconds the trial took (`key="fit_seconds"`: in `fit`), or None if unknown."""
        seconds = self._trial_file(trial_id, SECONDS_FILE)
        try:
            return float(seconds[key])
        except (KeyError, TypeError, ValueError):
            return None

    def trial_history(self, trial_id: str) -> dict | None:
        """The trial's per-epoch logs, e.g. `{"val_loss": [...]}`, or None if unknown."""
        history = self._trial_file(trial_id, HISTORY_FILE)
        return history if isinstance(history, dict) else None

    def _trial_file(self, trial_id: str, name: str) -> Any:
        """The JSON content of a file in the trial's folder, or None if missing or unreadable."""
        try:
            with open(os.path.join(self.project_dir, f"trial_{trial_id}", name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


class AdamHyperband(AdamTuner):
    """Hyperband whose continued trials resume Adam's moments and step counter.

    Takes the same arguments as `AdamTuner`, with a
    `keras_tuner.oracles.HyperbandOracle`.
    """

    checkpoints = True

    def run_trial(self, trial: Any, *fit_args, **fit_kwargs) -> Any:
        """Train for the epochs the Hyperband bracket gives this trial."""
        values = trial.hyperparameters.values
        if "tuner/epochs" in values:
            fit_kwargs["epochs"] = values["tuner/epochs"]
            fit_kwargs["initial_epoch"] = values["tuner/initial_epoch"]
        return super().run_trial(trial, *fit_args, **fit_kwargs)

    def _build_hypermodel(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        model = super()._build_hypermodel(hp)
        previous = hp.values.get("tuner/trial_id")
        if previous is not None:
            # The previous trial's best epoch: weights and, built first so that
            # they load now and are checked now, Adam's variables.
            if not model.built:
                model.build_from_config(json.loads(_read(self._get_build_config_fname(previous))))
            model.optimizer.build(model.trainable_variables)
            model.load_weights(self._get_checkpoint_fname(previous))
        return model


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
    at a time; failed trials are left out. Measured on our problems
    (`benchmarks/tuning_search.py`), half its model-guided trials landed
    exactly on a range edge, and the proposal took a fifth of the search's
    time. Expected improvement, maximized the same way, still put 21-32% of
    them there: σ is largest at the boundary (its points have data on one
    side only), and a maximizer started inside climbs to the bound. Neither
    bounded length scales, a fitted noise term, a pessimistic prior mean
    nor a Latin-hypercube start changed that (34-39% in simulation), and
    without the polishing step the same trials land just inside the edge.

    This oracle:

    - fits the process to log(score) for positive minimized scores (losses
      spanning decades: a few bad trials no longer flatten the rest), and
      counts a failed trial as the worst score seen;
    - bounds its length scales below (0.1 of the unit cube), and refits the
      kernel from 2 restarts, not 20;
    - proposes by Thompson sampling: it draws one function from the
      posterior over `candidates` points (half uniform in the space, half
      near the best trials so far) and takes the draw's minimum. A point is
      proposed with the probability that it is the best, so a range edge is
      tried about as often as the best value lies there: 0-7% of guided
      trials on an edge on the benchmark's problems, and in simulation
      28% within 3% of one (36% for expected improvement) with the same
      best scores, and most trials at the edge when the best lies beyond it.

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

        completed = [t for t in self.trials.values() if t.status == "COMPLETED"]
        finished = [t for t in self.trials.values() if t.status in ("COMPLETED", "FAILED")]
        dimensions = len(self._nonfixed_space())
        initial = self.num_initial_points or max(3 * dimensions, 3)
        if len(finished) < initial or not completed or dimensions == 0:
            return self._random_populate_space()
        x, y = self._observations()
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

    def _observations(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit-cube points and (log) scores of finished trials; failures at the worst score."""
        points, scores, failed = [], [], []
        sign = -1.0 if self.objective.direction == "max" else 1.0
        for trial in self.trials.values():
            if trial.status not in ("COMPLETED", "FAILED"):
                continue
            vector = []
            for hp in self._nonfixed_space():
                if trial.hyperparameters.is_active(hp) and hp.name in trial.hyperparameters.values:
                    value = trial.hyperparameters.values[hp.name]
                else:
                    value = hp.default
                vector.append(hp.value_to_prob(value))
            score = trial.score if trial.status == "COMPLETED" else None
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


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive on entry out of garbage collection until exit.

    KerasTuner runs two full garbage collections before building each trial's
    model (`keras.backend.clear_session()` and `gc.collect()`), as the
    comparison runs one per run. With TensorFlow, Keras and KerasTuner loaded
    the heap holds some 450 000 objects, and each collection takes about
    0.3 s: on the bundled datasets a fifth of a search's wall time. Freezing
    (`gc.freeze`) moves the objects alive on entry to a generation the
    collector skips, so each collection walks only what was created since
    (an empty collection takes microseconds), and every trial's garbage is
    still freed before the next trial. On exit they are unfrozen, so anything that became garbage
    meanwhile is collected as usual. If the caller froze the heap already,
    this changes nothing.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def seed_oracle(oracle: keras_tuner.Oracle, seed: int) -> None:
    """Give a fresh oracle exactly `seed`; KerasTuner replaces 0 with a random seed."""
    oracle.seed = seed
    oracle._seed_state = seed
    if isinstance(oracle, keras_tuner.oracles.BayesianOptimizationOracle):
        oracle._random_state = np.random.RandomState(seed)
        oracle.gpr = oracle._make_gpr()


def make_oracle(
    name: str,
    *,
    objective: Any,
    max_trials: int | None,
    epochs: int,
    seed: int,
) -> keras_tuner.Oracle:
    """The oracle (search algorithm) for a tuner name.

    Args:
        name: One of `TUNERS`.
        objective: The KerasTuner objective.
        max_trials: The trial budget. Hyperband sets its own number of
            trials from `epochs`; `max_trials` then caps it.
        epochs: Training epochs per trial (Hyperband's most).
        seed: The search's seed; 0 is a seed like any other.

    Returns:
        The oracle, seeded.
    """
    if name not in TUNERS:
        raise ValueError(
            f"Argument `tuner` must be one of {', '.join(TUNERS)}. Received: tuner={name!r}"
        )
    # Diverging trials fail (and are recorded) without stopping the search.
    common = {
        "objective": objective,
        "seed": seed or None,
        "max_consecutive_failed_trials": 10**9,
    }
    # Each starts with default Adam (GridSearch's first point is the defaults already).
    if name == "random":
        oracle = RandomOracle(max_trials=max_trials, **common)
    elif name == "bayesian":
        oracle = BayesianOracle(max_trials=max_trials, **common)
    elif name == "grid":
        oracle = keras_tuner.oracles.GridSearchOracle(max_trials=max_trials, **common)
    else:
        oracle = HyperbandOracle(max_epochs=max(epochs, 2), **common)
        oracle.max_trials = max_trials
    seed_oracle(oracle, seed)
    return oracle


def make_tuner(name: str, hypermodel: keras_tuner.HyperModel, **kwargs: Any) -> AdamTuner:
    """An `AdamTuner` (or `AdamHyperband` for "hyperband") around the named oracle.

    Args:
        name: One of `TUNERS`.
        hypermodel: The `tuning.AdamHyperModel`.
        **kwargs: `make_oracle` arguments (objective, max_trials, epochs,
            seed) and `AdamTuner` arguments (directory, project_name,
            overwrite, on_trial_end, on_trial_begin).

    Returns:
        The tuner; if its project directory holds a search and `overwrite`
        is false, the search is reloaded and resumes.
    """
    oracle_args = {k: kwargs.pop(k) for k in ("objective", "max_trials", "epochs", "seed")}
    oracle = make_oracle(name, **oracle_args)
    cls = AdamHyperband if name == "hyperband" else AdamTuner
    return cls(oracle, hypermodel, **kwargs)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
