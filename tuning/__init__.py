"""Hyperparameter search for `keras_adam.Adam` (β1, β2, η) with KerasTuner.

- `tuning.search`: run a search on a model and data; returns a
  `SearchResult` with the best hyperparameters, a ready `keras_adam.Adam`,
  the trials, and the tuned optimizer measured against default Adam
  (defined in `tuning.searching`).
- `tuning.AdamSearchSpace`: the ranges (1 − β on a log scale) and which
  parameters a trial budget can afford (`tuning.space`).
- `tuning.AdamHyperModel`: the KerasTuner HyperModel, for use with your own
  KerasTuner tuner (`tuning.hypermodel`).
- `tuning.lr_range_test`: Smith's learning-rate range test, to narrow η.
- `tuning.datasets`: scikit-learn's bundled datasets, split and scaled.
- The `keras-adam-tune` command (`tuning.cli`).

Names are imported on first use, so `keras-adam-tune --help` and argument
errors answer without loading TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DATASET_NAMES": "tuning.datasets",
    "Dataset": "tuning.datasets",
    "load_dataset": "tuning.datasets",
    "AdamHyperModel": "tuning.hypermodel",
    "LRRangeTest": "tuning.lr_range_test",
    "RangeTestResult": "tuning.lr_range_test",
    "lr_range_test": "tuning.lr_range_test",
    "suggest_bounds": "tuning.lr_range_test",
    "Comparison": "tuning.results",
    "SearchResult": "tuning.results",
    "TrialRecord": "tuning.results",
    "search": "tuning.searching",
    "AdamSearchSpace": "tuning.space",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tuning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
