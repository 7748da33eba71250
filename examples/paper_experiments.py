"""Section 6 of Kingma & Ba, "Adam: A Method for Stochastic Optimization"
(arXiv:1412.6980), in miniature, on data that ships with scikit-learn.

Three of the paper's experiment designs, on load_digits (8x8 images, 10
classes) instead of MNIST/CIFAR-10, with the paper's protocol: minibatches of
128, a learning-rate grid search per optimizer, the setting with the lowest
final training cost reported, and training cost plotted against epochs.

- logreg: L2-regularized multiclass logistic regression with the paper's
  alpha/sqrt(t) step-size decay (6.1; AdaGrad keeps a constant alpha), on
  digits and, as a second panel, breast_cancer.
- mlp: 2 hidden ReLU layers of 256 units with dropout (6.2; the paper: 1000).
- cnn: conv(16)-conv(32)-maxpool-dense(128) with dropout on the input and the
  dense layer (6.3, scaled down from the paper's CIFAR-10 c64-c64-c128-1000).

Optimizers: keras_adam.Adam (beta_1=0.9, beta_2=0.999, epsilon=1e-8,
epsilon_mode="paper"), and keras.optimizers' Adagrad, RMSprop, SGD with
Nesterov momentum 0.9, Adamax (7.1), and, for the MLP as in the paper,
Adadelta. Every optimizer of an experiment starts from the same initial
weights and sees the same minibatches and dropout masks; runs are
deterministic.

    python examples/paper_experiments.py            # full run, 5-7 minutes on 2 cores
    python examples/paper_experiments.py --small    # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_adam  # noqa: E402
from tuning.datasets import Dataset, load_dataset  # noqa: E402

BATCH_SIZE = 128  # the paper's minibatch size, in every experiment
DEFAULT_EPOCHS = 45  # the length of the paper's CIFAR-10 plot (Figure 3)
SMALL_EPOCHS = 2
L2 = 1e-4  # weight of the logistic regression's L2 penalty, l2 * sum(w**2)
MLP_UNITS = 256
TARGET_COST = 0.1  # the table's "epochs to cost < 0.1": a measure of speed
EXPERIMENTS = ("logreg", "mlp", "cnn")
OPTIMIZERS = ("Adam", "AdaMax", "AdaGrad", "RMSProp", "SGD-Nesterov", "AdaDelta")

#: Learning-rate grids, log-spaced in steps of about sqrt(10), per experiment
#: and optimizer, placed (by a pilot search from 1e-5 to 3, 45 epochs, seed 0)
#: so that the best value lies inside them. The logistic regression's grid is
#: one wide grid for every optimizer and both datasets, and higher because
#: alpha decays as 1/sqrt(t). Keras's Adadelta multiplies the AdaDelta step by
#: the learning rate (the original has none, i.e. 1.0). `--small` runs only
#: the middle value of each grid (`small_grid`).
_LOGREG = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
_STOCHASTIC = {
    "Adam": (3e-4, 1e-3, 3e-3, 0.01, 0.03),
    "AdaMax": (1e-3, 3e-3, 0.01, 0.03, 0.1),
    "AdaGrad": (0.01, 0.03, 0.1, 0.3, 1.0),
    "RMSProp": (3e-4, 1e-3, 3e-3, 0.01, 0.03),
    "SGD-Nesterov": (0.01, 0.03, 0.1, 0.3, 1.0),
    "AdaDelta": (1.0, 3.0, 10.0, 30.0, 100.0),
}
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "logreg": {name: _LOGREG for name in OPTIMIZERS[:5]},
    "mlp": dict(_STOCHASTIC),
    "cnn": {name: grid for name, grid in _STOCHASTIC.items() if name != "AdaDelta"},
}


@keras.saving.register_keras_serializable(package="paper_experiments")
class InverseSqrtDecay(keras.optimizers.schedules.LearningRateSchedule):
    """The paper's logistic-regression step size, alpha_t = alpha / sqrt(t).

    Keras passes the number of steps already taken, so step t = step + 1.
    """

    def __init__(self, initial_learning_rate: float):
        self.initial_learning_rate = float(initial_learning_rate)

    def __call__(self, step):
        t = keras.ops.cast(step, "float32") + 1.0
        return self.initial_learning_rate / keras.ops.sqrt(t)

    def get_config(self) -> dict:
        return {"initial_learning_rate": self.initial_learning_rate}


def make_optimizer(name: str, learning_rate) -> keras.optimizers.Optimizer:
    """One of `OPTIMIZERS`; all but the learning rate at the defaults."""
    if name == "Adam":
        # Algorithm 1's defaults, with epsilon added to sqrt(v_hat) as in the paper.
        return keras_adam.Adam(
            learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8, epsilon_mode="paper"
        )
    if name == "AdaMax":
        return keras.optimizers.Adamax(learning_rate)
    if name == "AdaGrad":
        return keras.optimizers.Adagrad(learning_rate)
    if name == "RMSProp":
        return keras.optimizers.RMSprop(learning_rate)
    if name == "SGD-Nesterov":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "AdaDelta":
        return keras.optimizers.Adadelta(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def logistic_regression(data: Dataset) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((data.x_train.shape[1],)),
            keras.layers.Dense(
                data.num_classes, kernel_regularizer=keras.regularizers.L2(L2), name="softmax"
            ),
        ]
    )


def mlp(data: Dataset) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((data.x_train.shape[1],)),
            keras.layers.Dense(MLP_UNITS, activation="relu", name="hidden_1"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(MLP_UNITS, activation="relu", name="hidden_2"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(data.num_classes, name="softmax"),
        ]
    )


def cnn(data: Dataset) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Reshape((8, 8, 1)),
            keras.layers.Dropout(0.2),  # the paper puts dropout on the input...
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_1"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_2"),
            keras.layers.MaxPooling2D(3, strides=2, padding="same"),  # 3x3, stride 2
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu", name="dense"),
            keras.layers.Dropout(0.5),  # ...and on the fully connected layer
            keras.layers.Dense(data.num_classes, name="softmax"),
        ]
    )


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    datasets: tuple[str, ...]
    build: object
    optimizers: tuple[str, ...]
    inverse_sqrt_decay: bool
    description: str


SPECS = {
    "logreg": Experiment(
        "logreg",
        "Logistic regression (6.1)",
        ("digits", "breast_cancer"),
        logistic_regression,
        OPTIMIZERS[:5],
        True,
        f"softmax regression, L2 {L2:g}, alpha/sqrt(t) decay (AdaGrad: constant alpha)",
    ),
    "mlp": Experiment(
        "mlp",
        "Multilayer network + dropout (6.2)",
        ("digits",),
        mlp,
        OPTIMIZERS,
        False,
        f"64-{MLP_UNITS}-{MLP_UNITS}-10 ReLU, dropout 0.5",
    ),
    "cnn": Experiment(
        "cnn",
        "Convolutional network + dropout (6.3)",
        ("digits",),
        cnn,
        OPTIMIZERS[:5],
        False,
        "8x8x1 - c16 - c32 (3x3) - maxpool 3/2 - 128 - 10, dropout 0.2 input / 0.5 dense",
    ),
}


def uses_inverse_sqrt_decay(spec: Experiment, optimizer_name: str) -> bool:
    """Whether this run's step size decays as alpha/sqrt(t).

    The paper decays the step size of its logistic regression experiments
    (6.1) without saying whether the baselines' decays too. Here every
    optimizer of that experiment decays except AdaGrad: its accumulator
    already shrinks the step roughly as 1/sqrt(t), and Duchi et al. use a
    constant alpha (with the decay on top, its best alpha was at the top
    of a grid reaching 100).
    """
    return spec.inverse_sqrt_decay and optimizer_name != "AdaGrad"


def second_moment_summary(optimizer: keras_adam.Adam, model: keras.Model) -> dict:
    """How much of Adam's sqrt(v_hat) is below epsilon, per weight matrix.

    The paper (6.3) notes that in CNNs v_hat "vanishes to zeros after a few
    epochs and is dominated by the epsilon".
    """
    step = int(optimizer.iterations.numpy())
    correction = 1.0 - optimizer.beta_2**step
    summary = {}
    for variable, velocity in zip(model.trainable_variables, optimizer._velocities, strict=True):
        if len(variable.shape) < 2:  # kernels only
            continue
        root = np.sqrt(np.asarray(velocity.numpy(), dtype=np.float64) / correction)
        nonzero = root[root > 0]
        # "conv_1/kernel": the path without the model's name, which counts builds.
        summary[variable.path.split("/", 1)[-1]] = {
            "median_sqrt_v_hat": float(np.median(root)),
            "percentile_1_nonzero_sqrt_v_hat": (
                float(np.percentile(nonzero, 1)) if nonzero.size else None
            ),
            "fraction_below_epsilon": float(np.mean(root < optimizer.epsilon)),
            "fraction_zero": float(np.mean(root == 0)),
        }
    return summary


def train(
    spec: Experiment,
    data: Dataset,
    optimizer_name: str,
    learning_rate: float,
    epochs: int,
    seed: int,
) -> dict:
    """One run: the cost on the whole training set before training and after each epoch."""
    # The same seed before every build: the same initial weights and dropout
    # masks for every optimizer; the same shuffles follow from `rng`.
    keras.utils.set_random_seed(seed)
    model = spec.build(data)
    decays = uses_inverse_sqrt_decay(spec, optimizer_name)
    schedule = InverseSqrtDecay(learning_rate) if decays else learning_rate
    optimizer = make_optimizer(optimizer_name, schedule)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = tf.constant(data.x_train), tf.constant(data.y_train)
    n = len(data.x_train)
    n_batches = -(-n // BATCH_SIZE)

    @tf.function
    def cost():
        # Cross-entropy of the whole training set: no dropout, no L2 penalty.
        return loss_fn(y, model(x, training=False))

    @tf.function
    def train_epoch(order):
        for i in tf.range(n_batches):
            index = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            x_batch, y_batch = tf.gather(x, index), tf.gather(y, index)
            with tf.GradientTape() as tape:
                loss = loss_fn(y_batch, model(x_batch, training=True))
                if model.losses:  # the L2 penalty
                    loss += tf.add_n(model.losses)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return cost()

    rng = np.random.default_rng(seed)
    costs = [float(cost())]
    for _ in range(epochs):
        order = tf.constant(rng.permutation(n).astype(np.int32))
        costs.append(float(train_epoch(order)))
        if not math.isfinite(costs[-1]):
            break  # diverged: the rest of the curve is missing
    diverged = not math.isfinite(costs[-1])
    costs += [math.nan] * (epochs + 1 - len(costs))
    run = {"cost": costs, "final_cost": costs[-1], "test_accuracy": None}
    if not diverged:
        logits = model(tf.constant(data.x_test), training=False)
        predictions = np.argmax(np.asarray(logits), axis=1)
        run["test_accuracy"] = float(np.mean(predictions == data.y_test))
        if optimizer_name == "Adam":
            run["adam_second_moment"] = second_moment_summary(optimizer, model)
    return run


def small_grid(grid: tuple[float, ...]) -> tuple[float, ...]:
    """The `--small` budget's grid: the middle value (the lower of two middles)."""
    return (grid[(len(grid) - 1) // 2],)


def best_learning_rate(grid_runs: dict[float, dict]) -> float | None:
    """The learning rate with the lowest finite final training cost (None if all diverged)."""
    finite = {lr: r["final_cost"] for lr, r in grid_runs.items() if math.isfinite(r["final_cost"])}
    return min(finite, key=lambda lr: (finite[lr], lr)) if finite else None


def run_experiments(args: argparse.Namespace) -> dict:
    results: dict = {
        "paper": "Kingma & Ba, Adam: A Method for Stochastic Optimization, arXiv:1412.6980",
        "config": {
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": BATCH_SIZE,
            "small": args.small,
        },
        "runs": {},
    }
    plan = []
    for name in args.experiments:
        spec = SPECS[name]
        for dataset in spec.datasets:
            for optimizer_name in spec.optimizers:
                grid = GRIDS[name][optimizer_name]
                for lr in small_grid(grid) if args.small else grid:
                    plan.append((spec, dataset, optimizer_name, lr))
    datasets = {name: load_dataset(name, seed=args.seed) for name in {p[1] for p in plan}}
    start = time.perf_counter()
    for count, (spec, dataset, optimizer_name, lr) in enumerate(plan, 1):
        key = f"{spec.name}/{dataset}"
        data = datasets[dataset]
        entry = results["runs"].setdefault(
            key,
            {
                "experiment": spec.name,
                "title": spec.title,
                "dataset": dataset,
                "model": spec.description,
                "n_train": len(data.x_train),
                "n_test": len(data.x_test),
                "optimizers": {},
            },
        )
        tic = time.perf_counter()
        run = train(spec, data, optimizer_name, lr, args.epochs, args.seed)
        schedule = "alpha/sqrt(t)" if uses_inverse_sqrt_decay(spec, optimizer_name) else "constant"
        runs = entry["optimizers"].setdefault(
            optimizer_name, {"learning_rate_schedule": schedule, "grid": {}}
        )["grid"]
        runs[lr] = run
        accuracy = "diverged" if run["test_accuracy"] is None else f"{run['test_accuracy']:.4f}"
        print(
            f"[{count:3d}/{len(plan)}] {key:<22} {optimizer_name:<13} lr={lr:<7g}"
            f" final cost {run['final_cost']:.4g}, test accuracy {accuracy}"
            f" ({time.perf_counter() - tic:.1f} s)",
            flush=True,
        )
    for entry in results["runs"].values():
        for optimizer_name, result in entry["optimizers"].items():
            lr = best_learning_rate(result["grid"])
            grid = sorted(result["grid"])
            result["best_learning_rate"] = lr
            result["best_at_grid_edge"] = len(grid) > 1 and lr in (grid[0], grid[-1])
            if lr is None:
                print(f"warning: {optimizer_name} diverged at every learning rate", file=sys.stderr)
            best = result["grid"].get(lr, {})
            for field in ("cost", "final_cost", "test_accuracy"):
                result[field] = best.get(field)
            result["grid"] = {f"{k:g}": v for k, v in sorted(result["grid"].items())}
    results["seconds"] = time.perf_counter() - start
    return results


def plot(results: dict, output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name in EXPERIMENTS:
        keys = [k for k, v in results["runs"].items() if v["experiment"] == name]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.4), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            entry = results["runs"][key]
            for optimizer_name, result in entry["optimizers"].items():
                if result["best_learning_rate"] is None:
                    continue
                costs = np.asarray(result["cost"], dtype=np.float64)
                ax.plot(
                    np.arange(len(costs)),
                    costs,
                    label=f"{optimizer_name} (lr {result['best_learning_rate']:g})",
                    linewidth=2.2 if optimizer_name == "Adam" else 1.4,
                    color="black" if optimizer_name == "Adam" else None,
                    zorder=3 if optimizer_name == "Adam" else 2,
                )
            ax.set_yscale("log")
            ax.set_xlabel("epochs (iterations over the training set)")
            ax.set_ylabel("training cost (cross-entropy)")
            ax.set_title(f"{entry['title']}: {entry['dataset']}\n{entry['model']}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = output / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def epochs_to_reach(costs: list, target: float = TARGET_COST) -> int | None:
    """The first epoch after which the training cost is below `target` (None: never)."""
    return next((i for i, c in enumerate(costs) if c is not None and c < target), None)


def markdown_table(results: dict) -> str:
    lines = [
        "| experiment | dataset | optimizer | lr grid (values) | chosen lr "
        f"| final training cost | epochs to cost < {TARGET_COST:g} | test accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["runs"].values():
        for optimizer_name, result in entry["optimizers"].items():
            grid = list(result["grid"])
            grid = grid[0] if len(grid) == 1 else f"{grid[0]}–{grid[-1]} ({len(grid)})"
            lr = result["best_learning_rate"]
            chosen = "all diverged" if lr is None else f"{lr:g}"
            if result["best_at_grid_edge"]:
                chosen += " (edge)"
            cost = "—" if lr is None else f"{result['final_cost']:.3g}"
            reach = None if lr is None else epochs_to_reach(result["cost"])
            reach = "—" if reach is None else str(reach)
            accuracy = "—" if result["test_accuracy"] is None else f"{result['test_accuracy']:.4f}"
            lines.append(
                f"| {entry['experiment']} | {entry['dataset']} | {optimizer_name} | {grid} "
                f"| {chosen} | {cost} | {reach} | {accuracy} |"
            )
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """NaN (a diverged run's missing epochs) becomes null: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default {DEFAULT_EPOCHS}; {SMALL_EPOCHS} with --small",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="the test budget: the middle learning rate of each grid and 2 epochs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--experiments",
        nargs="+",
        choices=EXPERIMENTS,
        default=list(EXPERIMENTS),
        metavar="NAME",
        help=f"a subset of {', '.join(EXPERIMENTS)} (default: all)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("docs/img/paper"), help="directory of the PNGs"
    )
    parser.add_argument("--markdown", type=Path, help="also write the results table here")
    parser.add_argument(
        "--json", type=Path, help="where to write every curve (default: OUTPUT/results.json)"
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = SMALL_EPOCHS if args.small else DEFAULT_EPOCHS
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    args.experiments = [e for e in EXPERIMENTS if e in args.experiments]  # canonical order
    if args.json is None:
        args.json = args.output / "results.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Deterministic kernels: the same seed gives bit-identical curves.
    tf.config.experimental.enable_op_determinism()
    args.output.mkdir(parents=True, exist_ok=True)
    results = run_experiments(args)
    results = _json_safe(results)
    seconds = results.pop("seconds")
    paths = plot(results, args.output)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    print()
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(f"{len(paths)} plots in {args.output}, curves in {args.json}; {seconds:.0f} s training")


if __name__ == "__main__":
    main()
