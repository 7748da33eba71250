"""Classification data that ships with scikit-learn: nothing is downloaded.

Example:
    >>> from tuning.datasets import load_dataset
    >>> data = load_dataset("digits")
    >>> data.x_train.shape, data.num_classes
    ((1438, 64), 10)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """A train/test split of a classification set, ready for Keras.

    Attributes:
        name: The dataset's name.
        x_train: Training features, float32, shape (n_train, n_features).
        y_train: Training labels, int64, shape (n_train,).
        x_test: Held-out features.
        y_test: Held-out labels.
        num_classes: The number of classes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def _loaders() -> dict:
    from sklearn import datasets

    return {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
    }


#: Names accepted by `load_dataset`.
DATASET_NAMES = ("digits", "breast_cancer", "wine")


def load_dataset(name: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load a scikit-learn bundled dataset, shuffle it and split it.

    Features are standardized with the training split's mean and standard
    deviation (digits, whose pixels share one 0..16 scale, are divided by 16).

    Args:
        name: One of `DATASET_NAMES`.
        test_fraction: Share of the samples held out, in (0, 1).
        seed: Seed of the shuffle, so that splits are reproducible.

    Returns:
        The `Dataset`.

    Raises:
        ValueError: if `name` or `test_fraction` is not valid.
    """
    if name not in DATASET_NAMES:
        raise ValueError(
            f"Argument `name` must be one of {', '.join(DATASET_NAMES)}. Received: name={name!r}"
        )
    if not 0 < test_fraction < 1:
        raise ValueError(
            f"Argument `test_fraction` must be in (0, 1). Received: test_fraction={test_fraction!r}"
        )
    bunch = _loaders()[name]()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    x_train, x_test = x[n_test:], x[:n_test]
    if name == "digits":
        x_train, x_test = x_train / 16.0, x_test / 16.0
    else:
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Dataset(
        name=name,
        x_train=x_train.astype(np.float32),
        y_train=y[n_test:],
        x_test=x_test.astype(np.float32),
        y_test=y[:n_test],
        num_classes=int(y.max()) + 1,
    )
