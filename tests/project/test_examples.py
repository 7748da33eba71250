"""Every script in examples/ runs, on a small budget."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_digits_prints_the_optimizers_side_by_side():
    out = run_example("train_digits.py", "--epochs", "3")
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith(("keras_adam.", "keras.optimizers"))
    }
    assert set(rows) == {"keras_adam.Adam", "keras_adam.Adam(fused=False)", "keras.optimizers.Adam"}
    for accuracy, seconds, epoch_ms in rows.values():
        assert 0.5 < float(accuracy) <= 1.0
        assert float(seconds) > 0 and float(epoch_ms) > 0
    deviations = {
        line.split(",")[1].split(" vs ")[0].strip(): float(line.rsplit(":", 1)[1])
        for line in out.splitlines()
        if line.startswith("max |weight difference|")
    }
    # The reference path is Keras's arithmetic exactly, and the fused kernel
    # takes Keras's scalars (1 - β in double, rounded once): no difference.
    assert deviations["keras_adam.Adam(fused=False)"] == 0
    assert deviations["keras_adam.Adam"] == 0


def test_train_digits_rejects_a_bad_budget():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "--epochs must be >= 1, got 0" in result.stderr
