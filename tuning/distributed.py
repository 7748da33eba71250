"""KerasTuner's chief/worker mode, with a chief that does not wait forever for a dead worker.

KerasTuner distributes a search through three environment variables:
`KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT` (where the chief
listens) and `KERASTUNER_TUNER_ID` (`chief` for the chief, any other name
for a worker). The chief holds the oracle and serves it over gRPC; each
worker asks it for trials, trains them and reports back.

KerasTuner's own chief waits until every worker that took a trial has
reported it; a worker that dies holding a trial hangs it forever.
`serve_oracle` gives up when no worker has contacted it for
`worker_timeout` seconds and raises `WorkerTimeoutError`, naming the trials
left running. Every finished trial is already saved, so the search resumes
when the chief is started again. A worker restarted with the same
`KERASTUNER_TUNER_ID` before the timeout picks up its unfinished trial
(KerasTuner hands a tuner id its ongoing trial) and the search completes.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from typing import Any

import grpc

#: The environment variables of KerasTuner's chief/worker mode.
ENVIRONMENT = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


class WorkerTimeoutError(RuntimeError):
    """The chief heard from no worker for `worker_timeout` seconds."""


def role() -> str:
    """The role of this process: "chief", "worker" or "single" (from the environment)."""
    if not (os.environ.get("KERASTUNER_ORACLE_IP") and os.environ.get("KERASTUNER_ORACLE_PORT")):
        return "single"
    # As KerasTuner decides (keras_tuner's dist_utils): any id containing "chief".
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


class _LastContact(grpc.ServerInterceptor):
    """Remembers when a worker last called the chief."""

    def __init__(self) -> None:
        self.time = time.monotonic()
        self._lock = threading.Lock()

    def touch(self) -> None:
        with self._lock:
            self.time = time.monotonic()

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        self.touch()
        return continuation(handler_call_details)


def limit_worker_wait(seconds: float) -> None:
    """Make a worker's calls to the chief give up after `seconds` (KerasTuner waits an hour).

    A worker started after its chief has finished, or left training when
    its chief gave up, would otherwise hang for an hour.
    """
    from keras_tuner.src.distribute import oracle_client

    oracle_client.TIMEOUT = seconds


def serve_oracle(oracle: Any, *, worker_timeout: float, poll_seconds: float = 0.2) -> None:
    """Serve `oracle` to workers until the search ends, or give up on silent workers.

    Args:
        oracle: The chief's KerasTuner oracle.
        worker_timeout: Seconds without any call from a worker after which
            the chief gives up. It must exceed the longest trial: workers
            call the chief when a trial starts and when it ends.
        poll_seconds: How often to check.

    Raises:
        WorkerTimeoutError: when no worker called for `worker_timeout`
            seconds before the search ended.
    """
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    contact = _LastContact()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1),
        interceptors=[contact],
        options=[("grpc.so_reuseport", 0)],  # a second chief on this port must fail
    )
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # some grpcio versions raise instead of returning 0
        bound = 0
    if bound == 0:
        raise RuntimeError(f"The chief could not listen on {address}: is the port in use?")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
            silent = time.monotonic() - contact.time
            if silent > worker_timeout:
                running = ", ".join(
                    f"trial {trial.trial_id} (worker {tuner_id})"
                    for tuner_id, trial in oracle.ongoing_trials.items()
                )
                raise WorkerTimeoutError(
                    f"No worker contacted the chief for {silent:.0f} s "
                    f"(worker_timeout={worker_timeout:g}); "
                    + (f"still running: {running}. " if running else "no trial is running. ")
                    + "Finished trials are saved: restart the workers (same "
                    "KERASTUNER_TUNER_ID) and the chief to resume the search."
                )
    finally:
        server.stop(grace=1)
