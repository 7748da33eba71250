"""`keras-adam-tune` (also `python -m tuning`): search Adam's β1, β2 and η from the shell.

    keras-adam-tune --dataset digits
    keras-adam-tune --dataset wine --tuner hyperband --epochs 30
    keras-adam-tune --dataset digits --tuner asha --max-trials 60
    keras-adam-tune --model mypkg.models:build --data mypkg.data:load --max-trials 40

`--model MODULE:FUNCTION` returns an uncompiled `keras.Model` (it may take a
`keras_tuner.HyperParameters`); `--data MODULE:FUNCTION` returns
`(x_train, y_train, x_test, y_test)` or a `tuning.datasets.Dataset`. With
`--dataset`, the model is a small multilayer perceptron for that data.

Results go to `DIR/NAME/`: `best.json`, `trials.csv` and `trials.png` (see
`tuning.results`). Rerunning without `--overwrite` resumes the search.
Bad arguments exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tuning import native_logs
from tuning.datasets import DATASET_NAMES
from tuning.space import DEFAULT_EPOCHS, DEFAULT_MAX_TRIALS  # noqa: F401 - re-exported

#: `--tuner` choices: `tuning.tuners.TUNERS`, spelled out so that parsing
#: arguments does not import TensorFlow (a test keeps the two equal).
TUNER_CHOICES = ("random", "bayesian", "hyperband", "grid", "asha")

#: The bundled datasets' train/test split: fixed, so that searches with different
#: `--seed`s are compared on the same split.
DEFAULT_SPLIT_SEED = 0


class UsageError(Exception):
    """A bad command-line argument; the message names it."""


def _number(convert: Callable, kind: str, accept: Callable) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}")
        return value

    parse.__name__ = kind.replace(" ", "_")
    return parse


#: argparse types: each rejects bad text with "must be <kind>, got '<text>'".
positive_int = _number(int, "a positive integer", lambda v: v > 0)
non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
factor_int = _number(int, "an integer of at least 2", lambda v: v >= 2)
positive_float = _number(float, "a positive number", lambda v: 0 < v < float("inf"))


def _range(text: str) -> tuple[float, float]:
    parts = text.replace(",", ":").split(":")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW:HIGH, got {text!r}") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"low end must be below high end, got {text!r}")
    return low, high


def _reference(text: str) -> str:
    module, sep, function = text.partition(":")
    if not sep or not module or not function or not function.isidentifier():
        raise argparse.ArgumentTypeError(f"must be MODULE:FUNCTION, got {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its names are the command's contract)."""
    parser = _Parser(
        prog="keras-adam-tune",
        description="Search Adam's learning rate, beta_1 and beta_2 with KerasTuner.",
    )
    source = parser.add_argument_group("data and model")
    source.add_argument(
        "--dataset", choices=DATASET_NAMES, help="bundled scikit-learn data (default: digits)"
    )
    source.add_argument("--model", type=_reference, metavar="MODULE:FUNCTION")
    source.add_argument("--data", type=_reference, metavar="MODULE:FUNCTION")
    budget = parser.add_argument_group("search")
    budget.add_argument("--tuner", choices=TUNER_CHOICES, default="bayesian")
    budget.add_argument("--max-trials", type=positive_int, default=None, metavar="N")
    budget.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, metavar="N")
    budget.add_argument(
        "--min-epochs",
        type=positive_int,
        default=None,
        metavar="N",
        help="asha: the least epochs of the first rung (default: a third of --epochs)",
    )
    budget.add_argument(
        "--reduction-factor",
        type=factor_int,
        default=None,
        metavar="N",
        help="asha: rung-to-rung ratio of epochs; 1/N of each rung's trials go on (default: 3)",
    )
    budget.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="seed of the search and its initial weights (not of the data split)",
    )
    source.add_argument(
        "--split-seed",
        type=non_negative_int,
        default=DEFAULT_SPLIT_SEED,
        metavar="N",
        help=f"seed of --dataset's train/test split (default {DEFAULT_SPLIT_SEED})",
    )
    budget.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    budget.add_argument(
        "--objective", default="val_loss", help="metric to optimize (default: val_loss)"
    )
    budget.add_argument("--early-stopping", type=positive_int, default=None, metavar="PATIENCE")
    budget.add_argument("--learning-rate", type=_range, metavar="LOW:HIGH")
    budget.add_argument("--beta-1", type=_range, metavar="LOW:HIGH", help="range of beta_1")
    budget.add_argument("--beta-2", type=_range, metavar="LOW:HIGH", help="range of beta_2")
    budget.add_argument("--epsilon", type=_range, metavar="LOW:HIGH")
    budget.add_argument("--weight-decay", type=_range, metavar="LOW:HIGH")
    budget.add_argument(
        "--tune",
        nargs="+",
        choices=("learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay"),
        help="what to search (default: chosen by --max-trials)",
    )
    budget.add_argument(
        "--lr-range-test", action="store_true", help="narrow the learning-rate range first"
    )
    budget.add_argument(
        "--moment-dtype",
        choices=("float32", "bfloat16", "int8", "int4"),
        default=None,
        help="Adam's state in every trial, as keras_adam.Adam(moment_dtype=...): "
        "search with the state you will train with (default: the weights' dtype)",
    )
    budget.add_argument(
        "--comparison-repeats",
        type=non_negative_int,
        default=3,
        metavar="N",
        help="runs per optimizer when comparing with default Adam (0: skip)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--directory", default="runs", metavar="DIR")
    output.add_argument("--project", default=None, metavar="NAME")
    output.add_argument("--overwrite", action="store_true", help="start afresh")
    output.add_argument("--no-plot", action="store_true", help="skip trials.png")
    output.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="write each trial's curves and hyperparameters for TensorBoard's HParams "
        "dashboard to DIR (tensorboard --logdir DIR)",
    )
    output.add_argument(
        "--worker-timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="distributed: the chief gives up after this long without a worker "
        "(longer than a trial); a worker after this long without the chief",
    )
    return parser


def _load_reference(option: str, reference: str) -> Callable:
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import error of any kind is the user's
        raise UsageError(
            f"argument {option}: cannot import module {module_name!r} ({error})"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(
            f"argument {option}: module {module_name!r} has no function {function_name!r}"
        )
    return function


def default_model(num_features: int, num_classes: int) -> Callable[[], Any]:
    """The model `--dataset` tunes on: a two-hidden-layer perceptron."""
    import keras

    def build() -> keras.Model:
        return keras.Sequential(
            [
                keras.Input((num_features,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(num_classes),
            ]
        )

    return build


def _load_data(args: argparse.Namespace) -> tuple:
    from tuning.datasets import Dataset, load_dataset

    if args.data is None:
        data = load_dataset(args.dataset or "digits", seed=args.split_seed)
        return data.x_train, data.y_train, data.x_test, data.y_test, data.num_classes
    loaded = _load_reference("--data", args.data)()
    if isinstance(loaded, Dataset):
        return loaded.x_train, loaded.y_train, loaded.x_test, loaded.y_test, loaded.num_classes
    if not isinstance(loaded, tuple | list) or len(loaded) != 4:
        raise UsageError(
            f"argument --data: {args.data} must return (x_train, y_train, x_test, y_test) "
            f"or a tuning.datasets.Dataset, got {type(loaded).__name__}"
        )
    import numpy as np

    y_train = np.asarray(loaded[1])
    classes = int(y_train.max()) + 1 if y_train.dtype.kind in "iu" else None
    return (*loaded, classes)


def _space(args: argparse.Namespace, learning_rate: tuple | None) -> Any:
    from tuning.space import AdamSearchSpace

    ranges = {
        "learning_rate": learning_rate or args.learning_rate,
        "beta_1": args.beta_1,
        "beta_2": args.beta_2,
        "epsilon": args.epsilon,
        "weight_decay": args.weight_decay,
    }
    given = {k: v for k, v in ranges.items() if v is not None}
    try:
        return AdamSearchSpace(**given, tuned=tuple(args.tune) if args.tune else None)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


class Progress:
    """Prints a live line per trial: running, then its hyperparameters, score and seconds."""

    def __init__(
        self,
        tuned: Sequence[str],
        objective: str,
        total: int | None,
        stream: Any,
        *,
        epochs: bool = False,
    ) -> None:
        """Print to `stream` for a search of `tuned` with `total` trials; `epochs`: say how many."""
        self.tuned, self.objective, self.total, self.stream = tuned, objective, total, stream
        self.epochs = epochs
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self._started = 0.0

    def begin(self, trial: Any) -> None:
        """Show that a trial is running (on a terminal, replaced when it ends)."""
        self._started = time.perf_counter()
        if self.live:
            number = int(trial.trial_id) + 1 if str(trial.trial_id).isdigit() else trial.trial_id
            of = f"/{self.total}" if self.total else ""
            self.stream.write(f"trial {number}{of}  running ...")
            self.stream.flush()

    def end(self, record: Any) -> None:
        """Print the finished trial's line."""
        from tuning.output import trial_line

        prefix = "\r\033[K" if self.live else ""
        line = trial_line(record, self.tuned, self.objective, self.total, epochs=self.epochs)
        self.stream.write(prefix + line + "\n")
        self.stream.flush()


def run(argv: Sequence[str] | None = None, stream: Any = None) -> int:
    """Parse `argv`, run the search, print and write the results.

    Returns:
        The exit status: 0 on success, 2 for bad arguments.
    """
    stream = stream or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset and args.data:
        parser.error("argument --data: not allowed with argument --dataset")
    from tuning.distributed import WorkerTimeoutError
    from tuning.fingerprint import SearchMismatchError

    try:
        return _run(args, stream)
    except (UsageError, SearchMismatchError) as error:
        parser.error(" ".join(str(error).split()))
    except Exception as error:
        import grpc

        # No trial completed, silent workers, or a chief that went away.
        if not isinstance(error, RuntimeError | WorkerTimeoutError | grpc.RpcError):
            raise
        lost = "lost the chief: " if isinstance(error, grpc.RpcError) else ""
        message = " ".join(str(error).split())
        print(f"{parser.prog}: {lost}{message}", file=sys.stderr, flush=True)
        return 1
    return 2  # pragma: no cover - parser.error exits


def _run(args: argparse.Namespace, stream: Any) -> int:
    x_train, y_train, x_test, y_test, num_classes = _load_data(args)
    if args.model is not None:
        build_model = _load_reference("--model", args.model)
    elif num_classes is None:
        raise UsageError("argument --model: required when --data gives non-integer labels")
    else:
        build_model = default_model(x_train.shape[1], num_classes)
    import tuning
    from tuning import asha, distributed
    from tuning.searching import objective_direction
    from tuning.space import AdamSearchSpace
    from tuning.tuners import default_max_trials

    max_trials = args.max_trials
    if max_trials is None:
        max_trials = default_max_trials(args.tuner)
    rungs = {}
    if args.tuner == "asha":
        rungs = {
            "min_epochs": args.min_epochs,
            "reduction_factor": args.reduction_factor or asha.REDUCTION_FACTOR,
        }
        if rungs["min_epochs"] is None:
            rungs["min_epochs"] = asha.default_min_epochs(args.epochs, rungs["reduction_factor"])
        if rungs["min_epochs"] > args.epochs:
            raise UsageError(
                f"argument --min-epochs: must be at most --epochs ({args.epochs}), "
                f"got {rungs['min_epochs']}"
            )
    else:
        for option in ("min_epochs", "reduction_factor"):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise UsageError(f"argument {flag}: applies to --tuner asha only")
    project = args.project or (
        args.dataset or "digits" if args.data is None else args.data.replace(":", "-")
    )
    learning_rate = None
    if args.lr_range_test:
        learning_rate = _range_test(build_model, x_train, y_train, args, stream)
    space = _space(args, learning_rate)
    if args.objective and "acc" in args.objective and num_classes is None:
        raise UsageError(f"argument --objective: {args.objective} needs classification labels")
    try:
        objective_direction(args.objective)
    except ValueError:
        raise UsageError(
            f"argument --objective: cannot tell whether to minimize or maximize "
            f"{args.objective!r}; name a loss or an accuracy-like metric"
        ) from None
    role = distributed.role()
    tuned = AdamSearchSpace.for_budget(space, max_trials).tuned_names()
    progress = Progress(tuned, args.objective, max_trials, stream, epochs=bool(rungs))
    if rungs:
        plan = f"{max_trials} configurations, {asha.describe(args.epochs, **rungs)}"
    else:
        plan = f"{max_trials or 'Hyperband'} trials, {args.epochs} epochs each"
    print(
        f"Searching {', '.join(tuned)} with {args.tuner} ({plan}) on {project}; results in "
        f"{os.path.join(args.directory, project)}/",
        file=stream,
        flush=True,
    )
    result = _search(
        tuning.search,
        build_model,
        x_train,
        y_train,
        validation_split=0.2,
        test_data=(x_test, y_test),
        objective=args.objective,
        tuner=args.tuner,
        max_trials=max_trials,
        epochs=args.epochs,
        **rungs,
        batch_size=args.batch_size,
        seed=args.seed,
        space=space,
        early_stopping=args.early_stopping,
        directory=args.directory,
        project=project,
        overwrite=args.overwrite,
        comparison_repeats=args.comparison_repeats,
        optimizer_options=_optimizer_options(args),
        worker_timeout=args.worker_timeout,
        tensorboard=args.tensorboard,
        on_trial_begin=progress.begin,
        on_trial_end=progress.end,
    )
    if result is None:
        print(f"worker {os.environ.get('KERASTUNER_TUNER_ID')}: no trials left", file=stream)
        return 0
    paths = result.write(plot=not args.no_plot)
    _print_result(result, paths, role, stream, _optimizer_options(args))
    return 0


def _search(search: Callable, *args: Any, **kwargs: Any) -> Any:
    """`tuning.search`, with a loss it cannot infer reported as a usage error."""
    try:
        return search(*args, **kwargs)
    except ValueError as error:
        if str(error).startswith("Argument `loss`"):
            raise UsageError(f"argument --model: {error}") from None
        raise


def _range_test(build_model: Callable, x: Any, y: Any, args: Any, stream: Any) -> tuple:
    import keras

    import keras_adam
    from tuning.hypermodel import _takes_hp
    from tuning.inference import infer_loss
    from tuning.lr_range import lr_range_test

    keras.utils.set_random_seed(args.seed)
    if _takes_hp(build_model):
        import keras_tuner

        model = build_model(keras_tuner.HyperParameters())
    else:
        model = build_model()
    try:
        loss = infer_loss(model, y)[0]
    except ValueError as error:
        raise UsageError(f"argument --lr-range-test: {error}") from None
    model.compile(optimizer=keras_adam.Adam(), loss=loss)
    low, high = args.learning_rate or (1e-7, 10.0)
    try:
        result = lr_range_test(
            model, x, y, batch_size=args.batch_size, min_learning_rate=low, max_learning_rate=high
        )
    except ValueError as error:  # e.g. the loss never decreased: no bounds to propose
        raise UsageError(f"argument --lr-range-test: {' '.join(str(error).split())}") from None
    bounds = result.suggested_bounds
    print(
        f"LR range test ({len(result.learning_rates)} steps, {result.stopped_reason}): "
        f"searching learning_rate in [{bounds[0]:.3g}, {bounds[1]:.3g}]",
        file=stream,
        flush=True,
    )
    return bounds


def _optimizer_options(args: argparse.Namespace) -> dict:
    """The `keras_adam.Adam` arguments fixed in every trial by the command line."""
    return {} if args.moment_dtype is None else {"moment_dtype": args.moment_dtype}


def _print_result(
    result: Any, paths: dict, role: str, stream: Any, options: dict | None = None
) -> None:
    from tuning.records import SETTLED_EPOCHS

    print("\n" + result.table(), file=stream)
    fixed = "".join(f", {k}={v!r}" for k, v in (options or {}).items())
    values = ", ".join(
        f"{k}={v!r}" for k, v in result.best_hyperparameters.items() if v is not None
    )
    values += fixed
    scores = f"{result.objective} = {result.score:.4f}"
    if result.settled is not None:
        scores += f", {result.settled:.4f} over the last {SETTLED_EPOCHS} epochs"
    print(f"\nBest optimizer ({scores}):\n  keras_adam.Adam({values})", file=stream)
    if result.comparison is not None:
        default = f"keras_adam.Adam({fixed[2:]})"
        print(f"\nAgainst default Adam ({default}):", file=stream)
        print(result.comparison.summary(), file=stream)
        if not result.comparison.tuned_is_better:
            print(f"Use {default} with its defaults for this problem.", file=stream)
    print("\nWrote " + ", ".join(paths.values()), file=stream, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of `keras-adam-tune`.

    Its stderr goes without TensorFlow's native start-up log lines unless
    `TF_CPP_MIN_LOG_LEVEL` is set (`tuning.native_logs`).
    """
    with native_logs.filtered():
        status = run(argv)
    sys.exit(status)
