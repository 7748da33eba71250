"""`lr_range_test` on every backend, with the data types that backend's `fit` takes."""

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers.neutral import BACKEND
from tuning.datasets import load_dataset
from tuning.lr_range import lr_range_test


def _digits():
    data = load_dataset("digits")
    return data.x_train[:512].astype("float32"), data.y_train[:512].astype("int32")


def _inputs(kind, x, y):
    if kind == "numpy":
        return dict(x=x, y=y, batch_size=32)
    if kind == "tf.data":
        import tensorflow as tf

        return dict(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    if kind == "torch DataLoader":
        import torch

        dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return dict(x=torch.utils.data.DataLoader(dataset, batch_size=32), batch_size=None)
    if kind == "PyDataset":

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return len(x) // 32

            def __getitem__(self, i):
                return x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]

        return dict(x=Batches(), batch_size=None)
    raise ValueError(kind)


KINDS = ["numpy", "PyDataset"] + {
    "tensorflow": ["tf.data"],
    "jax": ["tf.data"],
    "torch": ["torch DataLoader"],
}[BACKEND]


@pytest.mark.parametrize("kind", KINDS)
def test_range_test_runs_and_restores_everything(kind):
    x, y = _digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer=keras_adam.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)  # optimizer state to restore
    weights = [w.copy() for w in model.get_weights()]
    state = [np.array(v.numpy()) for v in model.optimizer.variables]

    result = lr_range_test(model, steps=40, max_learning_rate=1.0, **_inputs(kind, x, y))

    assert len(result.learning_rates) >= 20
    assert result.learning_rates[-1] > 100 * result.learning_rates[0]
    low, high = result.suggested_bounds
    assert 0 < low < high <= 1.0
    for a, b in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(state, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
