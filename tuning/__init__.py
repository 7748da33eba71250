"""Hyperparameter search for `keras_adam.Adam` (β1, β2, η) with KerasTuner.

- `tuning.search`: run a search on a model and data; returns a
  `SearchResult` with the best hyperparameters, a ready `keras_adam.Adam`,
  the trials, and the tuned optimizer measured against default Adam.
- `tuning.AdamSearchSpace`: the ranges (1 − β on a log scale) and which
  parameters a trial budget can afford.
- `tuning.AdamHyperModel`: the KerasTuner HyperModel, for use with your own
  KerasTuner tuner.
- `tuning.lr_range_test`: Smith's learning-rate range test, to narrow η.
- `tuning.datasets`: scikit-learn's bundled datasets, split and scaled.
- The `keras-adam-tune` command (`tuning.cli`).
"""

from tuning.datasets import DATASET_NAMES, Dataset, load_dataset
from tuning.hypermodel import AdamHyperModel
from tuning.lr_range_test import LRRangeTest, RangeTestResult, lr_range_test, suggest_bounds
from tuning.results import Comparison, SearchResult, TrialRecord
from tuning.search import search
from tuning.space import AdamSearchSpace

__all__ = [
    "DATASET_NAMES",
    "AdamHyperModel",
    "AdamSearchSpace",
    "Comparison",
    "Dataset",
    "LRRangeTest",
    "RangeTestResult",
    "SearchResult",
    "TrialRecord",
    "lr_range_test",
    "load_dataset",
    "search",
    "suggest_bounds",
]
