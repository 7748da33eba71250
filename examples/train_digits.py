"""Train a small network on scikit-learn's digits with keras_adam.Adam and with
keras.optimizers.Adam, from the same initial weights, and compare.

keras_adam.Adam runs twice: on its default path (the fused TensorFlow kernel,
which takes Keras's scalars and gives Keras's numbers) and with fused=False
(the keras.ops reference path); both are bit-identical to
keras.optimizers.Adam here.

    python examples/train_digits.py            # 40 epochs
    python examples/train_digits.py --epochs 2 # a quick check
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_adam  # noqa: E402
from tuning.datasets import load_dataset  # noqa: E402


def build_model(num_features: int, num_classes: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((num_features,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )


def train(optimizer: keras.optimizers.Optimizer, data, args) -> dict:
    model = build_model(data.x_train.shape[1], data.num_classes, args.seed)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=args.jit_compile,
    )
    timer = EpochTimer()
    model.fit(
        data.x_train,
        data.y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    # The first epoch includes tracing and compilation; later ones are steady.
    steady = timer.seconds[1:] or timer.seconds
    return {
        "accuracy": accuracy,
        "seconds": sum(timer.seconds),
        "epoch_ms": 1e3 * float(np.median(steady)),
        "weights": model.get_weights(),
    }


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jit-compile", action="store_true", help="compile the training step with XLA"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    data = load_dataset("digits", seed=args.seed)
    lr = args.learning_rate
    results = {
        "keras_adam.Adam": train(keras_adam.Adam(learning_rate=lr), data, args),
        "keras_adam.Adam(fused=False)": train(
            keras_adam.Adam(learning_rate=lr, fused=False), data, args
        ),
        "keras.optimizers.Adam": train(keras.optimizers.Adam(learning_rate=lr), data, args),
    }

    print(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test samples, "
        f"MLP 64-128-64-10, {args.epochs} epochs, batch {args.batch_size}, "
        f"lr {args.learning_rate}, same initial weights"
    )
    print(f"{'optimizer':<30}{'test accuracy':>15}{'train seconds':>15}{'ms/epoch':>10}")
    for name, r in results.items():
        print(f"{name:<30}{r['accuracy']:>15.4f}{r['seconds']:>15.2f}{r['epoch_ms']:>10.1f}")
    reference = results["keras.optimizers.Adam"]["weights"]
    for name in ("keras_adam.Adam(fused=False)", "keras_adam.Adam"):
        deviation = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(results[name]["weights"], reference, strict=True)
        )
        print(f"max |weight difference|, {name} vs keras.optimizers.Adam: {deviation:.3g}")
    print(
        "(the fused kernel rounds the last bit of some products differently; over many "
        "steps training amplifies that into visible weight differences, not accuracy ones)"
    )


if __name__ == "__main__":
    main()
