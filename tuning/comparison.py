"""The tuned optimizer against default Adam: `compare` runs both, `Comparison` judges them.

The search's winner is trained again beside default Adam, from initial
weights the search never saw, and both are scored on data that took no
part in selecting it (see `Comparison`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import keras_tuner
import numpy as np

from tuning.hypermodel import AdamHyperModel, DivergenceGuard
from tuning.space import DEFAULTS
from tuning.tuners import frozen_heap

#: How `Comparison.held_out` names the data the two optimizers are judged on.
HELD_OUT = {
    "test_data": "the test data",
    "holdout": "data held out of the search",
    "validation": "the validation data that chose the winner (optimistic: pass test_data)",
}

#: The verdict when tuning did not beat default Adam by more than the spread.
NOT_BETTER = "default Adam was as good or better on held-out data"


@dataclass(frozen=True)
class Comparison:
    """The tuned optimizer against default Adam, judged on data that took no part in selection.

    Each side trains `repeats` times from initial weights the search never
    saw (seeds `seed + 1`, `seed + 2`, ...; repeat r of both sides shares
    its weights), with the search's data, epochs and callbacks. Each run
    keeps its weights from the epoch the validation objective was best (as
    trials are scored), and is then scored on the held-out data: the test
    data when given, else a part of the training data held out of the
    search (`held_out` says which).

    Tuned wins only if its mean beats default Adam's by more than the
    run-to-run spread (the larger of the two sides' standard deviations):
    otherwise the verdict is that default Adam was as good or better.

    Attributes:
        objective: The search's objective, e.g. "val_loss".
        metric: What is compared on the held-out data, e.g. "loss".
        direction: "min" or "max".
        held_out: "test_data", "holdout" or "validation" (see `HELD_OUT`).
        tuned_scores: The held-out `metric` of each tuned run.
        default_scores: The same for `keras_adam.Adam()` with Keras's
            defaults (η=1e-3, β1=0.9, β2=0.999, ε̂=1e-7) and the search's
            fixed options.
        tuned_metrics: Mean of the tuned runs' other metrics: validation
            (`val_*`) at the kept epoch, and `test_*` on the held-out data.
        default_metrics: The same for default Adam.
    """

    objective: str
    metric: str
    direction: str
    held_out: str
    tuned_scores: tuple[float, ...]
    default_scores: tuple[float, ...]
    tuned_metrics: dict
    default_metrics: dict

    @property
    def tuned_score(self) -> float:
        """Mean held-out score of the tuned optimizer (NaN if a run diverged)."""
        return _mean(self.tuned_scores)

    @property
    def default_score(self) -> float:
        """Mean held-out score of default Adam."""
        return _mean(self.default_scores)

    @property
    def tuned_spread(self) -> float:
        """Standard deviation of the tuned runs' scores (0 for one run)."""
        return _std(self.tuned_scores)

    @property
    def default_spread(self) -> float:
        """Standard deviation of default Adam's scores (0 for one run)."""
        return _std(self.default_scores)

    @property
    def spread(self) -> float:
        """The run-to-run spread a difference must exceed: the larger standard deviation."""
        return max(self.tuned_spread, self.default_spread)

    @property
    def gain(self) -> float:
        """How much better the tuned mean is (positive: tuned better), in `metric` units."""
        gain = self.default_score - self.tuned_score
        return gain if self.direction == "min" else -gain

    @property
    def tuned_is_better(self) -> bool:
        """Whether tuned beats default Adam on held-out data by more than the spread."""
        if math.isnan(self.tuned_score):
            return False
        if math.isnan(self.default_score):
            return True
        return self.gain > self.spread

    @property
    def verdict(self) -> str:
        """One plain sentence: which optimizer to use, and why."""
        n = len(self.tuned_scores)
        where = HELD_OUT.get(self.held_out, self.held_out)
        numbers = (
            f"{self.metric} {self.tuned_score:.4g} ± {self.tuned_spread:.2g} (tuned) against "
            f"{self.default_score:.4g} ± {self.default_spread:.2g} (default), "
            f"{n} run{'s' if n != 1 else ''} each on {where}"
        )
        if self.tuned_is_better:
            return f"tuned Adam was better on held-out data, by more than the spread: {numbers}"
        if self.gain > 0:
            return (
                f"{NOT_BETTER}: tuned's lead ({self.gain:.2g}) is within the run-to-run spread "
                f"({self.spread:.2g}): {numbers}"
            )
        return f"{NOT_BETTER}: {numbers}"

    def summary(self) -> str:
        """A few lines comparing the two, ending with the verdict, for a terminal."""
        keys = self._keys()
        width = max(12, len(self.metric) + 5)
        header = f"{'':9} {('held-out ' + self.metric):>{width + 10}}  "
        lines = [header + "  ".join(f"{k:>14}" for k in keys)]
        for label, score, spread, metrics in (
            ("tuned", self.tuned_score, self.tuned_spread, self.tuned_metrics),
            ("default", self.default_score, self.default_spread, self.default_metrics),
        ):
            cells = "  ".join(f"{metrics.get(k, float('nan')):>14.4f}" for k in keys)
            value = f"{score:.4f} ± {spread:.4f}"
            lines.append(f"{label:9} {value:>{width + 10}}  {cells}")
        n = len(self.tuned_scores)
        where = {"holdout": "held out of the search", "test_data": "the test data"}
        lines.append(
            f"(mean ± standard deviation of {n} run{'s' if n != 1 else ''} each from initial "
            f"weights the search never saw, scored on "
            f"{where.get(self.held_out, HELD_OUT[self.held_out])})"
        )
        lines.append(f"Verdict: {self.verdict}")
        return "\n".join(lines)

    def _keys(self) -> list[str]:
        return sorted(k for k in self.tuned_metrics if k != f"test_{self.metric}")

    def to_json(self) -> dict:
        """A JSON-ready dict."""

        def side(scores: tuple, mean: float, spread: float, metrics: dict) -> dict:
            return {"score": mean, "spread": spread, "scores": list(scores), "metrics": metrics}

        return {
            "objective": self.objective,
            "metric": self.metric,
            "direction": self.direction,
            "held_out": self.held_out,
            "tuned": side(
                self.tuned_scores, self.tuned_score, self.tuned_spread, self.tuned_metrics
            ),
            "default": side(
                self.default_scores, self.default_score, self.default_spread, self.default_metrics
            ),
            "tuned_is_better": self.tuned_is_better,
            "verdict": self.verdict,
        }


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) != len(values) or not finite:
        return float("nan")
    return sum(finite) / len(finite)


def _std(values: Sequence[float]) -> float:
    mean = _mean(values)
    if math.isnan(mean) or len(values) < 2:
        return 0.0 if not math.isnan(mean) else float("nan")
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


class _KeepBestEpoch(keras.callbacks.Callback):
    """Restores the weights of the epoch whose monitored value was best, when training ends."""

    def __init__(self, objective: keras_tuner.Objective) -> None:
        super().__init__()
        self.objective = objective
        self.best: float | None = None
        self.weights: list | None = None
        self.logs: dict = {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.objective.name)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        better = self.best is None or (
            value < self.best if self.objective.direction == "min" else value > self.best
        )
        if better:
            self.best, self.weights = value, self.model.get_weights()
            self.logs = {k: float(v) for k, v in (logs or {}).items()}

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.weights is not None:
            self.model.set_weights(self.weights)


def compare(
    hypermodel: AdamHyperModel,
    hp: keras_tuner.HyperParameters,
    tuned: Mapping[str, Any],
    fit_kwargs: tuple[tuple, dict],
    *,
    objective: keras_tuner.Objective,
    repeats: int,
    seed: int,
    test_data: tuple | None = None,
    held_out: str | None = None,
) -> Comparison:
    """Train the tuned optimizer and default Adam the same way and judge both on held-out data.

    Repeat `r` builds the model (with the best trial's model hyperparameters
    `hp`) from seed `seed + 1 + r`, initial weights the search never saw,
    once per optimizer; trains it with `fit_kwargs`; keeps the weights of
    the epoch whose validation objective was best (as trials are scored);
    and scores it on `test_data`. Without `test_data`, runs are scored on
    the validation objective itself (optimistic: it chose the winner).

    Args:
        hypermodel: The search's hypermodel.
        hp: The best trial's hyperparameters (for model hyperparameters).
        tuned: The tuned optimizer's five hyperparameters.
        fit_kwargs: `(args, kwargs)` for `Model.fit`, as in the trials.
        objective: The search's objective.
        repeats: Runs per optimizer.
        seed: The search's seed.
        test_data: `(x, y)` held out of the search, or None.
        held_out: What `test_data` is ("test_data" or "holdout"); ignored
            without `test_data`.

    Returns:
        The `Comparison`.
    """
    if test_data is None:
        held_out = "validation"
    held_out = held_out or "test_data"
    if held_out not in HELD_OUT:
        raise ValueError(f"Argument `held_out` must be one of {', '.join(HELD_OUT)}.")
    name = objective.name
    metric = name[4:] if held_out != "validation" and name.startswith("val_") else name
    args, kwargs = fit_kwargs
    scores: dict = {"tuned": [], "default": []}
    metrics: dict = {"tuned": [], "default": []}
    runs = [
        (repeat, label, values)
        for repeat in range(repeats)
        for label, values in (("tuned", dict(tuned)), ("default", dict(DEFAULTS)))
    ]
    with frozen_heap():
        for repeat, label, values in runs:
            keras.backend.clear_session()
            model = hypermodel.build_compiled(hp.copy(), seed=seed + 1 + repeat, values=values)
            guard, keep = DivergenceGuard(), _KeepBestEpoch(objective)
            run_kwargs = dict(kwargs, callbacks=[*kwargs["callbacks"], guard, keep])
            model.fit(*args, **run_kwargs)
            logs = {k: v for k, v in keep.logs.items() if k.startswith("val_")}
            score = float("nan")
            if guard.reason is None and keep.weights is not None:
                if test_data is None:
                    score = keep.best
                else:
                    evaluated = model.evaluate(*test_data, verbose=0, return_dict=True)
                    logs.update({f"test_{k}": float(v) for k, v in evaluated.items()})
                    score = float(evaluated.get(metric, float("nan")))
            scores[label].append(score)
            metrics[label].append(logs)
    return Comparison(
        objective=name,
        metric=metric,
        direction=objective.direction,
        held_out=held_out,
        tuned_scores=tuple(scores["tuned"]),
        default_scores=tuple(scores["default"]),
        tuned_metrics=_mean_metrics(metrics["tuned"]),
        default_metrics=_mean_metrics(metrics["default"]),
    )


def _mean_metrics(runs: list[dict]) -> dict:
    keys = sorted({k for run in runs for k in run})
    return {
        k: float(np.mean([run.get(k, float("nan")) for run in runs])) if runs else float("nan")
        for k in keys
    }
