"""`keras-adam-tune` under this process's Keras backend (`KERAS_BACKEND`)."""

import json
import math
import os
import subprocess
import sys

from neutral import BACKEND


def test_cli_tunes_bundled_data_on_this_backend(tmp_path):
    command = [
        sys.executable, "-m", "tuning", "--dataset", "digits", "--tuner", "hyperband",
        "--max-trials", "3", "--epochs", "2", "--comparison-repeats", "1",
        "--directory", str(tmp_path), "--no-plot",
    ]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best optimizer" in result.stdout
    best = json.loads((tmp_path / "digits" / "best.json").read_text())
    assert best["completed"] >= 2
    assert math.isfinite(best["score"]), best
