"""The digits split and small networks, shared by the learning and search tests."""

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


def search_subset():
    """600 training and 200 test samples of digits: `(x, y, x_test, y_test)`, for quick searches."""
    data = load_dataset("digits")
    return data.x_train[:600], data.y_train[:600], data.x_test[:200], data.y_test[:200]


def linear():
    """A linear classifier of digits, ending in logits."""
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])


def search(data, directory, **options):
    """`tuning.search` of `linear` on `data` (`search_subset`), into `directory/p`."""
    import tuning

    x, y, x_test, y_test = data
    arguments = {
        "loss": LOSS,
        "metrics": ["accuracy"],
        "directory": str(directory),
        "project": "p",
        "test_data": (x_test, y_test),
        **options,
    }
    return tuning.search(linear, x, y, **arguments)
