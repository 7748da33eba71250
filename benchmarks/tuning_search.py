"""`python -m benchmarks.tuning_search`: how well and how fast the default search spends its budget.

On the bundled datasets (digits, breast_cancer, wine) and a synthetic
`make_classification` problem, for each search seed, three systems search
η and β1 (log η, log(1 − β1), the default ranges) with the same budget,
data split, model and initial weights:

- `ours`: `tuning.search(tuner="bayesian")` as shipped;
- `previous`: the previous default, KerasTuner's `BayesianOptimizationOracle`
  (UCB, β=2.6) with its per-trial checkpoints, random first trial;
- `optuna`: Optuna's TPE sampler on the same space (`pip install ".[benchmarks]"`);
- `asha`: `tuning.search(tuner="asha")` on the same space, with
  `--asha-trials` configurations (default 30: about 0.85 of the epochs of
  20 full trials), rungs at 5 and 15 epochs (`--asha-min-epochs 1`: 2, 5
  and 15);
- `random2`: `tuning.search(tuner="random")` with twice `--trials`, the
  classic baseline of the multi-fidelity papers;
- `optuna_hyperband`, `optuna_sh`: Optuna's TPE with its `HyperbandPruner`
  or `SuccessiveHalvingPruner` (reduction factor 3, 1 to `--epochs`
  epochs), `--asha-trials` trials, each reporting its validation loss at
  every epoch;
- `kt_hyperband`: KerasTuner's own `Hyperband` (factor 3, `--epochs` at
  most) with `keras.optimizers.Adam`, as a Keras user would run it.

Every system also records its *anytime curve*, held out: at each moment a
trial finishes its full `--epochs`, the wall time since the search began,
the settled score (mean of the last 5 epochs' validation loss) of the best
such trial so far, and that trial's loss on the test split, evaluated as it
ended, off the clock (`Anytime`); `--plot PATH` draws the test losses per
problem. `reach` (in the summary) is how soon a system first held a trial
as good on the test split as the one ours ended with, in units of ours'
wall time: the issue's "same quality in a third of the time" is reach ≤ 1/3.
`at ours time` compares the searches at equal wall time (what each held
when ours ended), `at equal epochs` at an equal epoch budget (what each
held once both had trained as many epochs as the one that trained fewer).

Reported per problem and system (means over seeds):

- `edge`: share of model-guided trials (after the initial random ones)
  with η or β1 on a range edge (within 0.1% of the log range);
- `overhead`: share of the search's wall time spent outside the trials'
  own `Model.fit` (proposal, model building, bookkeeping);
- `test_loss`: the winner retrained `--repeats` times from initial weights
  no search saw, scored on the test split (mean over runs), next to
  default Adam's;
- `verdict` (ours only): what `Comparison` concluded on the test split,
  per seed ("tuned" or "default").

More seeds can be added later: `--first-seed 2 --seeds 3 --merge` runs
seeds 2-4 and keeps the saved rows of the others. The summary gives each
system's mean test loss ± its spread over seeds, and its paired gap to
ours (same seeds) ± the gap's standard error.

Timings on a shared machine are noisy: read ratios, not seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

#: The bundled problems (seconds per trial) and two larger ones (a minute or more per
#: trial on 2 cores): a convnet on synthetic 28×28 images and a small text transformer.
PROBLEMS = ("digits", "breast_cancer", "wine", "synthetic", "convnet", "transformer")
SYSTEMS = (
    "ours", "previous", "optuna", "asha", "random2", "optuna_hyperband", "optuna_sh",
    "kt_hyperband",
)  # fmt: skip
#: Systems run through `tuning.search`, with the tuner they use.
TUNING_SYSTEMS = {"ours": "bayesian", "previous": "bayesian", "asha": "asha", "random2": "random"}
#: Systems whose every trial trains all `--epochs` (`held_out_after`).
FULL_TRIAL_SYSTEMS = ("ours", "previous", "random2", "optuna")
EDGE = 1e-3


def load(name: str):
    """`(x_train, y_train, x_test, y_test, classes)` for a problem, split with seed 0."""
    from tuning.datasets import load_dataset

    if name == "convnet":
        return images()
    if name == "transformer":
        return token_sequences()
    if name != "synthetic":
        d = load_dataset(name)
        return d.x_train, d.y_train, d.x_test, d.y_test, d.num_classes
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=1500, n_features=20, n_informative=8, n_classes=3, random_state=0
    )
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    return x[300:], y[300:], x[:300], y[:300], 3


def images(train: int = 12000, test: int = 2000, classes: int = 10):
    """28×28 grey images of 10 classes: a smooth template per class, shifted, scaled, noisy.

    The classes' templates share a random 7×7 pattern and differ by a
    smaller one of their own, blown up to 28×28; an image is its class's
    template rolled by up to 4 pixels each way, times a random contrast in
    [0.5, 1.5], plus Gaussian noise of standard deviation 1.5: a task a
    small convnet learns over many epochs, not one.
    """
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((1, 7, 7))
    templates = np.kron(shared + 0.5 * rng.standard_normal((classes, 7, 7)), np.ones((4, 4)))
    n = train + test
    labels = rng.integers(classes, size=n)
    shifts = rng.integers(-4, 5, size=(n, 2))
    x = np.stack(
        [np.roll(templates[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts, strict=True)]
    )
    x = x * rng.uniform(0.5, 1.5, size=(n, 1, 1)) + rng.normal(scale=1.5, size=x.shape)
    x = x[..., None].astype("float32")
    return x[test:], labels[test:], x[:test], labels[:test], classes


def token_sequences(train: int = 12000, test: int = 2000, classes: int = 4, length: int = 40):
    """Sequences of 40 tokens (vocabulary 100) whose class is the topic some of their words share.

    Each class owns 10 topic tokens; a sequence draws a tenth of its tokens
    from its class's topic and the rest uniformly from the vocabulary, in
    random order, so the label is in which tokens recur, not where, and a
    few sequences hold too little of their topic to be told.
    """
    rng = np.random.default_rng(0)
    vocabulary = 100
    topics = rng.permutation(vocabulary)[: classes * 10].reshape(classes, 10)
    n = train + test
    labels = rng.integers(classes, size=n)
    x = rng.integers(vocabulary, size=(n, length))
    topical = rng.random((n, length)) < 0.1
    x = np.where(
        topical, topics[labels][np.arange(n)[:, None], rng.integers(10, size=(n, length))], x
    )
    x = x.astype("int32")
    return x[test:], labels[test:], x[:test], labels[:test], classes


def builder(x: np.ndarray, classes: int):
    """The problem's model, chosen by its inputs; every model ends in logits.

    A convnet for images, a one-block transformer for tokens, else the CLI's
    default model (a two-hidden-layer perceptron).
    """
    import keras

    if x.ndim == 4:

        def convnet() -> keras.Model:
            return keras.Sequential(
                [
                    keras.Input(x.shape[1:]),
                    keras.layers.Conv2D(32, 3, activation="relu"),
                    keras.layers.MaxPooling2D(),
                    keras.layers.Conv2D(64, 3, activation="relu"),
                    keras.layers.MaxPooling2D(),
                    keras.layers.Flatten(),
                    keras.layers.Dense(64, activation="relu"),
                    keras.layers.Dense(classes),
                ]
            )

        return convnet
    if np.issubdtype(x.dtype, np.integer):

        def transformer() -> keras.Model:
            tokens = keras.Input(x.shape[1:], dtype="int32")
            positions = keras.ops.arange(x.shape[1])
            h = keras.layers.Embedding(int(x.max()) + 1, 32)(tokens)
            h = h + keras.layers.Embedding(x.shape[1], 32)(positions)
            attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)(h, h)
            h = keras.layers.LayerNormalization()(h + attended)
            forward = keras.layers.Dense(64, activation="relu")(h)
            h = keras.layers.LayerNormalization()(h + keras.layers.Dense(32)(forward))
            h = keras.layers.GlobalAveragePooling1D()(h)
            return keras.Model(tokens, keras.layers.Dense(classes)(h))

        return transformer
    from tuning.cli import default_model

    return default_model(x.shape[1], classes)


RANGES = {"learning_rate": (1e-5, 1e-1), "one_minus_beta_1": (0.01, 0.5)}


def edges(values: dict) -> list[str]:
    """Range edges (log scale) that η and 1 − β1 lie on, e.g. ["learning_rate=max"]."""
    point = {"learning_rate": values["learning_rate"], "one_minus_beta_1": 1 - values["beta_1"]}
    found = []
    for name, (low, high) in RANGES.items():
        u = (math.log(point[name]) - math.log(low)) / (math.log(high) - math.log(low))
        if u < EDGE:
            found.append(f"{name}=min")
        elif u > 1 - EDGE:
            found.append(f"{name}=max")
    return found


def on_edge(values: dict) -> bool:
    """Whether η or β1 lies on an edge of the default ranges (log scale)."""
    return bool(edges(values))


def retrain(data, values: dict, seeds: list[int], epochs: int, batch_size: int) -> list[float]:
    """Test loss of `values` trained from each seed, keeping the best validation epoch."""
    import keras

    import keras_adam
    from tuning.comparison import _KeepBestEpoch

    x, y, x_test, y_test, classes = data
    import keras_tuner

    objective = keras_tuner.Objective("val_loss", "min")
    losses = []
    for seed in seeds:
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = builder(x, classes)()
        model.compile(
            optimizer=keras_adam.Adam(**{k: v for k, v in values.items() if v is not None}),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        keep = _KeepBestEpoch(objective)
        model.fit(
            x, y, epochs=epochs, batch_size=batch_size, validation_split=0.2, verbose=0,
            callbacks=[keep],
        )  # fmt: skip
        value = model.evaluate(x_test, y_test, verbose=0)
        losses.append(float(value[0] if isinstance(value, list) else value))
    return losses


def run_tuning(
    system: str, data, seed: int, trials: int, epochs: int, batch_size: int, directory,
    repeats: int, min_epochs: int | None = None,
):  # fmt: skip
    """One search with `tuning.search` ("ours", "previous" or "asha").

    Returns the trials' points, the best point, the wall and `fit` seconds,
    and (ours) the verdict.

    The wall time runs from the call to the end of the last trial, so it
    leaves out the comparison that follows the search ("ours" only, with
    `repeats` runs a side).
    """
    import keras_tuner

    import tuning
    from tuning import oracles, tuners
    from tuning.space import AdamSearchSpace

    x, y, x_test, y_test, classes = data
    saved = oracles.BayesianOracle, tuners.AdamTuner.checkpoints, tuners.frozen_heap
    if system == "previous":
        oracles.BayesianOracle = keras_tuner.oracles.BayesianOptimizationOracle
        tuners.AdamTuner.checkpoints = True
        tuners.frozen_heap = contextlib.nullcontext
    ended = [0.0, 0.0]  # when the last trial ended, and the seconds scoring had taken by then
    anytime = Anytime((x_test, y_test))

    def trial_ended(record) -> None:
        if record.final and record.epochs == epochs and record.settled is not None:
            anytime.add(record.settled)
        ended[:] = time.perf_counter(), anytime.paused

    try:
        started = anytime.start()
        result = tuning.search(
            builder(x, classes), x, y, test_data=(x_test, y_test),
            tuner=TUNING_SYSTEMS[system], max_trials=trials,
            epochs=epochs, batch_size=batch_size, seed=seed, directory=directory,
            overwrite=True, on_trial_end=trial_ended,
            callbacks=[full_trial_scorer(anytime, epochs)],
            comparison_repeats=repeats if system != "previous" else 0,
            space=AdamSearchSpace(tuned=("learning_rate", "beta_1")),
            **({"min_epochs": min_epochs} if system == "asha" else {}),
        )  # fmt: skip
        wall = ended[0] - started - ended[1]
    finally:
        oracles.BayesianOracle, tuners.AdamTuner.checkpoints, tuners.frozen_heap = saved
    # The trials' `fit` seconds hold the test scoring done in their callbacks.
    fit = sum(record.fit_seconds or 0.0 for record in result.trials) - ended[1]
    points = [r.hyperparameters for r in result.trials]
    comparison = result.comparison
    verdict = None
    if comparison is not None:
        verdict = {
            "use": "tuned" if comparison.tuned_is_better else "default",
            "tuned": comparison.tuned_score,
            "tuned_spread": comparison.tuned_spread,
            "default": comparison.default_score,
            "default_spread": comparison.default_spread,
        }
    epochs_trained = sum(r.epochs or 0 for r in result.trials)
    return points, result.best_hyperparameters, wall, fit, verdict, epochs_trained, anytime.points


class Anytime:
    """The anytime curve of a search, held out: what it has found by each moment.

    A point is `(seconds, settled, test)`, added as a trial finishes all its
    epochs: the seconds since the search began, the best settled score
    (validation) of such trials so far, and the test-split loss of the
    trial that holds it, evaluated as it ended (`score`). Scoring is off
    the clock: `paused` seconds are left out of the points' times and of
    the search's wall time.
    """

    def __init__(self, test_data) -> None:
        self.points: list[tuple[float, float, float]] = []
        self.started = 0.0
        self.paused = 0.0
        self.test_data = test_data
        self.last_test = float("nan")

    def start(self) -> float:
        """Start the clock; its start, in `time.perf_counter` seconds."""
        self.started = time.perf_counter()
        return self.started

    def score(self, model) -> None:
        """Evaluate a model that has trained all its epochs on the test split, off the clock."""
        began = time.perf_counter()
        value = model.evaluate(*self.test_data, verbose=0)
        self.last_test = float(value[0] if isinstance(value, list) else value)
        self.paused += time.perf_counter() - began

    def add(self, settled: float) -> None:
        """A trial finished all its epochs with this settled score (and the last `score`)."""
        if not math.isfinite(settled):
            return
        seconds = time.perf_counter() - self.started - self.paused
        if self.points and self.points[-1][1] <= settled:
            self.points.append((seconds, *self.points[-1][1:]))
        else:
            self.points.append((seconds, settled, self.last_test))


def full_trial_scorer(anytime: Anytime, epochs: int):
    """A Keras callback that `anytime.score`s the model of every run that reaches `epochs`.

    KerasTuner deep-copies a search's callbacks for each trial; the callback
    reaches `anytime` through a closure, which deep copies share.
    """
    import keras

    def score(model) -> None:
        anytime.score(model)

    class ScoreFullTrials(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.last = -1

        def on_epoch_end(self, epoch, logs=None):
            self.last = epoch

        def on_train_end(self, logs=None):
            if self.last + 1 == epochs:
                score(self.model)

    return ScoreFullTrials()


def settled(losses: list[float]) -> float:
    """The mean of the last 5 values (as `tuning.records.settled_score`), inf if not finite."""
    from tuning.records import settled_score

    value = settled_score(losses)
    return float("inf") if value is None else value


def run_optuna(
    data, seed: int, trials: int, epochs: int, batch_size: int, pruner: str | None = None
):
    """The same search with Optuna's TPE, optionally pruned (`pruner`: "hyperband", "sh").

    Returns the trials' points, the best point, wall and fit seconds, no
    verdict, the epochs trained and the anytime curve.
    """
    import keras
    import optuna

    import keras_adam

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    x, y, x_test, y_test, classes = data
    fit = [0.0]
    trained = [0]
    anytime = Anytime((x_test, y_test))

    class Report(keras.callbacks.Callback):
        """Reports each epoch's validation loss to Optuna, and stops a pruned trial."""

        def __init__(self, trial):
            super().__init__()
            self.trial, self.pruned = trial, False

        def on_epoch_end(self, epoch, logs=None):
            trained[0] += 1
            value = float(logs["val_loss"])
            if pruner is None:
                return
            self.trial.report(value if math.isfinite(value) else 1e9, epoch)
            if self.trial.should_prune():
                self.pruned = True
                self.model.stop_training = True

    def objective(trial):
        eta = trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
        one_minus = trial.suggest_float("one_minus_beta_1", 0.01, 0.5, log=True)
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = builder(x, classes)()
        model.compile(
            optimizer=keras_adam.Adam(learning_rate=eta, beta_1=1 - one_minus),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        report = Report(trial)
        started = time.perf_counter()
        history = model.fit(
            x, y, epochs=epochs, batch_size=batch_size, validation_split=0.2, verbose=0,
            callbacks=[report],
        )  # fmt: skip
        fit[0] += time.perf_counter() - started
        if report.pruned:
            raise optuna.TrialPruned()
        curve = history.history["val_loss"]
        if len(curve) == epochs:
            anytime.score(model)
            anytime.add(settled(curve))
        losses = [v for v in curve if math.isfinite(v)]
        return min(losses) if losses else float("inf")

    pruners = {
        None: optuna.pruners.NopPruner(),
        "hyperband": optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=epochs, reduction_factor=3
        ),
        "sh": optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
    }
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruners[pruner]
    )
    started = anytime.start()
    study.optimize(objective, n_trials=trials)
    wall = time.perf_counter() - started - anytime.paused
    points = [
        {"learning_rate": t.params["learning_rate"], "beta_1": 1 - t.params["one_minus_beta_1"]}
        for t in study.trials
    ]
    best = dict(points[study.best_trial.number], beta_2=0.999, epsilon=1e-7)
    return points, best, wall, fit[0], None, trained[0], anytime.points


def run_kerastuner_hyperband(data, seed: int, epochs: int, batch_size: int, directory):
    """KerasTuner's own `Hyperband` with `keras.optimizers.Adam`, as a Keras user runs it."""
    import keras
    import keras_tuner

    x, y, x_test, y_test, classes = data
    trained = [0]
    anytime = Anytime((x_test, y_test))
    fit = [0.0]

    def build(hp):
        eta = hp.Float("learning_rate", 1e-5, 1e-1, sampling="log")
        one_minus = hp.Float("one_minus_beta_1", 0.01, 0.5, sampling="log")
        keras.utils.set_random_seed(seed)
        model = builder(x, classes)()
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=eta, beta_1=1 - one_minus),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    class Watch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.curve, self.began = [], time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            trained[0] += 1
            self.curve.append(float(logs["val_loss"]))
            self.last = epoch

        def on_train_end(self, logs=None):
            fit[0] += time.perf_counter() - self.began
            if self.last + 1 == epochs:  # a trial that reached Hyperband's top bracket
                anytime.score(self.model)
                anytime.add(settled(self.curve))

    tuner = keras_tuner.Hyperband(
        build, objective="val_loss", max_epochs=epochs, factor=3, seed=seed,
        directory=directory, project_name="kt", overwrite=True, max_consecutive_failed_trials=10**9,
    )  # fmt: skip
    started = anytime.start()
    tuner.search(x, y, batch_size=batch_size, validation_split=0.2, verbose=0, callbacks=[Watch()])
    wall = time.perf_counter() - started - anytime.paused
    trials = list(tuner.oracle.trials.values())
    points = [
        {
            "learning_rate": t.hyperparameters.values["learning_rate"],
            "beta_1": 1 - t.hyperparameters.values["one_minus_beta_1"],
        }
        for t in trials
    ]
    values = tuner.oracle.get_best_trials(1)[0].hyperparameters.values
    best = {
        "learning_rate": values["learning_rate"],
        "beta_1": 1 - values["one_minus_beta_1"],
        "beta_2": 0.999,
        "epsilon": 1e-7,
    }
    return points, best, wall, fit[0], None, trained[0], anytime.points


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write `benchmarks/results/tuning_search.json`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tuning_search")
    parser.add_argument(
        "--problems", nargs="+", default=list(PROBLEMS[:4]), choices=PROBLEMS,
        help="default: the four bundled ones (convnet and transformer take far longer)",
    )  # fmt: skip
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--seeds", type=int, default=2, help="search seeds per problem")
    parser.add_argument("--first-seed", type=int, default=0, help="the first search seed")
    parser.add_argument(
        "--merge", action="store_true",
        help="keep the rows of an existing tuning_search.json that this run does not redo",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--asha-trials", type=int, default=30, help="configurations of asha")
    parser.add_argument(
        "--asha-min-epochs", type=int, default=None, help="asha's first rung (default: its own)"
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="retrainings of each winner")
    parser.add_argument(
        "--no-verdict", action="store_true",
        help="skip the searches' own comparison with default Adam (it runs after the wall time)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="PATH",
        help="draw the anytime curves of every problem into PATH (a .png)",
    )  # fmt: skip
    parser.add_argument(
        "--plot-only", action="store_true", help="plot the saved results, run nothing"
    )
    args = parser.parse_args(argv)
    path = args.output / "tuning_search.json"
    if args.plot_only:
        plot_anytime(json.loads(path.read_text())["rows"], args.plot)
        return

    from tuning.space import NAMES  # noqa: F401 - imports TensorFlow once, before timing

    rows = []
    initial = 6  # 3 × 2 dimensions, the first (default or random) trials of both GP oracles
    for problem in args.problems:
        data = load(problem)
        unseen = [1000 + r for r in range(args.repeats)]
        default_loss = float(
            np.mean(retrain(data, {"learning_rate": 1e-3}, unseen, args.epochs, args.batch_size))
        )
        # Seed by seed, so that a run cut short still holds paired rows (printed as they come).
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for system in args.systems:
                with tempfile.TemporaryDirectory() as directory:
                    if system.startswith("optuna"):
                        pruned = system != "optuna"
                        out = run_optuna(
                            data, seed, args.asha_trials if pruned else args.trials,
                            args.epochs, args.batch_size,
                            pruner={"optuna": None, "optuna_hyperband": "hyperband",
                                    "optuna_sh": "sh"}[system],
                        )  # fmt: skip
                        guided_from = 10  # TPE's default n_startup_trials
                    elif system == "kt_hyperband":
                        out = run_kerastuner_hyperband(
                            data, seed, args.epochs, args.batch_size, directory
                        )
                        guided_from = 0  # no model
                    else:
                        trials = {"asha": args.asha_trials, "random2": 2 * args.trials}.get(
                            system, args.trials
                        )
                        out = run_tuning(
                            system, data, seed, trials, args.epochs, args.batch_size,
                            directory, 0 if args.no_verdict else args.repeats,
                            args.asha_min_epochs,
                        )  # fmt: skip
                        guided_from = initial
                points, best, wall, fit, verdict, epochs_trained, anytime = out
                guided = points[guided_from:]
                losses = retrain(data, best, unseen, args.epochs, args.batch_size)
                spread = float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0
                row = {
                    "problem": problem,
                    "system": system,
                    "seed": seed,
                    "edge": sum(map(on_edge, guided)) / max(1, len(guided)),
                    "guided": len(guided),
                    "overhead": (wall - fit) / wall,
                    "wall": wall,
                    "epochs_trained": epochs_trained,
                    "anytime": anytime,
                    "test_loss": float(np.mean(losses)),
                    "test_spread": spread,
                    "default_test_loss": default_loss,
                    "best": {k: best[k] for k in ("learning_rate", "beta_1")},
                    "verdict": verdict,
                    "edges": dict(Counter(e for p in guided for e in edges(p))),
                    "points": [[p["learning_rate"], p["beta_1"]] for p in points],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    saved = {"args": arguments, "rows": rows}
    if args.merge and path.exists():
        saved = merged(json.loads(path.read_text()), saved)
    path.write_text(json.dumps(saved, indent=1))
    print(summary(saved["rows"]))
    if args.plot is not None:
        plot_anytime(saved["rows"], args.plot)


def anytime_mean(rows: list[dict], grid: np.ndarray, held_out: bool = True) -> np.ndarray:
    """The mean over `rows` (seeds) of what each had found by each time of `grid`.

    With `held_out`, the test loss of the best trial so far; else its
    settled validation score. NaN at the times some seed had not yet
    finished a full trial.
    """
    curves = []
    for row in rows:
        points = row.get("anytime") or []
        times = np.array([p[0] for p in points])
        scores = np.array([p[2 if held_out else 1] for p in points])
        found = np.searchsorted(times, grid, side="right") - 1
        curves.append(np.where(found >= 0, scores[np.maximum(found, 0)], np.nan))
    return np.mean(curves, axis=0)


def reach(row: dict, ours: dict) -> float:
    """When `row`'s search first held a trial as good on the test split as ours ended with.

    In units of ours' wall time (same problem and seed); inf if never.
    """
    target = ours["anytime"][-1][2] if ours.get("anytime") else math.nan
    for seconds, _, test in row.get("anytime") or []:
        if test <= target:
            return seconds / ours["wall"]
    return math.inf


def held_out_at(row: dict, seconds: float) -> float:
    """The test loss of the best trial `row`'s search held `seconds` into it (nan if none yet)."""
    found = [test for time_, _, test in row.get("anytime") or [] if time_ <= seconds]
    return found[-1] if found else math.nan


def held_out_after(row: dict, epochs: int) -> float:
    """The test loss of the best trial `row`'s search held once it had trained `epochs` in all.

    A full-trial search (`FULL_TRIAL_SYSTEMS`) adds a point as each trial
    ends, every trial `epochs_trained / trials` epochs long, so its k-th
    point is where it stood after k trials' epochs. A multi-fidelity
    search's points do not say how many epochs it had trained by then, so
    only its end is known: its last point, if it trained no more than
    `epochs` in all. Nan where the answer is not known (no full trial yet,
    a full-trial search with a trial that added no point: a diverged one,
    or a row saved before the epochs were counted).
    """
    points = row.get("anytime") or []
    if "epochs_trained" not in row or "points" not in row:
        return math.nan
    if row["system"] not in FULL_TRIAL_SYSTEMS:
        return points[-1][2] if points and row["epochs_trained"] <= epochs else math.nan
    if len(points) != len(row["points"]):
        return math.nan
    trials = int(epochs // (row["epochs_trained"] / len(points)))
    return points[min(trials, len(points)) - 1][2] if trials > 0 else math.nan


def paired(gaps: list[float]) -> str:
    """`mean ± standard error` of paired differences ("" for fewer than 2)."""
    if len(gaps) < 2:
        return ""
    return f"{np.mean(gaps):+.4f} ± {float(np.std(gaps, ddof=1)) / math.sqrt(len(gaps)):.4f}"


def paired_known(gaps: list[float]) -> str:
    """`paired` over the gaps that are known (finite), with "(k/n)" when some are not."""
    known = [x for x in gaps if math.isfinite(x)]
    text = paired(known)
    return text + f" ({len(known)}/{len(gaps)})" if text and len(known) < len(gaps) else text


def plot_anytime(rows: list[dict], path: Path) -> None:
    """One panel per problem: each system's `anytime_mean` against wall time.

    Held out (the test loss of the best trial so far) when every row of a
    problem recorded it, else the settled validation score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = [p for p in PROBLEMS if any(r["problem"] == p and r.get("anytime") for r in rows)]
    if not problems:
        raise ValueError("No row has an anytime curve to plot (rows saved before they were kept).")
    figure, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.6))
    for axis, problem in zip(np.atleast_1d(axes), problems, strict=True):
        group = [r for r in rows if r["problem"] == problem and r.get("anytime")]
        held_out = all(len(r["anytime"][0]) == 3 for r in group)
        end = max(r["wall"] for r in group)
        grid = np.linspace(0, end, 200)
        for system in SYSTEMS:
            runs = [r for r in group if r["system"] == system]
            if runs:
                axis.plot(
                    grid, anytime_mean(runs, grid, held_out), label=f"{system} ({len(runs)})",
                    color=f"C{SYSTEMS.index(system)}",
                )  # fmt: skip
        axis.set_title(problem)
        axis.set_xlabel("wall seconds")
        axis.set_ylabel(
            "test loss of the best trial so far" if held_out else "best settled val_loss so far"
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("mean over seeds", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merged(old: dict, new: dict) -> dict:
    """`new` with the rows (and extra keys) of `old` that it does not redo.

    A row is identified by its problem, system and seed; `args` records
    every run's arguments, in order, under `runs`.
    """
    key = lambda r: (r["problem"], r["system"], r["seed"])  # noqa: E731
    redone = {key(r) for r in new["rows"]}
    kept = [r for r in old["rows"] if key(r) not in redone]
    runs = old.get("runs", [old["args"]]) + [new["args"]]
    return old | {"args": new["args"], "runs": runs, "rows": kept + new["rows"]}


def summary(rows: list[dict]) -> str:
    """A table by problem and system: means over seeds, and the paired gap to ours.

    `test loss` is the mean ± standard deviation over seeds of each seed's
    retrained winner; `minus ours` is the mean over the seeds both systems
    ran of (this system's test loss − ours) ± its standard error, so a gap
    within about two standard errors is not a difference. `reach` is the
    median over those seeds of `reach` (the time to hold a trial as good on
    the test split as ours ended with, ÷ ours' wall), and how many seeds
    got there at all. `at ours' time` is the equal-time comparison: the test
    loss of the trial each search held when ours ended (`held_out_at` ours'
    wall time), minus ours', mean ± standard error over seeds. `at equal
    epochs` is the equal-epoch one: each search's held-out loss once both
    had trained as many epochs as the one that trained fewer
    (`held_out_after`), minus ours'. Either gap counts only the seeds where
    both are known, and says how many those are when not all.
    """
    lines = [
        f"{'problem':14} {'system':16} {'seeds':>5} {'edge':>5} {'overhead':>8} {'wall s':>7} "
        f"{'epochs':>6} "
        f"{'test loss':>15} {'default':>7} {'minus ours':>16} {'reach':>10} "
        f"{'at ours time':>16} {'at equal epochs':>16}  verdicts"
    ]
    keys = sorted(
        {(r["problem"], r["system"]) for r in rows}, key=lambda k: (k[0], SYSTEMS.index(k[1]))
    )
    for problem, system in keys:
        group = [r for r in rows if r["problem"] == problem and r["system"] == system]
        mean = {
            k: float(np.mean([r[k] for r in group]))
            for k in ("edge", "overhead", "wall", "test_loss")
        }
        losses = [r["test_loss"] for r in group]
        spread = float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0
        ours = {r["seed"]: r for r in rows if r["problem"] == problem and r["system"] == "ours"}
        gaps = [r["test_loss"] - ours[r["seed"]]["test_loss"] for r in group if r["seed"] in ours]
        held_out = [
            (r, ours[r["seed"]])
            for r in group
            if r["seed"] in ours and r.get("anytime") and len(r["anytime"][0]) == 3
        ]
        reached = [reach(r, o) for r, o in held_out]
        ratio = ""
        if reached:
            finite = sum(map(math.isfinite, reached))
            ratio = f"{np.median(reached):.2f} {finite}/{len(reached)}"
        at_time = [held_out_at(r, o["wall"]) - held_out_at(o, o["wall"]) for r, o in held_out]
        at_epochs = []
        for r, o in held_out:
            epochs = min(r.get("epochs_trained", 0), o.get("epochs_trained", 0))
            at_epochs.append(held_out_after(r, epochs) - held_out_after(o, epochs))
        gap = paired(gaps) if system != "ours" else ""
        # (A search with no full trial yet when ours ended has no loss to compare.)
        equal_time = paired_known(at_time) if system != "ours" else ""
        equal_epochs = paired_known(at_epochs) if system != "ours" else ""
        used = Counter(r["verdict"]["use"] for r in group if r["verdict"])
        verdicts = ", ".join(f"{k} {n}" for k, n in used.items())
        lines.append(
            f"{problem:14} {system:16} {len(group):>5} {mean['edge']:>5.0%} "
            f"{mean['overhead']:>8.0%} {mean['wall']:>7.1f} "
            f"{np.mean([r.get('epochs_trained', 0) for r in group]):>6.0f} "
            f"{mean['test_loss']:>7.4f} ± {spread:.4f} {group[0]['default_test_loss']:>7.4f} "
            f"{gap:>16} {ratio:>10} {equal_time:>16} {equal_epochs:>16}  {verdicts}".rstrip()
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
