"""`keras-adam-tune`: the contract's arguments, output files, resume, progress and bad input;
the command on every Keras backend (a process each)."""

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuning import cli

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv):
    out = io.StringIO()
    status = cli.run(list(argv), stream=out)
    return status, out.getvalue()


def test_search_on_a_tabular_dataset_writes_the_contract_files(tmp_path):
    status, out = run_cli(
        "--dataset", "wine", "--tuner", "random", "--max-trials", "3", "--epochs", "2",
        "--directory", str(tmp_path), "--comparison-repeats", "1", "--seed", "0",
    )  # fmt: skip
    assert status == 0
    project = tmp_path / "wine"  # the default project name comes from the dataset
    best = json.loads((project / "best.json").read_text())
    assert set(best) >= {"hyperparameters", "optimizer", "objective", "score", "trials", "baseline"}
    assert best["trials"] == 3 and best["objective"] == "val_loss"
    assert isinstance(best["baseline"]["score"], float)
    rows = list(csv.DictReader(open(project / "trials.csv")))
    assert [r["trial_id"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0])[:5] == ["trial_id", "status", "learning_rate", "beta_1", "beta_2"]
    assert (project / "trials.png").stat().st_size > 10_000
    # A live line per trial, then the table, the best optimizer and the comparison.
    for n in (1, 2, 3):
        assert f"trial {n}/3  learning_rate=" in out
    assert "Best optimizer (val_loss = " in out and "keras_adam.Adam(learning_rate=" in out
    # The winner is chosen by its last epochs' mean, which every trial line and the result show.
    assert out.count("(last 5: ") == 3 and "over the last 5 epochs" in out
    assert best["settled"] == min(float(r["settled"]) for r in rows)
    assert "Against default Adam" in out and "default" in out

    # Resume: a larger budget runs only the missing trial.
    status, out = run_cli(
        "--dataset", "wine", "--tuner", "random", "--max-trials", "4", "--epochs", "2",
        "--directory", str(tmp_path), "--comparison-repeats", "0", "--no-plot",
    )  # fmt: skip
    assert status == 0
    assert "trial 4/4" in out and "trial 1/4" not in out
    rows_after = list(csv.DictReader(open(project / "trials.csv")))
    assert rows_after[:3] == rows
    assert len(rows_after) == 4

    # --overwrite starts afresh.
    status, out = run_cli(
        "--dataset", "wine", "--tuner", "random", "--max-trials", "1", "--epochs", "1",
        "--directory", str(tmp_path), "--comparison-repeats", "0", "--overwrite", "--no-plot",
    )  # fmt: skip
    assert status == 0 and "trial 1/1" in out
    assert json.loads((project / "best.json").read_text())["trials"] == 1


def test_user_model_and_data_and_lr_range_test(tmp_path, monkeypatch):
    module = tmp_path / "user_code.py"
    module.write_text(
        "import keras\n"
        "from tuning.datasets import load_dataset\n"
        "def build(hp):\n"
        "    units = hp.Int('units', 8, 16, step=8)\n"
        "    return keras.Sequential([keras.Input((13,)), keras.layers.Dense(units,"
        " activation='relu'), keras.layers.Dense(3)])\n"
        "def data():\n"
        "    d = load_dataset('wine')\n"
        "    return d.x_train, d.y_train, d.x_test, d.y_test\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    status, out = run_cli(
        "--model", "user_code:build", "--data", "user_code:data", "--tuner", "grid",
        "--max-trials", "2", "--epochs", "2", "--directory", str(tmp_path),
        "--comparison-repeats", "0", "--lr-range-test", "--no-plot",
    )  # fmt: skip
    assert status == 0
    assert "LR range test" in out
    low, high = (float(v) for v in out.split("learning_rate in [")[1].split("]")[0].split(", "))
    assert 0 < low < high
    rows = list(csv.DictReader(open(tmp_path / "user_code-data" / "trials.csv")))
    assert len(rows) == 2
    assert all(low * 0.999 <= float(r["learning_rate"]) <= high * 1.001 for r in rows)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["--model", "no_colon"], "argument --model: must be MODULE:FUNCTION, got 'no_colon'"),
        (["--data", "mod:"], "argument --data: must be MODULE:FUNCTION"),
        (["--max-trials", "0"], "argument --max-trials: must be a positive integer, got '0'"),
        (["--max-trials", "-3"], "argument --max-trials: must be a positive integer"),
        (["--epochs", "two"], "argument --epochs: must be a positive integer, got 'two'"),
        (["--learning-rate", "1e-2:1e-3"], "argument --learning-rate: low end must be below"),
        (["--beta-1", "0.9:0.5"], "argument --beta-1: low end must be below"),
        (["--beta-2", "0.9:1.5"], "Argument `beta_2` must be in [0, 1)"),
        (["--tuner", "sgd"], "argument --tuner: invalid choice: 'sgd'"),
        (["--model", "no_such_module_x:build"], "cannot import module 'no_such_module_x'"),
        (["--model", "json:no_such_function"], "module 'json' has no function 'no_such_function'"),
        (["--dataset", "wine", "--data", "a:b"], "not allowed with argument --dataset"),
        (["--objective", "val_thing"], "argument --objective: cannot tell whether to minimize"),
        (
            ["--tuner", "asha", "--reduction-factor", "1"],
            "argument --reduction-factor: must be an integer of at least 2, got '1'",
        ),
        (
            ["--tuner", "asha", "--min-epochs", "0"],
            "argument --min-epochs: must be a positive integer, got '0'",
        ),
        (
            ["--tuner", "asha", "--min-epochs", "9", "--epochs", "4"],
            "argument --min-epochs: must be at most --epochs (4), got 9",
        ),
        (["--min-epochs", "2"], "argument --min-epochs: applies to --tuner asha only"),
        (
            ["--tuner", "random", "--reduction-factor", "2"],
            "argument --reduction-factor: applies to --tuner asha only",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_tuner_accepts_every_tuner_and_lists_them_when_refusing(capsys):
    from tuning.tuners import TUNERS

    parse = cli.build_parser().parse_args
    for name in TUNERS:
        assert parse(["--tuner", name]).tuner == name
    with pytest.raises(SystemExit):
        parse(["--tuner", "annealing"])
    listed = re.search(r"choose from (.*?)\)", capsys.readouterr().err).group(1)
    assert sorted(re.findall(r"\w+", listed)) == sorted(TUNERS)


def test_console_script_and_module_are_the_same_command():
    script = Path(sys.executable).parent / "keras-adam-tune"
    assert script.exists(), "the console script is installed with the package"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    via_script = subprocess.run(
        [str(script), "--max-trials", "0"], capture_output=True, text=True, env=env, timeout=120
    )
    via_module = subprocess.run(
        [sys.executable, "-m", "tuning", "--max-trials", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    for result in (via_script, via_module):
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "keras-adam-tune: error: argument --max-trials: must be a positive integer, got '0'"
        ]
    helps = [
        subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT).stdout
        for cmd in ([str(script), "--help"], [sys.executable, "-m", "tuning", "--help"])
    ]
    assert helps[0] == helps[1]
    contract = "--dataset --model --data --tuner --max-trials --epochs --seed --directory"
    for option in (*contract.split(), "--project", "--overwrite", "--lr-range-test"):
        assert option in helps[0]


def test_seed_seeds_the_search_and_split_seed_the_split():
    parse = cli.build_parser().parse_args
    split = [cli._load_data(parse(["--dataset", "wine", *extra])) for extra in (
        ["--seed", "1"], ["--seed", "2"], ["--split-seed", "1"],
    )]  # fmt: skip
    assert (split[0][0] == split[1][0]).all()  # two search seeds, one split
    assert not (split[0][0] == split[2][0]).all()


def test_python_and_the_command_line_share_the_epochs_default():
    import inspect

    import tuning
    from tuning.tuners import default_max_trials

    defaults = inspect.signature(tuning.search).parameters
    assert defaults["epochs"].default == cli.build_parser().parse_args([]).epochs
    # None in both: the tuner's own default budget.
    assert defaults["max_trials"].default is None
    assert cli.build_parser().parse_args([]).max_trials is None
    assert default_max_trials("bayesian") == cli.DEFAULT_MAX_TRIALS == 20
    assert default_max_trials("asha") == 30 and default_max_trials("hyperband") is None


def test_another_search_in_the_same_project_exits_2_naming_what_changed(tmp_path, capsys):
    argv = ["--dataset", "wine", "--tuner", "random", "--max-trials", "1",
            "--directory", str(tmp_path), "--comparison-repeats", "0", "--no-plot"]  # fmt: skip
    assert run_cli(*argv, "--epochs", "1")[0] == 0
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv, "--epochs", "2")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "changed: epochs" in err and "--overwrite" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_cli_tunes_bundled_data_on_every_backend(tmp_path, backend):
    """`keras-adam-tune` in a process of its own under each Keras backend."""
    command = [
        sys.executable, "-m", "tuning", "--dataset", "digits", "--tuner", "hyperband",
        "--max-trials", "3", "--epochs", "2", "--comparison-repeats", "1",
        "--directory", str(tmp_path), "--no-plot",
    ]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best optimizer" in result.stdout
    best = json.loads((tmp_path / "digits" / "best.json").read_text())
    assert best["completed"] >= 2
    assert math.isfinite(best["score"]), best


def test_moment_dtype_fixes_the_state_of_every_trial_and_of_default_adam(tmp_path, capsys):
    argv = ["--dataset", "digits", "--tuner", "random", "--max-trials", "2", "--epochs", "1",
            "--directory", str(tmp_path), "--comparison-repeats", "1", "--no-plot"]  # fmt: skip
    status, out = run_cli(*argv, "--moment-dtype", "int8")
    assert status == 0
    assert re.search(r"keras_adam\.Adam\(learning_rate=[^\n]*, moment_dtype='int8'\)", out)
    assert "Against default Adam (keras_adam.Adam(moment_dtype='int8'))" in out
    best = json.loads((tmp_path / "digits" / "best.json").read_text())
    assert best["optimizer"]["moment_dtype"] == "int8"
    # A search resumed with other state is another search.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv, "--moment-dtype", "int4")
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_tensorflow_native_log_lines_are_dropped_and_nothing_else():
    from tuning.native_logs import NATIVE_LINE

    native = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796493760.222110   24462 port.cc:153] oneDNN custom operations are on.",
        "I0000 00:00:1796493760.223145   24462 cudart_stub.cc:31] Could not find cuda drivers",
        "E0000 00:00:1796493765.574731   24462 cuda_platform.cc:52] failed call to cuInit: x",
        "W1205 17:02:03.123456    8960 loader.cc:12] a warning after initialization",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
    ]
    kept = [
        "E1205 17:02:03.123456    8960 kernel.cc:12] an error after start-up",
        "Traceback (most recent call last):",
        "keras_adam: compiled the Adam kernels in 60.1 s",
        "/x.py:3: UserWarning: I0000 00:00:1.0 1 a.cc:1] quoted",
        "I0000 is not a log line",
        "keras-adam-tune: error: argument --max-trials: must be a positive integer, got '0'",
    ]
    assert all(NATIVE_LINE.match(line.encode()) for line in native)
    assert not any(NATIVE_LINE.match(line.encode()) for line in kept)


@pytest.mark.parametrize("user_level", [None, "0"])
def test_the_command_keeps_tensorflows_start_up_lines_out_unless_asked(tmp_path, user_level):
    # Also the command's --tensorboard, checked in the same run.
    from tuning.native_logs import NATIVE_LINE

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_BACKEND"] = "tensorflow"
    if user_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    command = [
        sys.executable, "-m", "tuning", "--dataset", "wine", "--tuner", "random",
        "--max-trials", "1", "--epochs", "1", "--comparison-repeats", "0", "--no-plot",
        "--directory", str(tmp_path), "--tensorboard", str(tmp_path / "board"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert b"Best optimizer" in result.stdout
    # --tensorboard: a run per trial beside the experiment (test_search.py reads them).
    assert (tmp_path / "board" / "trial_0").is_dir()
    assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "board"))
    native = [line for line in result.stderr.splitlines() if NATIVE_LINE.match(line)]
    if user_level is None:
        assert native == [], native  # and stdout never held them
        assert not [line for line in result.stdout.splitlines() if NATIVE_LINE.match(line)]
    else:  # the user asked: TensorFlow's own lines, as it writes them (oneDNN's on x86 CPUs)
        assert any(b"] " in line for line in native), result.stderr.decode()[-3000:]
