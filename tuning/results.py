"""What a search returns and writes: trials, the best optimizer, its comparison with default Adam.

Files written by `SearchResult.write` into the project directory:

- `best.json`: the best hyperparameters, a `keras_adam.Adam` config
  (`keras_adam.Adam.from_config(best["optimizer"])` rebuilds it), the
  objective and its score, the number of trials, default Adam's held-out
  score (`baseline`), the comparison of both on held-out data, and the
  `verdict` ("use": "tuned" or "default", and a sentence);
- `trials.csv`: one row per trial in trial order: `trial_id, status,
  learning_rate, beta_1, beta_2`, the other searched hyperparameters,
  `score, settled, seconds`, and `reason` (why a trial failed, else empty);
- `trials.png`: the score against η, β1 and β2 (log scales; β as 1 − β).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import keras_adam
from tuning.space import NAMES


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search.

    Attributes:
        trial_id: KerasTuner's id ("00", "01", ...), in start order.
        status: "COMPLETED", "FAILED", "INVALID", "RUNNING" or "IDLE".
        hyperparameters: Adam's five hyperparameters in this trial
            (searched or fixed), as `keras_adam.Adam` arguments.
        score: The objective's best value over the trial's epochs, or None.
        seconds: Wall time of the trial, or None if unknown.
        reason: Why the trial failed (e.g. "diverged: loss=nan at epoch 2,
            batch 5"), else None.
        fit_seconds: The part of `seconds` spent in `Model.fit` (the rest
            builds and compiles the model and keeps KerasTuner's records),
            or None if unknown.
        settled: The objective averaged over the trial's last
            `SETTLED_EPOCHS` epochs (all of them, if fewer): where training
            settled, which picks the winner (see `best_trial`); None if
            unknown (a trial of a search saved before it was recorded).
    """

    trial_id: str
    status: str
    hyperparameters: dict
    score: float | None
    seconds: float | None
    reason: str | None = None
    fit_seconds: float | None = None
    settled: float | None = None


#: Epochs at the end of a trial whose mean objective is its `TrialRecord.settled` score.
SETTLED_EPOCHS = 5


def settled_score(values: Sequence[float] | None) -> float | None:
    """The mean of the last `SETTLED_EPOCHS` per-epoch values.

    Args:
        values: A trial's per-epoch values of the objective, or None.

    Returns:
        The mean, or None if there are no values or one of the last is not finite.
    """
    if not values:
        return None
    last = [float(v) for v in values[-SETTLED_EPOCHS:]]
    if not all(math.isfinite(v) for v in last):
        return None
    return sum(last) / len(last)


def best_trial(trials: Sequence[TrialRecord], direction: str) -> TrialRecord | None:
    """The winner of a search: the completed trial whose objective settled best.

    A trial's `score` is its best epoch: the extreme of a noisy curve, so
    the trials whose validation objective jumps most from epoch to epoch
    (large η) look best by luck, and their winners did worse on held-out
    data (`benchmarks/tuning_search.py`: on the synthetic problem the test
    loss was 0.523 by best epoch against 0.493 by the settled score, and
    0.132 against 0.070 on breast_cancer). The winner is therefore the trial
    with the best `settled` score, the mean over its last `SETTLED_EPOCHS`
    epochs; if any completed trial has no settled score (a search saved by
    an older version), the best `score` decides for all. Ties go to the
    earlier trial.

    Args:
        trials: The search's trials, in trial order.
        direction: "min" or "max".

    Returns:
        The winning trial, or None if no trial completed with a score.
    """
    done = [
        t
        for t in trials
        if t.status == "COMPLETED" and t.score is not None and math.isfinite(t.score)
    ]
    if not done:
        return None
    settled = all(t.settled is not None for t in done)
    sign = -1.0 if direction == "max" else 1.0
    return min(done, key=lambda t: sign * (t.settled if settled else t.score))


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
            chosen by its settled score, see `best_trial`).
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


def csv_columns(tuned: Sequence[str]) -> list[str]:
    """The columns of `trials.csv` for a search of `tuned`."""
    others = [n for n in NAMES if n in tuned and n not in ("learning_rate", "beta_1", "beta_2")]
    return [
        "trial_id",
        "status",
        "learning_rate",
        "beta_1",
        "beta_2",
        *others,
        "score",
        "settled",
        "seconds",
        "reason",
    ]


def write_trials_csv(path: str, trials: Sequence[TrialRecord], tuned: Sequence[str]) -> None:
    """Write one row per trial, in trial order (see the module docstring)."""
    columns = csv_columns(tuned)
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for trial in trials:
            row = {
                "trial_id": trial.trial_id,
                "status": trial.status,
                "score": "" if trial.score is None else repr(float(trial.score)),
                "settled": "" if trial.settled is None else repr(float(trial.settled)),
                "seconds": "" if trial.seconds is None else f"{trial.seconds:.3f}",
                "reason": trial.reason or "",
                **{k: "" if v is None else repr(v) for k, v in trial.hyperparameters.items()},
            }
            writer.writerow([row.get(c, "") for c in columns])


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Write `path` all at once: readers see the old file or the new, never half.

    The block writes `path + ".tmp"`, which replaces `path` when the block
    ends without an error; on an error it is removed and `path` is untouched.

    Args:
        path: The file to write.
        mode: "w" or "wb".
        **kwargs: Passed to `open` (for example `newline=""` for CSV).
    """
    temporary = path + ".tmp"
    try:
        with open(temporary, mode, **kwargs) as f:
            yield f
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def format_trials(trials: Sequence[TrialRecord], tuned: Sequence[str], objective: str) -> str:
    """A fixed-width table of trials."""
    names = [n for n in NAMES if n in tuned]
    header = f"{'trial':>5}  {'status':9}  " + "  ".join(f"{n:>13}" for n in names)
    settled = f"last {SETTLED_EPOCHS}"
    header += f"  {objective:>12}  {settled:>8}  {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for trial in trials:
        cells = "  ".join(f"{trial.hyperparameters.get(n, float('nan')):>13.6g}" for n in names)
        score = "—" if trial.score is None else f"{trial.score:.4f}"
        mean = "—" if trial.settled is None else f"{trial.settled:.4f}"
        seconds = "—" if trial.seconds is None else f"{trial.seconds:.1f}"
        line = f"{trial.trial_id:>5}  {trial.status:9}  {cells}  {score:>12}  {mean:>8}"
        line += f"  {seconds:>7}"
        if trial.reason:
            line += f"  {trial.reason}"
        lines.append(line)
    return "\n".join(lines)


def trial_line(trial: TrialRecord, tuned: Sequence[str], objective: str, total: Any) -> str:
    """One line for a finished trial: number, hyperparameters, score (and settled), seconds."""
    number = int(trial.trial_id) + 1 if trial.trial_id.isdigit() else trial.trial_id
    of = f"/{total}" if total else ""
    values = " ".join(f"{n}={trial.hyperparameters[n]:.4g}" for n in NAMES if n in tuned)
    score = f"{objective}={trial.score:.4f}" if trial.score is not None else trial.status.lower()
    if trial.settled is not None:
        score += f" (last {SETTLED_EPOCHS}: {trial.settled:.4f})"
    seconds = "" if trial.seconds is None else f" {trial.seconds:.1f}s"
    reason = f" ({trial.reason})" if trial.reason else ""
    return f"trial {number}{of}  {values}  {score}{seconds}{reason}"


def trial_value(trial: TrialRecord, name: str) -> float:
    """A trial's value of one hyperparameter."""
    return float(trial.hyperparameters[name])


def plot_trials(path: str, trials: Sequence[TrialRecord], objective: str, direction: str) -> None:
    """Scatter the completed trials' scores against η, 1 − β1 and 1 − β2 (log x axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.score is not None and math.isfinite(t.score)]
    best = best_trial(trials, direction)
    panels = (("learning_rate", "η (learning rate)"), ("beta_1", "1 − β1"), ("beta_2", "1 − β2"))
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for axis, (name, label) in zip(axes, panels, strict=True):

        def x_of(trial: TrialRecord, name: str = name) -> float:
            value = trial_value(trial, name)
            return 1.0 - value if name.startswith("beta") else value

        xs = [x_of(t) for t in done]
        if len(set(xs)) <= 1:  # not searched: one value
            fixed = f"{trial_value(done[0], name):g}" if done else "—"
            axis.text(0.5, 0.5, f"{name} fixed at {fixed}", ha="center", transform=axis.transAxes)
            axis.set_xlabel(label)
            axis.set_xticks([])
            continue
        axis.scatter(xs, [t.score for t in done], s=22, alpha=0.8)
        if best is not None:
            axis.scatter([x_of(best)], [best.score], s=90, marker="*", color="C3", label="winner")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.grid(True, which="both", alpha=0.3)
    scores = [t.score for t in done]
    if scores and min(scores) > 0 and max(scores) / min(scores) > 20:
        axes[0].set_yscale("log")  # shared: losses spanning decades
    axes[0].set_ylabel(objective)
    if best is not None and any(a.get_legend_handles_labels()[0] for a in axes):
        next(a for a in axes if a.get_legend_handles_labels()[0]).legend(loc="best")
    failed = len(trials) - len(done)
    figure.suptitle(
        f"{len(done)} completed trials" + (f", {failed} failed (not shown)" if failed else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
