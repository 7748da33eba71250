"""Hyperparameter search for `keras_adam.Adam` (β1, β2, η) with KerasTuner.

For now it holds the bundled datasets (`tuning.datasets`) that the
examples and the search use; the search itself and the `keras-adam-tune`
command come next.
"""

from tuning.datasets import DATASET_NAMES, Dataset, load_dataset

__all__ = ["DATASET_NAMES", "Dataset", "load_dataset"]
