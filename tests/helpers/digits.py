"""The digits split and a small network, shared by the learning tests."""

import keras

from tuning.datasets import load_dataset


def split():
    data = load_dataset("digits")
    return (data.x_train, data.y_train), (data.x_test, data.y_test)


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
