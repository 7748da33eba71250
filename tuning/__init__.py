"""Hyperparameter search for `keras_adam.Adam` (β1, β2, η) with KerasTuner.

- `tuning.search` (`tuning.searching`): run a search on a model and data;
  returns a `SearchResult` (`tuning.results`) with the best
  hyperparameters, a ready `keras_adam.Adam`, the trials (`TrialRecord`,
  `tuning.records`), and the tuned optimizer measured against default Adam
  (`Comparison`, `tuning.comparison`).
- `tuning.AdamSearchSpace`: the ranges (1 − β on a log scale) and which
  parameters a trial budget can afford (`tuning.space`).
- `tuning.AdamHyperModel`: the KerasTuner HyperModel, for use with your own
  KerasTuner tuner (`tuning.hypermodel`).
- `tuning.lr_range_test`: Smith's learning-rate range test, to narrow η
  (`tuning.lr_range`).
- `tuning.datasets`: scikit-learn's bundled datasets, split and scaled.
- The `keras-adam-tune` command (`tuning.cli`).

Behind them: the KerasTuner tuners (`tuning.tuners`) and oracles
(`tuning.oracles`; `tuning.asha` for the multi-fidelity search), the
table, CSV and plot of the trials (`tuning.output`), search fingerprints
(`tuning.fingerprint`), loss inference (`tuning.inference`) and
distributed searches (`tuning.distributed`).

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
    "LRRangeTest": "tuning.lr_range",
    "RangeTestResult": "tuning.lr_range",
    "lr_range_test": "tuning.lr_range",
    "suggest_bounds": "tuning.lr_range",
    "Comparison": "tuning.comparison",
    "SearchResult": "tuning.results",
    "TrialRecord": "tuning.records",
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
