"""The folders that run on JAX and on PyTorch, each in its own pytest.

Keras reads `KERAS_BACKEND` once per process: this TensorFlow run starts one
pytest per other backend and folder (`any/`, `jax/`, `torch/`, `tuning/any/`:
see conftest.py), and fails with its report if any test there fails or any
test file there ran no test. One test per folder, not per backend, so that
pytest-xdist's two workers share them (a whole backend took one worker
14 minutes while the other waited).
"""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import TESTS, backends_of, folders_on

#: Seconds each took alone on one core (tests/conftest.py's setting), to start
#: the longest first; a folder not listed counts as a minute.
SECONDS = {
    ("jax", "any"): 85,
    ("jax", "tuning/any"): 65,
    ("jax", "jax"): 60,
    ("torch", "torch"): 90,
    ("torch", "any"): 35,
    ("torch", "tuning/any"): 30,
}
UNITS = sorted(
    [(backend, folder) for backend in ("jax", "torch") for folder in folders_on(backend)],
    key=lambda unit: -SECONDS.get(unit, 60),
)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "folder"), UNITS, ids=[f"{b}-{f}" for b, f in UNITS])
def test_folder_on_backend(backend, folder, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONHASHSEED": "0"}
    env.pop("PYTEST_XDIST_WORKER", None)
    report_xml = tmp_path / "report.xml"
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
            f"--junitxml={report_xml}",
            # This folder's own files only (a nested folder is a unit of its own).
            *sorted(str(path) for path in (TESTS / folder).glob("test_*.py")),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS.parent,
        timeout=2400,
        check=False,
    )
    report = result.stdout[-12000:] + result.stderr[-3000:]
    print(f"--- KERAS_BACKEND={backend} tests/{folder} ---\n{report}")
    assert result.returncode == 0, report
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    assert "failed" not in summary and "error" not in summary, summary

    # Every test file of the folder ran on this backend: none was left out by
    # conftest.py or skipped as a whole.
    expected = {
        path.stem
        for path in (TESTS / folder).glob("test_*.py")
        if backend in backends_of(path.parent)
    }
    ran = {
        part
        for case in ET.parse(report_xml).iter("testcase")
        if case.find("skipped") is None
        for part in case.get("classname", "").split(".")
    }
    assert expected and expected <= ran, sorted(expected - ran)
