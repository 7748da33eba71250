"""examples/paper_experiments.py: the paper's Section 6 designs, on the --small budget."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "paper_experiments.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_script():
    spec = importlib.util.spec_from_file_location("paper_experiments", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pe = load_script()


def start_script(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def finish(process, timeout=240):
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The --small run, and a second run of its CNN with the same seed.

    Both start at once: each is mostly single-threaded Python (tracing), so
    on two cores they overlap.
    """
    out, again = tmp_path_factory.mktemp("paper"), tmp_path_factory.mktemp("again")
    first = start_script("--small", "--output", str(out), "--markdown", str(out / "table.md"))
    second = start_script("--small", "--experiments", "cnn", "--output", str(again))
    try:
        stdout = finish(first)
        finish(second)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.communicate()
    return out, stdout, again


@pytest.fixture(scope="module")
def small_run(runs):
    out, stdout, _ = runs
    return out, stdout, json.loads((out / "results.json").read_text())


def test_small_run_writes_one_plot_per_experiment(small_run):
    out, _, _ = small_run
    for name in ("logreg", "mlp", "cnn"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 20_000  # axes, curves and a legend, not an empty canvas


def test_small_run_has_every_optimizer_of_every_experiment(small_run):
    _, _, results = small_run
    assert results["config"] == {"seed": 0, "epochs": 2, "batch_size": 128, "small": True}
    expected = {
        "logreg/digits": pe.SPECS["logreg"].optimizers,
        "logreg/breast_cancer": pe.SPECS["logreg"].optimizers,
        "mlp/digits": pe.SPECS["mlp"].optimizers,
        "cnn/digits": pe.SPECS["cnn"].optimizers,
    }
    assert set(results["runs"]) == set(expected)
    assert set(pe.SPECS["logreg"].optimizers) == {
        "Adam",
        "AdaMax",
        "AdaGrad",
        "RMSProp",
        "SGD-Nesterov",
    }
    assert "AdaDelta" in pe.SPECS["mlp"].optimizers  # as in the paper's Figure 2
    for key, optimizers in expected.items():
        entry = results["runs"][key]
        assert list(entry["optimizers"]) == list(optimizers), key
        for name, result in entry["optimizers"].items():
            costs = result["cost"]
            assert len(costs) == 3, (key, name)  # before training, then after each epoch
            assert all(c is not None and math.isfinite(c) and c > 0 for c in costs), (key, name)
            # One learning rate per optimizer on this budget: the grid's middle one.
            grid = pe.GRIDS[entry["experiment"]][name]
            (middle,) = pe.small_grid(grid)
            assert grid[0] < middle < grid[-1]
            assert result["best_learning_rate"] == middle
            assert list(result["grid"]) == [f"{middle:g}"]
            assert result["final_cost"] == costs[-1]
            decays = key.startswith("logreg") and name != "AdaGrad"
            assert result["learning_rate_schedule"] == ("alpha/sqrt(t)" if decays else "constant")
            assert 0 <= result["test_accuracy"] <= 1
            # Decreasing-ish: every optimizer ends below where it started.
            assert costs[-1] < costs[0], (key, name, costs)
        # Every optimizer of an experiment starts from the same weights.
        assert len({r["cost"][0] for r in entry["optimizers"].values()}) == 1, key
        assert entry["optimizers"]["Adam"]["test_accuracy"] > 0.5, key


def test_small_run_reports_adams_second_moment(small_run):
    _, _, results = small_run
    adam = results["runs"]["cnn/digits"]["optimizers"]["Adam"]["grid"]
    (run,) = adam.values()
    summary = run["adam_second_moment"]
    assert list(summary) == ["conv_1/kernel", "conv_2/kernel", "dense/kernel", "softmax/kernel"]
    for layer in summary.values():
        assert 0 <= layer["fraction_zero"] <= layer["fraction_below_epsilon"] <= 1
        assert layer["median_sqrt_v_hat"] >= 0
        assert layer["percentile_1_nonzero_sqrt_v_hat"] > 0


def test_small_run_prints_progress_and_the_table(small_run):
    out, stdout, results = small_run
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(progress) == sum(len(e["optimizers"]) for e in results["runs"].values()) == 21
    assert progress[0].startswith("[  1/21] logreg/digits")
    table = (out / "table.md").read_text()
    assert table in stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 21
    grid = pe.GRIDS["logreg"]["Adam"]
    middle = f"{pe.small_grid(grid)[0]:g}"
    assert rows[0].startswith(f"| logreg | digits | Adam | {middle} | {middle} |")
    assert len(rows[0].split("|")) == 10


def test_same_seed_gives_identical_curves(small_run, runs):
    # TensorFlow runs with op determinism, so a rerun is bit-identical. The
    # rerun is only the CNN (the most expensive, and convolutions are the
    # usual source of nondeterminism): each run reseeds, so an experiment's
    # curves do not depend on which others ran before it.
    _, _, first = small_run
    again_dir = runs[2]
    again = json.loads((again_dir / "results.json").read_text())
    assert again["config"] == first["config"]
    assert list(again["runs"]) == ["cnn/digits"]
    assert again["runs"]["cnn/digits"] == first["runs"]["cnn/digits"]
    assert (again_dir / "cnn.png").exists() and not (again_dir / "mlp.png").exists()


def test_a_bad_flag_exits_with_one_line(tmp_path, capsys):
    # main() parses before it trains or writes anything.
    with pytest.raises(SystemExit) as exit_info:
        pe.main(["--epochs", "0", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "paper_experiments.py: error: --epochs must be >= 1, got 0\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--experiments", "vae"], "argument --experiments: invalid choice: 'vae'"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1"),
    ],
)
def test_bad_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pe.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert message in err


def test_defaults_follow_the_paper():
    args = pe.parse_args([])
    assert (args.epochs, args.seed, args.small) == (45, 0, False)
    assert args.experiments == ["logreg", "mlp", "cnn"]
    assert args.json == args.output / "results.json"
    assert pe.parse_args(["--small"]).epochs == 2
    assert pe.parse_args(["--small", "--epochs", "3"]).epochs == 3
    assert pe.parse_args(["--experiments", "cnn", "logreg"]).experiments == ["logreg", "cnn"]
    adam = pe.make_optimizer("Adam", 1e-3)
    assert (adam.beta_1, adam.beta_2, adam.epsilon, adam.epsilon_mode) == (
        0.9,
        0.999,
        1e-8,
        "paper",
    )
    sgd = pe.make_optimizer("SGD-Nesterov", 0.01)
    assert (sgd.momentum, sgd.nesterov) == (0.9, True)
    for grid in (g for experiment in pe.GRIDS.values() for g in experiment.values()):
        assert 5 <= len(grid) <= 8 and list(grid) == sorted(grid)
        ratios = [b / a for a, b in zip(grid[:-1], grid[1:], strict=True)]
        assert all(2.99 <= r <= 3.34 for r in ratios), grid  # log-spaced, about sqrt(10)


def test_inverse_sqrt_decay_is_alpha_over_sqrt_t():
    schedule = pe.InverseSqrtDecay(0.3)
    # Keras passes the steps already taken: the first step is t = 1.
    for step, expected in [(0, 0.3), (3, 0.15), (99, 0.03)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)
    optimizer = pe.make_optimizer("Adam", schedule)
    variable = keras.Variable([1.0, 2.0])
    optimizer.build([variable])
    for _ in range(3):
        optimizer.apply_gradients([(keras.ops.ones_like(variable), variable)])
    assert float(optimizer.learning_rate) == pytest.approx(0.15, rel=1e-6)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert again.get_config() == {"initial_learning_rate": 0.3}


def test_epochs_to_reach_counts_from_the_initial_cost():
    assert pe.epochs_to_reach([2.3, 0.5, 0.09, 0.2]) == 2
    assert pe.epochs_to_reach([2.3, 0.5, None], target=0.1) is None
    assert pe.epochs_to_reach([0.05, 0.01]) == 0


def test_best_learning_rate_skips_diverged_runs():
    nan = math.nan
    assert pe.best_learning_rate({0.1: {"final_cost": 0.5}, 1.0: {"final_cost": nan}}) == 0.1
    assert pe.best_learning_rate({0.1: {"final_cost": 0.5}, 0.3: {"final_cost": 0.2}}) == 0.3
    assert pe.best_learning_rate({0.1: {"final_cost": 0.2}, 0.3: {"final_cost": 0.2}}) == 0.1
    assert pe.best_learning_rate({1.0: {"final_cost": nan}}) is None
