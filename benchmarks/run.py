"""Timing and memory measurement, all systems interleaved in one process."""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from benchmarks.systems import System, systems, torch_available
from benchmarks.workloads import Workload, gradients, workloads

#: Seconds of busy waiting after each timed step (see `time_workload`).
SETTLE_S = 0.02


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@dataclass
class Measurement:
    """What was measured for one system on one workload."""

    workload: str
    system: str
    family: str
    median_ms: float
    first_call_s: float
    samples_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None


def applicable(system: System, workload: Workload) -> bool:
    """Whether `system` runs on `workload` here."""
    if system.family == "torch" and not torch_available():
        return False
    return system.sparse if workload.sparse else system.dense


def time_workload(
    workload: Workload, repeats: int, log=print, candidates: list[System] | None = None
) -> list[Measurement]:
    """Time every applicable system on `workload` (of `candidates`, default all), interleaved.

    Each system is set up and its first call timed; then in each of
    `repeats` rounds every system steps once, in a new random order (seeded)
    each round, so that no system always follows the same neighbour. After
    each timed step the process busy-waits `SETTLE_S`: OpenMP threads
    (torch's, the floor's) keep spinning for a while after their loop ends,
    and would otherwise take the cores from the next system timed. A busy
    wait, not a sleep: on this VM an idle machine wakes slowly, and a sleep
    made the floor 15× and torch's SparseAdam 2× slower. Setting
    `OMP_WAIT_POLICY=PASSIVE` instead slows torch's fused Adam on many small
    tensors 5×, which is not how torch runs.

    Systems whose state would not fit in memory all at once are set up and
    interleaved in groups that do (`memory_groups`): the embedding
    workload's 20 systems on a 64M-parameter table reached 24 GB together.
    """
    chosen = [s for s in (candidates or systems()) if applicable(s, workload)]
    samples: dict[str, list[float]] = {}
    first_call: dict[str, float] = {}
    shuffler = random.Random(0)
    groups = memory_groups(len(chosen), workload.parameters, available_memory())
    if len(groups) > 1:
        log(f"  (in {len(groups)} groups of systems, interleaved within each: memory)")
    for group in groups:
        _time_group([chosen[i] for i in group], workload, repeats, shuffler, samples, first_call)
    results = []
    for system in chosen:
        ms = samples[system.name]
        results.append(
            Measurement(
                workload=workload.name,
                system=system.name,
                family=system.family,
                median_ms=statistics.median(ms),
                first_call_s=first_call[system.name],
                samples_ms=ms,
            )
        )
        log(f"  {system.name:<52} {results[-1].median_ms:10.2f} ms")
    return results


def _time_group(group, workload, repeats, shuffler, samples, first_call) -> None:
    """Set up `group`'s systems, time them interleaved, and free them."""
    steps = {}
    for system in group:
        step = system.setup(workload)
        start = time.perf_counter()
        step()
        first_call[system.name] = time.perf_counter() - start
        step()  # warm-up
        steps[system.name] = step
        samples[system.name] = []
    order = list(steps.items())
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name, step in order:
            start = time.perf_counter()
            step()
            samples[name].append(1e3 * (time.perf_counter() - start))
            _busy_wait(SETTLE_S)
    # Free the variables before the next group or workload is set up (the
    # steps' closures and traced functions hold them, some in reference cycles).
    steps.clear()
    order.clear()
    gc.collect()


#: Bytes a system holds per parameter of a workload while set up: the
#: variables, both moments, a gradient and the step's temporaries (the
#: embedding workload's systems held about 23 bytes a parameter each).
BYTES_PER_PARAMETER = 24


def memory_groups(systems_count: int, parameters: int, available: int) -> list[list[int]]:
    """Deal `systems_count` systems into as few groups as fit in half of `available` bytes.

    Dealt in turn (system i to group i mod groups), so that each group mixes
    the families of systems, as `systems()` lists them family by family.

    Returns:
        The positions of each group's systems; one group when all fit.
    """
    per_system = BYTES_PER_PARAMETER * parameters
    size = max(1, min(systems_count, (available // 2) // max(per_system, 1)))
    count = -(-systems_count // size)  # groups needed
    return [list(range(first, systems_count, count)) for first in range(count)]


def available_memory() -> int:
    """Bytes of memory available to this process (Linux's MemAvailable, else all of it)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory_mb(workload_index: int, system_name: str, quick: bool) -> float | None:
    """Peak memory (MB) a system adds beyond its weights and gradients.

    Measured over setup and 3 steps, in a fresh process.
    """
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--memory-probe",
        str(workload_index),
        system_name,
    ]
    if quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
    except (IndexError, ValueError, KeyError):
        return None


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(field_name)


def memory_probe(workload_index: int, system_name: str, quick: bool) -> None:
    """Run in a subprocess: the peak resident memory one system adds.

    The peak is reset before the system is set up; its weights and gradients
    are subtracted, so what remains is the optimizer's state, its
    temporaries and any compilation.
    """
    workload = workloads(quick)[workload_index]
    system = next(s for s in systems() if s.name == system_name)
    baseline = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM, the peak resident set size
    step = system.setup(workload)
    for _ in range(3):
        step()
    peak = _status_kb("VmHWM") - baseline
    weights_and_gradients_kb = 4 * (workload.parameters + sum(g.size for g in gradients(workload)))
    print(json.dumps({"peak_mb": max(peak - weights_and_gradients_kb / 1024, 0) / 1024}))
