"""`KERAS_BACKEND=jax python -m benchmarks.jax_backend`: the JAX backend's step.

Times one optimizer step on the dense workloads of `benchmarks.workloads`
(200 small variables; one of 16.8M parameters, here 4096x4096; 50 of
768x768; gradients given):

- under `jax.jit`, with the optimizer's and the model's state donated, as
  `model.fit` runs it: `keras_adam.Adam()` and `keras.optimizers.Adam()`
  through `stateless_apply`, and `optax.adam` through its `update` and
  `optax.apply_updates`;
- eagerly (`optimizer.apply` outside any trace): `keras_adam.Adam()`, whose
  eager step is one compiled program (`keras_adam.backends.jax`),
  `keras_adam.Adam(fused=False)`, op by op, and `keras.optimizers.Adam()`.

All systems of a workload are set up and warmed up (their first call
compiles), then timed in rounds, each round in a new random order (a sample
is the mean of as many consecutive steps as take 100 ms, one for a slow
step), and set up afresh in a new random order every quarter of the rounds
(see `time_systems`); the table gives the median over the rounds, of the wall time and of
the process's CPU time, and each row's ratio to keras_adam's default in the
same mode (a ratio above 1 is a system slower than ours).
The targets: under `jax.jit`, keras_adam at least 0.95x as fast as Keras's
Adam and optax's (their ratio >= 0.95).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

#: The systems every ratio of a mode is taken against.
OURS = {"jit": "keras_adam default, jax.jit", "eager": "keras_adam default, eager"}

#: Systems that keras_adam under `jax.jit` must be at least 0.95x as fast as.
TARGETS = ("keras Adam, jax.jit", "optax.adam, jax.jit")


@dataclass(frozen=True)
class System:
    """One optimizer on one execution path.

    Attributes:
        name: Label in the table.
        mode: "jit" or "eager".
        setup: Builds the state for a list of gradient arrays and returns
            a step that runs one update and waits for it.
    """

    name: str
    mode: str
    setup: Callable[[list], Callable[[], None]]


def _keras_jit(make: Callable) -> Callable:
    """A Keras optimizer's `stateless_apply` under `jax.jit`, state donated."""

    def setup(grads: list) -> Callable[[], None]:
        import jax
        import keras
        import numpy as np

        variables = [keras.Variable(np.zeros(g.shape, g.dtype)) for g in grads]
        optimizer = make()
        optimizer.build(variables)
        state = {
            "model": [v.value for v in variables],
            "optimizer": [v.value for v in optimizer.variables],
        }

        def apply(model: list, optimizer_variables: list, grads: list) -> tuple:
            return optimizer.stateless_apply(optimizer_variables, grads, model)

        # Donated arguments in the order of the results, as optax's below: XLA
        # pairs donated buffers with results of the same shape in order, and
        # `jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))` would pair
        # the first moment's buffer with the new weights, and copy.
        step = jax.jit(apply, donate_argnums=(0, 1))

        def run() -> None:
            state["model"], state["optimizer"] = step(state["model"], state["optimizer"], grads)
            jax.block_until_ready(state["model"])

        return run

    return setup


def _optax_jit(grads: list) -> Callable[[], None]:
    """`optax.adam` under `jax.jit`, parameters and state donated."""
    import jax
    import jax.numpy as jnp
    import optax

    transform = optax.adam(1e-3)
    params = [jnp.zeros(g.shape, g.dtype) for g in grads]
    state = {"params": params, "optimizer": transform.init(params)}

    def update(params: list, opt_state: object, grads: list) -> tuple:
        updates, opt_state = transform.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(update, donate_argnums=(0, 1))

    def run() -> None:
        state["params"], state["optimizer"] = step(state["params"], state["optimizer"], grads)
        jax.block_until_ready(state["params"])

    return run


def _keras_eager(make: Callable) -> Callable:
    """A Keras optimizer's `apply`, called eagerly."""

    def setup(grads: list) -> Callable[[], None]:
        import jax
        import keras
        import numpy as np

        variables = [keras.Variable(np.zeros(g.shape, g.dtype)) for g in grads]
        optimizer = make()
        optimizer.build(variables)

        def run() -> None:
            optimizer.apply(grads, variables)
            jax.block_until_ready([v.value for v in variables])

        return run

    return setup


def systems(eager: bool = True) -> list[System]:
    """Every system, in table order (`eager=False`: the `jax.jit` rows only)."""
    import keras

    import keras_adam

    chosen = [
        System(OURS["jit"], "jit", _keras_jit(keras_adam.Adam)),
        System("keras Adam, jax.jit", "jit", _keras_jit(keras.optimizers.Adam)),
        System("optax.adam, jax.jit", "jit", _optax_jit),
    ]
    if eager:
        chosen += [
            System(OURS["eager"], "eager", _keras_eager(keras_adam.Adam)),
            System(
                "keras_adam fused=False, eager",
                "eager",
                _keras_eager(lambda: keras_adam.Adam(fused=False)),
            ),
            System("keras Adam, eager", "eager", _keras_eager(keras.optimizers.Adam)),
        ]
    return chosen


def time_systems(
    chosen: list[System], grads: list, rounds: int, min_sample_ms: float, blocks: int = 4
) -> dict[str, tuple[float, float]]:
    """Median milliseconds per step of each system, interleaved in random order.

    The rounds are run in `blocks`; before each block every system is set
    up afresh, in a new random order, and warmed up. Where a system's
    buffers land in memory, relative to the others', changes its speed on
    the large workloads by up to 20% (the first system set up was
    consistently the slowest, with programs identical instruction for
    instruction): fresh buffers, placed in a new order each block, spread
    that over all systems.

    Each system's sample in a round is the mean of as many consecutive
    steps as take `min_sample_ms` (one for a slow step; measured after the
    warm-up): on a shared machine a single step of a few milliseconds is
    at the mercy of one preemption. The process's CPU time (all its
    threads: XLA's included) is measured too; other processes on the
    machine change it less than the wall time.

    Args:
        chosen: The systems.
        grads: The workload's gradients (JAX arrays).
        rounds: Timed rounds; each runs every system once.
        min_sample_ms: The least time one sample takes.
        blocks: How many times the systems are set up afresh.

    Returns:
        The medians of each system's samples, wall and CPU, by name.
    """
    wall: dict[str, list[float]] = {system.name: [] for system in chosen}
    cpu: dict[str, list[float]] = {system.name: [] for system in chosen}
    shuffler = random.Random(0)
    for block in range(blocks):
        steps, repeats = {}, {}
        gc.collect()  # the previous block's state (optimizers hold cycles) is freed first
        for system in shuffler.sample(chosen, len(chosen)):
            step = system.setup(grads)
            step()  # compiles
            start = time.perf_counter()
            step()  # warm-up
            elapsed_ms = 1e3 * (time.perf_counter() - start)
            steps[system.name] = step
            repeats[system.name] = max(1, math.ceil(min_sample_ms / max(elapsed_ms, 1e-3)))
        order = list(steps.items())
        for _ in range(rounds // blocks + (block < rounds % blocks)):
            shuffler.shuffle(order)
            for name, step in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(repeats[name]):
                    step()
                wall[name].append(1e3 * (time.perf_counter() - start) / repeats[name])
                cpu[name].append(1e3 * (time.process_time() - start_cpu) / repeats[name])
        del steps, order
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in wall}


def main(argv: list[str] | None = None) -> None:
    """Run every system on every workload and print the table and the targets."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jax_backend", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--quick", action="store_true", help="workloads scaled down 8x")
    parser.add_argument("--no-eager", action="store_true", help="only the jax.jit rows")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--blocks", type=int, default=4, help="fresh set-ups of every system (default 4)"
    )
    parser.add_argument(
        "--min-sample-ms",
        type=float,
        default=100.0,
        help="consecutive steps per sample, as many as take this long (default 100)",
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import keras

    from benchmarks.workloads import gradients, workloads

    if keras.backend.backend() != "jax":
        parser.error(f"run with KERAS_BACKEND=jax (the backend is {keras.backend.backend()})")
    chosen = systems(eager=not args.no_eager)
    load_before = os.getloadavg()[0]
    rows = []
    for workload in workloads(args.quick):
        if workload.sparse:
            continue  # JAX's gradients are dense: the embedding workload is TF's
        print(f"{workload.name}: {workload.description} ...", flush=True)
        grads = [jnp.asarray(g) for g in gradients(workload)]
        if workload.name == "1 large" and grads[0].size == 4096 * 4096:
            grads = [grads[0].reshape(4096, 4096)]  # the shape, same parameters
        medians = time_systems(chosen, grads, args.rounds, args.min_sample_ms, args.blocks)
        for system in chosen:
            (ms, cpu_ms), (ours_ms, ours_cpu_ms) = medians[system.name], medians[OURS[system.mode]]
            rows.append(
                (system.name, workload.name, ms, ms / ours_ms, cpu_ms, cpu_ms / ours_cpu_ms)
            )
    lines = [
        "# JAX backend",
        "",
        f"JAX {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"median of {args.rounds} rounds; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after. *Ratio* is this system's time over ours in the "
        "same mode (above 1: we are faster).",
        "",
        "| system | workload | median ms/step | ratio vs ours (same mode) "
        "| median CPU ms/step | CPU ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, workload, ms, ratio, cpu_ms, cpu_ratio in rows:
        lines.append(
            f"| {name} | {workload} | {ms:.2f} | {ratio:.2f} | {cpu_ms:.2f} | {cpu_ratio:.2f} |"
        )
    lines += ["", "## Targets", "", "| target | measured (CPU) | met |", "|---|---|---|"]
    for name, workload, _, ratio, _, cpu_ratio in rows:
        if name in TARGETS:
            verdict = "yes" if ratio >= 0.95 else "no"
            lines.append(
                f"| jax.jit: ≥ 0.95× {name}, {workload} | {ratio:.2f}× ({cpu_ratio:.2f}×) "
                f"| {verdict} |"
            )
    table = "\n".join(lines) + "\n"
    from benchmarks import report

    report.show_and_save(table, args.output)


if __name__ == "__main__":
    main()
