"""`python -m benchmarks.tuning_search`: how well and how fast the default search spends its budget.

On the bundled datasets (digits, breast_cancer, wine) and a synthetic
`make_classification` problem, for each search seed, three systems search
η and β1 (log η, log(1 − β1), the default ranges) with the same budget,
data split, model and initial weights:

- `ours`: `tuning.search(tuner="bayesian")` as shipped;
- `previous`: the previous default, KerasTuner's `BayesianOptimizationOracle`
  (UCB, β=2.6) with its per-trial checkpoints, random first trial;
- `optuna`: Optuna's TPE sampler on the same space (`pip install ".[benchmarks]"`).

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

PROBLEMS = ("digits", "breast_cancer", "wine", "synthetic")
SYSTEMS = ("ours", "previous", "optuna")
EDGE = 1e-3


def load(name: str):
    """`(x_train, y_train, x_test, y_test, classes)` for a problem, split with seed 0."""
    from tuning.datasets import load_dataset

    if name != "synthetic":
        d = load_dataset(name)
        return d.x_train, d.y_train, d.x_test, d.y_test, d.num_classes
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=1500, n_features=20, n_informative=8, n_classes=3, random_state=0
    )
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    return x[300:], y[300:], x[:300], y[:300], 3


def builder(features: int, classes: int):
    """The CLI's default model: a two-hidden-layer perceptron ending in logits."""
    from tuning.cli import default_model

    return default_model(features, classes)


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
        model = builder(x.shape[1], classes)()
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
    repeats: int,
):  # fmt: skip
    """One search with `tuning.search` ("ours" or "previous").

    Returns the trials' points, the best point, the wall and `fit` seconds,
    and (ours) the verdict.

    The wall time runs from the call to the end of the last trial, so it
    leaves out the comparison that follows the search ("ours" only, with
    `repeats` runs a side).
    """
    import keras_tuner

    import tuning
    from tuning import oracles, tuners

    x, y, x_test, y_test, classes = data
    saved = oracles.BayesianOracle, tuners.AdamTuner.checkpoints, tuners.frozen_heap
    if system == "previous":
        oracles.BayesianOracle = keras_tuner.oracles.BayesianOptimizationOracle
        tuners.AdamTuner.checkpoints = True
        tuners.frozen_heap = contextlib.nullcontext
    ended = [0.0]

    def trial_ended(record) -> None:
        ended[0] = time.perf_counter()

    try:
        started = time.perf_counter()
        result = tuning.search(
            builder(x.shape[1], classes), x, y, test_data=(x_test, y_test),
            tuner="bayesian", max_trials=trials, epochs=epochs, batch_size=batch_size,
            seed=seed, directory=directory, overwrite=True, on_trial_end=trial_ended,
            comparison_repeats=repeats if system == "ours" else 0,
        )  # fmt: skip
        wall = ended[0] - started
    finally:
        oracles.BayesianOracle, tuners.AdamTuner.checkpoints, tuners.frozen_heap = saved
    fit = sum(record.fit_seconds or 0.0 for record in result.trials)
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
    return points, result.best_hyperparameters, wall, fit, verdict


def run_optuna(data, seed: int, trials: int, epochs: int, batch_size: int):
    """The same search with Optuna's TPE: trials, wall and fit seconds."""
    import keras
    import optuna

    import keras_adam

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    x, y, _, _, classes = data
    fit = [0.0]

    def objective(trial):
        eta = trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
        one_minus = trial.suggest_float("one_minus_beta_1", 0.01, 0.5, log=True)
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = builder(x.shape[1], classes)()
        model.compile(
            optimizer=keras_adam.Adam(learning_rate=eta, beta_1=1 - one_minus),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        started = time.perf_counter()
        history = model.fit(
            x, y, epochs=epochs, batch_size=batch_size, validation_split=0.2, verbose=0
        )
        fit[0] += time.perf_counter() - started
        losses = [v for v in history.history["val_loss"] if math.isfinite(v)]
        return min(losses) if losses else float("inf")

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    started = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    wall = time.perf_counter() - started
    points = [
        {"learning_rate": t.params["learning_rate"], "beta_1": 1 - t.params["one_minus_beta_1"]}
        for t in study.trials
    ]
    best = dict(points[study.best_trial.number], beta_2=0.999, epsilon=1e-7)
    return points, best, wall, fit[0], None


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write `benchmarks/results/tuning_search.json`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tuning_search")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--seeds", type=int, default=2, help="search seeds per problem")
    parser.add_argument("--first-seed", type=int, default=0, help="the first search seed")
    parser.add_argument(
        "--merge", action="store_true",
        help="keep the rows of an existing tuning_search.json that this run does not redo",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="retrainings of each winner")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    from tuning.space import NAMES  # noqa: F401 - imports TensorFlow once, before timing

    rows = []
    initial = 6  # 3 × 2 dimensions, the first (default or random) trials of both GP oracles
    for problem in args.problems:
        data = load(problem)
        unseen = [1000 + r for r in range(args.repeats)]
        default_loss = float(
            np.mean(retrain(data, {"learning_rate": 1e-3}, unseen, args.epochs, args.batch_size))
        )
        for system in args.systems:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                with tempfile.TemporaryDirectory() as directory:
                    if system == "optuna":
                        out = run_optuna(data, seed, args.trials, args.epochs, args.batch_size)
                        guided_from = 10  # TPE's default n_startup_trials
                    else:
                        out = run_tuning(
                            system, data, seed, args.trials, args.epochs, args.batch_size,
                            directory, args.repeats,
                        )  # fmt: skip
                        guided_from = initial
                points, best, wall, fit, verdict = out
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
    path = args.output / "tuning_search.json"
    saved = {"args": vars(args) | {"output": str(args.output)}, "rows": rows}
    if args.merge and path.exists():
        saved = merged(json.loads(path.read_text()), saved)
    path.write_text(json.dumps(saved, indent=1))
    print(summary(saved["rows"]))


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
    within about two standard errors is not a difference.
    """
    lines = [
        f"{'problem':14} {'system':9} {'seeds':>5} {'edge':>5} {'overhead':>8} {'wall s':>7} "
        f"{'test loss':>15} {'default':>7} {'minus ours':>16}  verdicts"
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
        ours = {r["seed"]: r["test_loss"] for r in rows if r["problem"] == problem
                and r["system"] == "ours"}  # fmt: skip
        gaps = [r["test_loss"] - ours[r["seed"]] for r in group if r["seed"] in ours]
        gap = ""
        if system != "ours" and len(gaps) > 1:
            error = float(np.std(gaps, ddof=1)) / math.sqrt(len(gaps))
            gap = f"{np.mean(gaps):+.4f} ± {error:.4f}"
        verdicts = Counter(r["verdict"]["use"] for r in group if r["verdict"])
        lines.append(
            f"{problem:14} {system:9} {len(group):>5} {mean['edge']:>5.0%} "
            f"{mean['overhead']:>8.0%} {mean['wall']:>7.1f} "
            f"{mean['test_loss']:>7.4f} ± {spread:.4f} {group[0]['default_test_loss']:>7.4f} "
            f"{gap:>16}  {', '.join(f'{k} {n}' for k, n in verdicts.items())}".rstrip()
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
