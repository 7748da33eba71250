"""How a search's trials are shown and written: the table, `trials.csv`, `trials.png`.

- `format_trials`: the trials as a fixed-width table (`SearchResult.table`);
- `trial_line`: one line per finished trial, as `keras-adam-tune` prints them;
- `write_trials_csv`: `trials.csv`, one row per trial in trial order:
  `trial_id, status, learning_rate, beta_1, beta_2`, the other searched
  hyperparameters, `score, settled, seconds`, and `reason` (why a trial
  failed, else empty);
- `plot_trials`: `trials.png`, the score against η, β1 and β2 (log scales;
  β as 1 − β);
- `atomic_open`: every file of a search is written whole or not at all.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Iterator, Sequence
from typing import IO, Any

from tuning.records import SETTLED_EPOCHS, TrialRecord, best_trial
from tuning.space import NAMES


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
        "epochs",
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
                "epochs": "" if trial.epochs is None else str(trial.epochs),
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
    header += f"  {objective:>12}  {settled:>8}  {'epochs':>6}  {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for trial in trials:
        cells = "  ".join(f"{trial.hyperparameters.get(n, float('nan')):>13.6g}" for n in names)
        score = "—" if trial.score is None else f"{trial.score:.4f}"
        mean = "—" if trial.settled is None else f"{trial.settled:.4f}"
        seconds = "—" if trial.seconds is None else f"{trial.seconds:.1f}"
        epochs = "—" if trial.epochs is None else str(trial.epochs)
        line = f"{trial.trial_id:>5}  {trial.status:9}  {cells}  {score:>12}  {mean:>8}"
        line += f"  {epochs:>6}  {seconds:>7}"
        if trial.reason:
            line += f"  {trial.reason}"
        lines.append(line)
    return "\n".join(lines)


def trial_line(
    trial: TrialRecord, tuned: Sequence[str], objective: str, total: Any, *, epochs: bool = False
) -> str:
    """One line for a finished trial: number, hyperparameters, score (and settled), seconds.

    With `epochs`, the line also tells how many epochs the trial has
    trained (an ASHA trial ends once per rung).
    """
    number = int(trial.trial_id) + 1 if trial.trial_id.isdigit() else trial.trial_id
    of = f"/{total}" if total else ""
    values = " ".join(f"{n}={trial.hyperparameters[n]:.4g}" for n in NAMES if n in tuned)
    score = f"{objective}={trial.score:.4f}" if trial.score is not None else trial.status.lower()
    if trial.settled is not None:
        score += f" (last {SETTLED_EPOCHS}: {trial.settled:.4f})"
    if epochs and trial.epochs is not None:
        score += f" after {trial.epochs} epoch{'s' * (trial.epochs != 1)}"
    seconds = "" if trial.seconds is None else f" {trial.seconds:.1f}s"
    reason = f" ({trial.reason})" if trial.reason else ""
    return f"trial {number}{of}  {values}  {score}{seconds}{reason}"


def trial_value(trial: TrialRecord, name: str) -> float:
    """A trial's value of one hyperparameter."""
    return float(trial.hyperparameters[name])


def plot_trials(path: str, trials: Sequence[TrialRecord], objective: str, direction: str) -> None:
    """Scatter the completed trials' scores against η, 1 − β1 and 1 − β2 (log x axes).

    The score is the one the winner is chosen by (`best_trial`): each
    trial's settled score (its objective's mean over the last
    `SETTLED_EPOCHS` epochs), or its best epoch's if a trial has none.
    When the trials trained different numbers of epochs (ASHA stops most
    of them early), each number has its own colour, so the plot shows
    where each trial stopped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.score is not None and math.isfinite(t.score)]
    best = best_trial(trials, direction)
    settled = bool(done) and all(t.settled is not None for t in done)

    def shown(trial: TrialRecord) -> float:
        return trial.settled if settled else trial.score

    groups = sorted({t.epochs for t in done}, key=lambda e: -1 if e is None else e)
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
        for index, group in enumerate(groups):
            members = [t for t in done if t.epochs == group]
            axis.scatter(
                [x_of(t) for t in members],
                [shown(t) for t in members],
                s=22,
                alpha=0.8,
                color=f"C{index + (index >= 3)}",  # C3 marks the winner
                label=None if len(groups) == 1 else f"{group} epochs",
            )
        if best is not None:
            axis.scatter([x_of(best)], [shown(best)], s=90, marker="*", color="C3", label="winner")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.grid(True, which="both", alpha=0.3)
    scores = [shown(t) for t in done]
    if scores and min(scores) > 0 and max(scores) / min(scores) > 20:
        axes[0].set_yscale("log")  # shared: losses spanning decades
    which = f"mean of last {SETTLED_EPOCHS} epochs" if settled else "best epoch"
    axes[0].set_ylabel(f"{objective}, {which}")
    if best is not None and any(a.get_legend_handles_labels()[0] for a in axes):
        next(a for a in axes if a.get_legend_handles_labels()[0]).legend(loc="best")
    failed = len(trials) - len(done)
    figure.suptitle(
        f"{len(done)} completed trials" + (f", {failed} failed (not shown)" if failed else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
