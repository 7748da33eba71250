"""A search in TensorBoard: each trial's curves and hyperparameters, in the HParams dashboard.

`tuning.search(..., tensorboard=DIR)` and `keras-adam-tune --tensorboard
DIR` write, with `tf.summary` (TensorFlow is installed with keras-adam on
every backend, and TensorBoard with it):

- `DIR/`: the experiment (`write_experiment`): Adam's five hyperparameters
  with their ranges (a searched one's interval, a fixed one's value) and
  the metrics to compare trials by: the objective, its settled score (the
  mean of a trial's last epochs, which picks the winner) and the loss;
- `DIR/trial_<id>/`, one run per trial (`TrialLog`): the trial's
  hyperparameters as `keras_adam.Adam` arguments, every scalar of Keras's
  logs at every epoch, under Keras's names ("loss", "val_loss",
  "val_accuracy", ...), and at the end the settled score
  (`SETTLED_TAG`).

`tensorboard --logdir DIR` then shows the curves in Scalars and one row per
trial in HParams, sortable by any metric. A resumed search adds the runs of
its new trials; a trial that Hyperband continues is a run of its own, its
epochs numbered on from where the earlier one stopped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from tuning.records import SETTLED_EPOCHS, settled_score
from tuning.space import NAMES, AdamSearchSpace

#: The tag of a trial's settled score, written once at its last epoch.
SETTLED_TAG = "settled"


def _summary() -> tuple[Any, Any]:
    """`tf` and TensorBoard's HParams API, imported when first written."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    return tf, hparams_api


def _number(value: float | None) -> float:
    """A hyperparameter's value for TensorBoard: `weight_decay=None` (no decay) is 0."""
    return 0.0 if value is None else float(value)


def run_directory(directory: str, trial_id: str) -> str:
    """A trial's run: `directory/trial_<id>`, as KerasTuner names its trials' folders."""
    return os.path.join(directory, f"trial_{trial_id}")


def write_experiment(directory: str, space: AdamSearchSpace, objective: str) -> None:
    """Write the experiment's hyperparameters and metrics to `directory` (the HParams config).

    Args:
        directory: The search's TensorBoard directory.
        space: The search space (after `for_budget`: what it searches).
        objective: The objective's name, e.g. "val_loss".
    """
    tf, hparams_api = _summary()
    tuned = space.tuned_names()
    hparams = []
    for name in NAMES:
        if name in tuned:
            low, high = getattr(space, name)
            domain = hparams_api.RealInterval(float(low), float(high))
        else:
            domain = hparams_api.Discrete([_number(space.fixed_value(name))])
        hparams.append(hparams_api.HParam(name, domain))
    metrics = [
        hparams_api.Metric(objective, display_name=f"{objective} (epoch)"),
        hparams_api.Metric(
            SETTLED_TAG, display_name=f"{objective}, mean of last {SETTLED_EPOCHS} epochs"
        ),
    ]
    if objective != "loss":
        metrics.append(hparams_api.Metric("loss", display_name="loss (training)"))
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
        hparams_api.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()


class TrialLog(keras.callbacks.Callback):
    """One trial's run: its hyperparameters, then its logs at every epoch and its settled score.

    Args:
        directory: The search's TensorBoard directory.
        trial_id: KerasTuner's id of the trial.
        hyperparameters: The trial's `keras_adam.Adam` arguments (`weight_decay`
            None, no decay, is written as 0).
        objective: The objective's name; its settled score is written at
            the end.
        earlier: The objective at the trial's earlier epochs, when this
            training continues it (an ASHA trial's next rung): the run then
            goes on where it stopped, its settled score counts those
            epochs, and the hyperparameters are not written again.
    """

    def __init__(
        self,
        directory: str,
        trial_id: str,
        hyperparameters: Mapping[str, float | None],
        objective: str,
        earlier: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.earlier = [float(v) for v in earlier]
        self.directory = run_directory(directory, trial_id)
        self.trial_id = str(trial_id)
        self.hyperparameters = {name: _number(value) for name, value in hyperparameters.items()}
        self.objective = objective
        self._writer: Any = None
        self._values: list[float] = []
        self._last_epoch = 0

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        """Open the run and write the trial's hyperparameters."""
        tf, hparams_api = _summary()
        self._writer = tf.summary.create_file_writer(self.directory)
        self._values = list(self.earlier)
        if not self.earlier:
            with self._writer.as_default():
                hparams_api.hparams(self.hyperparameters, trial_id=self.trial_id)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Write every scalar of the epoch's logs."""
        tf, _ = _summary()
        logs = logs or {}
        with self._writer.as_default():
            for name, value in logs.items():
                if np.ndim(value) == 0:
                    tf.summary.scalar(name, float(value), step=epoch)
        if self.objective in logs:
            self._values.append(float(logs[self.objective]))
        self._last_epoch = epoch

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        """Write the settled score and close the run."""
        self.close()

    def close(self) -> None:
        """Write the settled score (if the objective has finite last epochs) and close the run."""
        if self._writer is None:
            return
        tf, _ = _summary()
        settled = settled_score(self._values)
        if settled is not None and math.isfinite(settled):
            with self._writer.as_default():
                tf.summary.scalar(SETTLED_TAG, settled, step=self._last_epoch)
        self._writer.close()
        self._writer = None


def tags(run: str) -> dict[str, Sequence[tuple[int, float]]]:
    """Every scalar of a run, as `{tag: [(step, value), ...]}`, read back from its event files.

    For tests and for people checking what a search wrote.
    """
    tf, _ = _summary()
    found: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(run)):
        if not name.startswith("events.out.tfevents"):
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(run, name)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tf.make_ndarray(value.tensor))
                    found.setdefault(value.tag, []).append((int(event.step), number))
    return found
