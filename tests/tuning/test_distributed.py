"""Distributed tuning: a chief and workers of `python -m tuning` on this machine.

- examples/distributed_tuning.py runs a chief and two workers to the end;
  both workers train trials and the chief writes the results;
- a worker killed during a trial does not hang the chief: it gives up after
  `--worker-timeout` with a one-line message naming the running trial, and a
  new chief with the worker restarted under the same KERASTUNER_TUNER_ID
  finishes the search;
- a worker restarted under the same id while the chief still waits picks up
  its unfinished trial and the search completes;
- ASHA's workers share promotions: a trial may end its first rung on one
  worker and go on from its checkpoint on the other.

Every process runs in its own process group and is killed by PID when the
test ends, whatever happened; every wait has a time bound.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distributed_tuning.py"
#: The trial count of `distributed_tuning.py --small`.
SMALL_TRIALS = 4
#: The budget of the chief/worker tests below.
MAX_TRIALS = 2
WORKER_TIMEOUT = 20
#: Seconds a process may take to start (TensorFlow's import) on 2 busy cores.
STARTUP = 120
PROJECT = "p"
TRIAL_LINE = re.compile(r"^trial (\d+)/(\d+)  ", re.MULTILINE)


sys.path.insert(0, str(EXAMPLE.parent))
import distributed_tuning as example  # noqa: E402  (the example's process launcher)

free_port = example.free_port


def kill_group(pid):
    """SIGKILL the process group led by `pid` (our children lead their own), if any is left."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill(process):
    if process.poll() is None:
        kill_group(process.pid)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
        pass
    kill_group(process.pid)  # anything the leader started


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def trial_numbers(text):
    """The trial numbers (1-based) of a worker's "trial N/M" progress lines."""
    return sorted(int(number) for number, _ in TRIAL_LINE.findall(text))


class Tuning(example.Process):
    """One `python -m tuning` process of a chief/worker search, output in files."""

    def __init__(
        self, tmp_path, name, tuner_id, port, *options, tuner="random", trials=MAX_TRIALS, epochs=2
    ):
        self.name = name
        log_dir = tmp_path / "logs" / name
        log_dir.mkdir(parents=True, exist_ok=True)
        # The example's command line, on its small budget (which adds --no-plot).
        arguments = ["--small", "--tuner", tuner, "--max-trials", str(trials)]
        arguments += ["--epochs", str(epochs), "--seed", "0", "--directory", str(tmp_path)]
        arguments += ["--project", PROJECT]
        command = [*example.tuning_command(example.parse_args(arguments)), *options]
        super().__init__(tuner_id, command, port, str(log_dir))
        self.out, self.err = Path(self.out_path), Path(self.err_path)
        self.process = self.popen

    def wait(self, timeout):
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout} s\n{self.log()}")

    def log(self):
        return (
            f"--- {self.name} (exit {self.process.poll()}) stdout ---\n{read(self.out)}"
            f"--- {self.name} stderr ---\n{read(self.err)[-3000:]}"
        )


def running_trial(project):
    """The id of the trial the chief has handed out and not yet seen end, or None."""
    for path in project.glob("trial_*/trial.json"):
        try:
            trial = json.loads(path.read_text())
        except (OSError, ValueError):  # being written
            continue
        if trial.get("status") == "RUNNING":
            return trial["trial_id"]
    return None


def wait_for_running_trial(project, runs, timeout=STARTUP):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trial_id = running_trial(project)
        if trial_id is not None:
            return trial_id
        for run in runs:
            if run.process.poll() is not None:
                pytest.fail(f"{run.name} exited before a trial started\n{run.log()}")
        time.sleep(0.05)
    pytest.fail("no trial started in time\n" + "\n".join(run.log() for run in runs))


def check_results(project, trials):
    best = json.loads((project / "best.json").read_text())
    assert best["trials"] == trials
    assert best["completed"] == trials
    with open(project / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["trial_id"] for row in rows] == [str(i) for i in range(trials)]
    assert {row["status"] for row in rows} == {"COMPLETED"}
    assert all(float(row["score"]) > 0 for row in rows)


@pytest.mark.slow
def test_example_runs_a_chief_and_two_workers(tmp_path):
    out, err = tmp_path / "example.out", tmp_path / "example.err"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        launcher = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--small", "--directory", str(tmp_path)]
            + ["--timeout", "240"],
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            start_new_session=True,
        )
    try:
        try:
            code = launcher.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the example still runs after 300 s\n{read(out)}\n{read(err)}")
    finally:
        kill(launcher)
        # Its chief and workers lead their own process groups: kill them by the
        # PIDs it printed, should it have died without stopping them.
        for pid in re.findall(r"^started \w+ \(pid (\d+)\)", read(out), re.MULTILINE):
            kill_group(int(pid))
    printed = read(out)
    assert code == 0, printed + read(err)[-5000:]
    for tuner_id in ("chief", "tuner1", "tuner2"):
        assert re.search(rf"^ *{tuner_id} \(pid \d+\): exit 0$", printed, re.MULTILINE)
    assert "Chief's output:" in printed and "COMPLETED" in printed  # the final table

    project = tmp_path / "digits-distributed"
    check_results(project, SMALL_TRIALS)
    assert not (project / "trials.png").exists()  # --small: --no-plot

    # Each worker printed a line per trial it finished: together, every trial
    # exactly once, and both took part (they start together, a trial takes a
    # few seconds and the search has 4).
    done = {}
    for worker in ("tuner1", "tuner2"):
        text = read(project / "logs" / f"{worker}.out")
        assert f"worker {worker}: no trials left" in text
        assert {total for _, total in TRIAL_LINE.findall(text)} <= {str(SMALL_TRIALS)}
        done[worker] = trial_numbers(text)
    assert sorted(done["tuner1"] + done["tuner2"]) == list(range(1, SMALL_TRIALS + 1)), done
    assert done["tuner1"] and done["tuner2"], done


@pytest.mark.slow
def test_a_dead_worker_does_not_hang_the_chief_and_the_search_resumes(tmp_path):
    project = tmp_path / PROJECT
    port = free_port()
    runs = []
    try:
        timeout = ("--worker-timeout", str(WORKER_TIMEOUT))
        chief = Tuning(tmp_path, "chief", "chief", port, *timeout)
        worker = Tuning(tmp_path, "worker", "tuner1", port, *timeout)
        runs += [chief, worker]
        trial_id = wait_for_running_trial(project, runs)
        kill(worker.process)

        # The chief gives up WORKER_TIMEOUT s after the worker's last call.
        assert chief.wait(WORKER_TIMEOUT + 30) == 1, chief.log()
        message = read(chief.err)
        assert "Traceback" not in message, chief.log()
        silent = re.search(r"No worker contacted the chief for (\d+) s", message)
        assert silent, chief.log()
        assert int(silent[1]) >= WORKER_TIMEOUT
        assert f"still running: trial {trial_id} (worker tuner1)" in message, chief.log()
        assert not (project / "best.json").exists()

        # A new chief (no --overwrite: it resumes) and the worker under the same id.
        chief = Tuning(tmp_path, "chief-again", "chief", port, *timeout)
        worker = Tuning(tmp_path, "worker-again", "tuner1", port, *timeout)
        runs += [chief, worker]
        assert chief.wait(STARTUP + 120) == 0, chief.log() + worker.log()
        assert worker.wait(60) == 0, worker.log()
        assert "worker tuner1: no trials left" in read(worker.out)
        # The interrupted trial was run again; trials finished before were not.
        numbers = trial_numbers(read(worker.out))
        assert numbers == list(range(int(trial_id) + 1, MAX_TRIALS + 1)), worker.log()
        check_results(project, MAX_TRIALS)
    finally:
        for run in runs:
            kill(run.process)


@pytest.mark.slow
def test_a_worker_restarted_under_its_id_completes_the_search(tmp_path):
    project = tmp_path / PROJECT
    port = free_port()
    runs = []
    try:
        # Long enough for the new worker to start: the search ends well before.
        timeout = ("--worker-timeout", "150")
        chief = Tuning(tmp_path, "chief", "chief", port, *timeout)
        worker = Tuning(tmp_path, "worker", "tuner1", port, *timeout)
        runs += [chief, worker]
        trial_id = wait_for_running_trial(project, runs)
        kill(worker.process)

        worker = Tuning(tmp_path, "worker-again", "tuner1", port, *timeout)
        runs.append(worker)
        assert chief.wait(STARTUP + 120) == 0, chief.log() + worker.log()
        assert worker.wait(60) == 0, worker.log()
        assert "No worker contacted the chief" not in read(chief.err)
        # The chief handed the restarted worker its unfinished trial first.
        numbers = trial_numbers(read(worker.out))
        assert numbers == list(range(int(trial_id) + 1, MAX_TRIALS + 1)), worker.log()
        assert "COMPLETED" in read(chief.out)  # the final table
        check_results(project, MAX_TRIALS)
    finally:
        for run in runs:
            kill(run.process)


ASHA_LINE = re.compile(r"^trial (\d+)/(\d+)  .* after (\d+) epochs? ", re.MULTILINE)


@pytest.mark.slow
def test_asha_workers_share_rungs_and_promotions(tmp_path):
    project = tmp_path / PROJECT
    port = free_port()
    runs = []
    try:
        budget = {"tuner": "asha", "trials": 6, "epochs": 3}  # rungs at 1 and 3 epochs
        chief = Tuning(tmp_path, "chief", "chief", port, "--worker-timeout", "150", **budget)
        workers = [
            Tuning(tmp_path, name, name, port, "--worker-timeout", "150", **budget)
            for name in ("tuner1", "tuner2")
        ]
        runs += [chief, *workers]
        assert chief.wait(STARTUP + 240) == 0, "".join(run.log() for run in runs)
        ended = {}
        for worker in workers:
            assert worker.wait(60) == 0, worker.log()
            lines = ASHA_LINE.findall(read(worker.out))
            assert lines, worker.log()  # both took part
            ended[worker.name] = [(int(number), int(epochs)) for number, _, epochs in lines]
        # Every configuration ended its first rung once, and every promotion
        # its next rung once, on one worker or the other.
        every = sorted(ended["tuner1"] + ended["tuner2"])
        assert len(every) == len(set(every))
        assert sorted(n for n, epochs in every if epochs == 1) == list(range(1, 7))
        promoted = [n for n, epochs in every if epochs == 3]
        assert promoted and all((n, 1) in every for n in promoted)
        best = json.loads((project / "best.json").read_text())
        assert best["trials"] == best["completed"] == 6
        with open(project / "trials.csv", newline="") as f:
            rows = {int(row["trial_id"]) + 1: int(row["epochs"]) for row in csv.DictReader(f)}
        assert rows == {n: 3 if n in promoted else 1 for n in range(1, 7)}
    finally:
        for run in runs:
            kill(run.process)
