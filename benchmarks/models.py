"""Five keras-io example models, with synthetic data of the right shapes, for `model.fit` timings.

Each is the shape of a keras-io example (scaled so that an epoch takes
seconds on two CPU cores), with data drawn from a fixed random "teacher" so
that the loss has something to learn:

- `convnet`: "Simple MNIST convnet" (two convolutions, dropout), 28x28 images;
- `transformer`: "Text classification with Transformer" (token and position
  embeddings, multi-head attention, dropout), 200 tokens from 20 000;
- `recommender`: "Collaborative filtering for movie recommendations"
  (user and movie embeddings and biases, a dot product), ratings in [0, 1];
- `lstm`: "Timeseries forecasting for weather prediction" (one LSTM),
  120 steps of 7 features;
- `resnet`: "Image classification from scratch" scaled down: residual
  blocks of convolutions with batch normalization, 32x32 colour images.

`transformer` and `recommender` have embeddings, so their gradients are
sparse rows on TensorFlow and `keras_adam.Adam(lazy_sparse=True)` applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelCase:
    """A model and its data.

    Attributes:
        name: Short name used in tables.
        description: What it is.
        build: Returns the (uncompiled) model; call after seeding.
        data: Returns `(x, y)` (arrays, or lists of arrays).
        loss: The loss to compile with.
        batch_size: Batch size of `fit`.
        embeddings: Whether the model has embeddings (sparse gradients).
    """

    name: str
    description: str
    build: Callable
    data: Callable
    loss: str
    batch_size: int
    embeddings: bool = False


def convnet():
    """keras-io's MNIST convnet."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )


def convnet_data(samples: int, shape: tuple[int, ...] = (28, 28, 1)):
    """Images in [0, 1]; the class is the argmax of a fixed random projection."""
    rng = np.random.default_rng(0)
    x = rng.random((samples, *shape), dtype=np.float32)
    teacher = rng.standard_normal((int(np.prod(shape)), 10)).astype(np.float32)
    y = np.argmax(x.reshape(samples, -1) @ teacher, axis=1)
    return x, y


def resnet():
    """A small ResNet: a stem, two residual blocks (16 and 32 filters) with batch norm, pooling."""
    import keras
    from keras import layers

    def normalized(x, filters, size=3):
        x = layers.Conv2D(filters, size, padding="same", use_bias=False)(x)
        return layers.BatchNormalization()(x)

    images = keras.Input((32, 32, 3))
    x = layers.Activation("relu")(normalized(images, 16))
    for filters in (16, 32):
        shortcut = x if x.shape[-1] == filters else normalized(x, filters, 1)
        y = layers.Activation("relu")(normalized(x, filters))
        y = normalized(y, filters)
        x = layers.MaxPooling2D(2)(layers.Activation("relu")(layers.add([shortcut, y])))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, layers.Dense(10, activation="softmax")(x))


VOCABULARY, SEQUENCE = 20_000, 200


def transformer(dropout: float = 0.1):
    """keras-io's transformer text classifier (embed 32, 2 heads, feed-forward 32)."""
    import keras
    from keras import layers, ops

    class TokenAndPositionEmbedding(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.tokens = layers.Embedding(VOCABULARY, embed)
            self.positions = layers.Embedding(SEQUENCE, embed)

        def call(self, x):
            return self.tokens(x) + self.positions(ops.arange(ops.shape(x)[-1]))

    embed, heads, hidden = 32, 2, 32
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    x = TokenAndPositionEmbedding()(tokens)
    attention = layers.MultiHeadAttention(heads, embed)(x, x)
    x = layers.LayerNormalization(epsilon=1e-6)(x + layers.Dropout(dropout)(attention))
    feed = layers.Dense(hidden, activation="relu")(x)
    feed = layers.Dense(embed)(feed)
    x = layers.LayerNormalization(epsilon=1e-6)(x + layers.Dropout(dropout)(feed))
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    return keras.Model(tokens, layers.Dense(2, activation="softmax")(x))


def transformer_data(samples: int):
    """Zipf-like token sequences; the label: more tokens than usual from half the words."""
    rng = np.random.default_rng(0)
    ranks = np.arange(1, VOCABULARY + 1)
    p = 1.0 / ranks
    x = rng.choice(VOCABULARY, size=(samples, SEQUENCE), p=p / p.sum()).astype(np.int32)
    share = (rng.random(VOCABULARY) < 0.5)[x].mean(axis=1)  # of "positive" tokens
    y = (share > np.median(share)).astype(np.int32)
    return x, y


USERS, MOVIES = 10_000, 20_000
#: keras-io's dataset (MovieLens "small"): 610 users rated 9 724 movies 100 836 times.
MOVIELENS_USERS, MOVIELENS_MOVIES = 610, 9_724


def recommender(users: int = USERS, movies: int = MOVIES):
    """keras-io's RecommenderNet: user and movie embeddings (50) and biases; sigmoid of the dot."""
    import keras
    from keras import layers, ops

    size = 50
    pair = keras.Input((2,), dtype="int32")
    user = layers.Embedding(users, size, embeddings_regularizer=keras.regularizers.l2(1e-6))(
        pair[:, 0]
    )
    movie = layers.Embedding(movies, size, embeddings_regularizer=keras.regularizers.l2(1e-6))(
        pair[:, 1]
    )
    user_bias = layers.Embedding(users, 1)(pair[:, 0])
    movie_bias = layers.Embedding(movies, 1)(pair[:, 1])
    score = ops.sum(user * movie, axis=1, keepdims=True) + user_bias + movie_bias
    return keras.Model(pair, ops.sigmoid(score))


def recommender_data(samples: int, users: int = USERS, movies: int = MOVIES):
    """(user, movie) pairs with Zipf-like popularity; ratings from 8 hidden factors."""
    rng = np.random.default_rng(0)

    def popular(count: int) -> np.ndarray:
        p = 1.0 / np.arange(1, count + 1) ** 0.8
        return rng.choice(count, size=samples, p=p / p.sum())

    chosen_users, chosen_movies = popular(users), popular(movies)
    u = rng.standard_normal((users, 8)).astype(np.float32)
    m = rng.standard_normal((movies, 8)).astype(np.float32)
    rating = 1.0 / (1.0 + np.exp(-(u[chosen_users] * m[chosen_movies]).sum(axis=1) / 2))
    pairs = np.stack([chosen_users, chosen_movies], axis=1).astype(np.int32)
    return pairs, rating.astype(np.float32)[:, None]


def lstm():
    """keras-io's weather forecaster: LSTM(32) over 120 steps of 7 features, one output."""
    import keras
    from keras import layers

    return keras.Sequential([keras.Input((120, 7)), layers.LSTM(32), layers.Dense(1)])


def lstm_data(samples: int):
    """Noisy sums of sines; the target is the first feature 12 steps after the window."""
    rng = np.random.default_rng(0)
    t = np.arange(samples + 132, dtype=np.float32)
    periods = np.array([24, 24 * 7, 50, 11, 13, 17, 29], dtype=np.float32)
    series = np.sin(2 * np.pi * t[:, None] / periods) + 0.1 * rng.standard_normal(
        (t.size, 7)
    ).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(series, (120, 7))[:samples, 0]
    return np.ascontiguousarray(windows), series[132 : 132 + samples, :1]


def cases(quick: bool = False) -> list[ModelCase]:
    """The five models; `quick` uses a quarter of the data."""
    k = 4 if quick else 1
    return [
        ModelCase(
            "convnet", "MNIST convnet, 28x28x1, 34.8k parameters", convnet,
            lambda: convnet_data(8192 // k), "sparse_categorical_crossentropy", 128,
        ),
        ModelCase(
            "transformer", "transformer text classifier, 200 of 20k tokens, 650k parameters",
            transformer, lambda: transformer_data(2048 // k),
            "sparse_categorical_crossentropy", 32, embeddings=True,
        ),
        ModelCase(
            "recommender", "collaborative filtering, 10k users x 20k movies, 1.5M parameters",
            recommender, lambda: recommender_data(65536 // k), "binary_crossentropy", 64,
            embeddings=True,
        ),
        ModelCase(
            "lstm", "LSTM forecaster, 120 steps x 7 features, 5.2k parameters", lstm,
            lambda: lstm_data(8192 // k), "mse", 256,
        ),
        ModelCase(
            "resnet", "residual convnet with batch norm, 32x32x3, 20.3k parameters", resnet,
            lambda: convnet_data(2048 // k, (32, 32, 3)), "sparse_categorical_crossentropy", 64,
        ),
    ]  # fmt: skip
