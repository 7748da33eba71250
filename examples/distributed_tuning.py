"""Tune Adam on digits with KerasTuner's chief/worker mode: one chief and two workers.

Starts three processes of `python -m tuning` on this machine: a chief
(`KERASTUNER_TUNER_ID=chief`), which serves the search over gRPC on
127.0.0.1 and a free port, and two workers (`tuner1`, `tuner2`), which train
the trials. All share `--directory/--project`. When the search ends, the
chief compares the best optimizer with default Adam and writes
`best.json` and `trials.csv` (and `trials.png`, unless `--small`) into
DIR/NAME/, and each process's output goes to DIR/NAME/logs/<id>.out and
<id>.err.

    python examples/distributed_tuning.py                  # 6 trials of 5 epochs
    python examples/distributed_tuning.py --small          # the test suite's budget
    python examples/distributed_tuning.py --max-trials 12 --overwrite

The script waits for all three processes for at most `--timeout` seconds;
on timeout, Ctrl-C, or when a process fails, it stops them all and prints
the failed processes' logs. It exits 0 only if all three exit 0 and the
chief wrote best.json. Rerunning without `--overwrite` resumes the search:
finished trials are kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from tuning.cli import TUNER_CHOICES, positive_float, positive_int

HOST = "127.0.0.1"
WORKERS = ("tuner1", "tuner2")

#: --small: a few seconds per trial, about 30 s in all on 2 cores.
SMALL = {"max_trials": 4, "epochs": 2, "comparison_repeats": 1}
DEFAULT = {"max_trials": 6, "epochs": 5, "comparison_repeats": 3}

#: Seconds the workers get to exit after the chief has finished the search.
WORKER_GRACE = 60.0
#: Seconds between SIGTERM and SIGKILL when stopping a process.
KILL_GRACE = 5.0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop every process."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--small", action="store_true", help="4 trials of 2 epochs, 1 comparison run, no plot"
    )
    parser.add_argument("--max-trials", type=positive_int, metavar="N", help="default 6")
    parser.add_argument("--epochs", type=positive_int, metavar="N", help="default 5")
    parser.add_argument("--tuner", choices=TUNER_CHOICES, default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--directory", default="runs", metavar="DIR")
    parser.add_argument("--project", default="digits-distributed", metavar="NAME")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete DIR/NAME first (start afresh)"
    )
    parser.add_argument(
        "--worker-timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="the chief gives up after this long without a call from a worker",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="stop everything if the search has not ended after this long",
    )
    args = parser.parse_args(argv)
    budget = SMALL if args.small else DEFAULT
    args.max_trials = args.max_trials or budget["max_trials"]
    args.epochs = args.epochs or budget["epochs"]
    args.comparison_repeats = budget["comparison_repeats"]
    return args


def free_port() -> int:
    """A TCP port that nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tuning_command(args: argparse.Namespace) -> list[str]:
    """The `python -m tuning` command line, the same for the chief and the workers."""
    command = [
        sys.executable,
        "-m",
        "tuning",
        "--dataset",
        "digits",
        "--tuner",
        args.tuner,
        "--max-trials",
        str(args.max_trials),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--directory",
        args.directory,
        "--project",
        args.project,
        "--comparison-repeats",
        str(args.comparison_repeats),
        "--worker-timeout",
        str(args.worker_timeout),
    ]
    # Never --overwrite here: a worker's KerasTuner would delete the shared
    # project directory. This script deletes it before starting anything.
    if args.small:
        command.append("--no-plot")
    return command


class Process:
    """One `python -m tuning` process, in its own process group, logging to files."""

    def __init__(self, tuner_id: str, command: list[str], port: int, log_dir: str):
        self.tuner_id = tuner_id
        self.out_path = os.path.join(log_dir, f"{tuner_id}.out")
        self.err_path = os.path.join(log_dir, f"{tuner_id}.err")
        env = dict(os.environ)
        env.update(
            KERASTUNER_TUNER_ID=tuner_id,
            KERASTUNER_ORACLE_IP=HOST,
            KERASTUNER_ORACLE_PORT=str(port),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it is still there."""
        for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        # A child that outlived its leader would still be in the group.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def status(self) -> str:
        code = self.popen.poll()
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit {code}"

    def output(self, *, stderr: bool = False, lines: int | None = None) -> str:
        with open(self.err_path if stderr else self.out_path, errors="replace") as f:
            text = f.read().splitlines()
        return "\n".join(text[-lines:] if lines else text)


def wait_all(chief: Process, workers: list[Process], timeout: float) -> str | None:
    """Wait for every process; None when all have exited, else why we gave up."""
    deadline = time.monotonic() + timeout
    chief_done = None
    everyone = [chief, *workers]
    while True:
        codes = [p.returncode for p in everyone]
        if all(code is not None for code in codes):
            return None
        failed = [p for p, code in zip(everyone, codes, strict=True) if code not in (None, 0)]
        if failed:
            # The search cannot finish: a dead chief leaves the workers waiting
            # (for an hour), a dead worker's trial keeps the chief waiting.
            return f"{', '.join(p.tuner_id for p in failed)} failed"
        if chief.returncode == 0:
            chief_done = chief_done or time.monotonic()
            if time.monotonic() - chief_done > WORKER_GRACE:
                return f"the chief finished but a worker did not exit within {WORKER_GRACE:g} s"
        if time.monotonic() > deadline:
            return f"timed out after {timeout:g} s"
        time.sleep(0.5)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    project_dir = os.path.join(args.directory, args.project)
    if args.overwrite and os.path.isdir(project_dir):
        shutil.rmtree(project_dir)
    log_dir = os.path.join(project_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    best_json = os.path.join(project_dir, "best.json")
    port = free_port()
    command = tuning_command(args)
    started = time.time()
    print(
        f"Distributed search of {args.max_trials} trials ({args.epochs} epochs each, "
        f"{args.tuner}) in {project_dir}/; chief on {HOST}:{port}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _raise_interrupted)
    processes: list[Process] = []
    problem = None
    try:
        # The chief first; the workers wait for it to listen (gRPC wait_for_ready).
        for tuner_id in ("chief", *WORKERS):
            process = Process(tuner_id, command, port, log_dir)
            processes.append(process)
            print(
                f"started {tuner_id} (pid {process.pid}), output in "
                f"{os.path.join(log_dir, tuner_id)}.out/.err",
                flush=True,
            )
        problem = wait_all(processes[0], processes[1:], args.timeout)
    except (KeyboardInterrupt, Interrupted) as error:
        problem = f"interrupted ({str(error) or 'SIGINT'})"
    finally:
        # No second Ctrl-C or SIGTERM may leave the processes running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        own = {p.tuner_id: p.returncode for p in processes}  # before we stop any
        for process in processes:
            process.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    print(flush=True)
    for process in processes:
        status = process.status()
        if own[process.tuner_id] is None:
            status = f"stopped by this script ({status})"
        print(f"{process.tuner_id:>7} (pid {process.pid}): {status}", flush=True)
    fresh = os.path.exists(best_json) and os.path.getmtime(best_json) >= started - 1
    if problem is None and all(p.returncode == 0 for p in processes) and fresh:
        print("\nChief's output:\n" + processes[0].output(), flush=True)
        return 0
    problem = problem or "the chief wrote no best.json"
    print(f"\nDistributed search failed: {problem}.", file=sys.stderr)
    for process in processes:
        # The logs of the processes that failed, or of all when we stopped them.
        if own[process.tuner_id] != 0 or (process.tuner_id == "chief" and not fresh):
            for name, stderr in (("stdout", False), ("stderr", True)):
                print(f"--- {process.tuner_id} {name} (end) ---", file=sys.stderr)
                print(process.output(stderr=stderr, lines=20), file=sys.stderr)
    print(
        "Finished trials are saved: rerun (without --overwrite) to resume.",
        file=sys.stderr,
        flush=True,
    )
    if problem.startswith("interrupted"):
        return 130
    return 124 if problem.startswith("timed out") else 1


if __name__ == "__main__":
    sys.exit(main())
