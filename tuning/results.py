"""What a search returns and writes: `SearchResult`, the best optimizer and its files.

Files written by `SearchResult.write` into the project directory:

- `best.json`: the best hyperparameters, a `keras_adam.Adam` config
  (`keras_adam.Adam.from_config(best["optimizer"])` rebuilds it), the
  objective and its score, the number of trials, default Adam's held-out
  score (`baseline`), the comparison of both on held-out data, and the
  `verdict` ("use": "tuned" or "default", and a sentence);
- `trials.csv` and `trials.png`: the trials (see `tuning.output`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import keras_adam
from tuning.comparison import Comparison
from tuning.output import atomic_open, format_trials, plot_trials, write_trials_csv
from tuning.records import TrialRecord


@dataclass(frozen=True)
class SearchResult:
    """The outcome of `tuning.search`.

    Attributes:
        best_hyperparameters: Adam's five hyperparameters of the best trial,
            as `keras_adam.Adam` arguments (searched and fixed).
        optimizer_config: The `keras_adam.Adam` config of the best trial
            (with the fixed options).
        objective: The objective's name.
        direction: "min" or "max".
        score: The best trial's score (its best epoch; the winner is
            chosen by its settled score, see `tuning.records.best_trial`).
        trials: Every trial, in trial order.
        tuned: The names that were searched.
        tuner: The search algorithm's name.
        comparison: The tuned optimizer against default Adam on held-out
            data, or None if the search was run with `comparison_repeats=0`.
        project_dir: Where KerasTuner keeps the search (and where `write`
            writes by default).
        settled: The best trial's settled score (see `TrialRecord`), or None.
    """

    best_hyperparameters: dict
    optimizer_config: dict
    objective: str
    direction: str
    score: float
    trials: tuple[TrialRecord, ...]
    tuned: tuple[str, ...]
    tuner: str
    comparison: Comparison | None
    project_dir: str
    settled: float | None = None

    @property
    def optimizer(self) -> keras_adam.Adam:
        """A new, unbuilt `keras_adam.Adam` with the best hyperparameters, each time it is read.

        An optimizer holds the state of the one model it trains, so every
        `model.compile(optimizer=result.optimizer)` gets its own.
        """
        return keras_adam.Adam.from_config(dict(self.optimizer_config))

    def table(self) -> str:
        """The trials as a fixed-width table, for a terminal."""
        return format_trials(self.trials, self.tuned, self.objective)

    def to_json(self) -> dict:
        """The content of `best.json`."""
        baseline = verdict = None
        if self.comparison is not None:
            c = self.comparison
            baseline = {
                "optimizer": _jsonable(keras_adam.Adam().get_config()),
                "score": c.default_score,
                "spread": c.default_spread,
                "scores": list(c.default_scores),
                "metrics": c.default_metrics,
            }
            verdict = {
                "tuned_is_better": c.tuned_is_better,
                "use": "tuned" if c.tuned_is_better else "default",
                "message": c.verdict,
                "metric": c.metric,
                "held_out": c.held_out,
            }
        return {
            "hyperparameters": self.best_hyperparameters,
            "optimizer": _jsonable(self.optimizer_config),
            "objective": self.objective,
            "direction": self.direction,
            "score": self.score,
            "settled": self.settled,
            "trials": len(self.trials),
            "completed": sum(t.status == "COMPLETED" for t in self.trials),
            "tuned": list(self.tuned),
            "tuner": self.tuner,
            "verdict": verdict,
            "baseline": baseline,
            "comparison": None if self.comparison is None else self.comparison.to_json(),
        }

    def write(self, directory: str | None = None, *, plot: bool = True) -> dict:
        """Write `best.json`, `trials.csv` and (with `plot`) `trials.png`.

        Args:
            directory: Where to write; defaults to `project_dir`.
            plot: Whether to draw `trials.png` (needs matplotlib).

        Returns:
            The paths written, by file name.
        """
        directory = directory or self.project_dir
        os.makedirs(directory, exist_ok=True)
        paths = {name: os.path.join(directory, name) for name in ("best.json", "trials.csv")}
        with atomic_open(paths["best.json"]) as f:
            json.dump(_finite(self.to_json()), f, indent=2, allow_nan=False)
            f.write("\n")
        write_trials_csv(paths["trials.csv"], self.trials, self.tuned)
        if plot:
            paths["trials.png"] = os.path.join(directory, "trials.png")
            plot_trials(paths["trials.png"], self.trials, self.objective, self.direction)
        return paths


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _jsonable(config: dict) -> dict:
    return json.loads(json.dumps(config, default=str))
