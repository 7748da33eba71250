"""The backend-neutral tests and each backend's own, on JAX and on PyTorch.

Keras reads `KERAS_BACKEND` once per process: this TensorFlow run starts
one pytest per other backend, which collects `test_any_*.py` and
`test_on_<backend>_*.py` (see conftest.py), and fails with its report if
any test there fails.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_suite_on_backend(backend):
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONHASHSEED": "0"}
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfE",
            str(TESTS),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS.parent,
        timeout=2400,
        check=False,
    )
    report = result.stdout[-12000:] + result.stderr[-3000:]
    print(f"--- KERAS_BACKEND={backend} ---\n{report}")
    assert result.returncode == 0, report
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 100, summary
    assert "failed" not in summary and "error" not in summary, summary
