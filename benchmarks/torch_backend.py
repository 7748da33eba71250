"""`KERAS_BACKEND=torch python -m benchmarks.torch_backend`: Adam on the PyTorch backend.

Side by side in one process, interleaved round by round in random order
(`benchmarks.run.time_workload`): `keras.optimizers.Adam` on the torch
backend (Keras's `torch._foreach_` Adam), `keras_adam.Adam` (default: torch's
fused kernels; `fused=False`: the `keras.ops` path), and `torch.optim.Adam`
with `fused=True` and `foreach=True`. Each Keras optimizer's step is
`optimizer.apply(grads, variables)` under `torch.no_grad()` (as in
`model.fit`), eagerly, with the gradients precomputed; torch's is
`optimizer.step()` with the gradients in `param.grad`. The two Keras
optimizers' steps are also timed under `torch.compile` (`fullgraph=True`;
the first call, which compiles, is the table's first-call column): ours is
then our operator in the graph (`torch.ops.keras_adam.fused_adam_`),
Keras's its `torch._foreach_` ops, compiled by Inductor. Workloads are
`benchmarks.workloads`' "1 large" (16.8M float32 elements, 4096×4096
flattened) and "200 small".
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

from benchmarks import run  # noqa: E402
from benchmarks.systems import System, _torch_setup  # noqa: E402
from benchmarks.workloads import Workload, gradients, workloads  # noqa: E402

KERAS = "keras.optimizers.Adam (torch backend)"
OURS = "keras_adam.Adam default"
OURS_OPS = "keras_adam.Adam fused=False"
KERAS_COMPILED = "keras.optimizers.Adam, torch.compile"
OURS_COMPILED = "keras_adam.Adam default, torch.compile"
TORCH_FUSED = "torch.optim.Adam(fused=True)"
TORCH_FOREACH = "torch.optim.Adam(foreach=True)"
WORKLOADS = ("1 large", "200 small")
#: (workload, minimum speed-up over Keras's torch Adam, maximum time over torch fused).
TARGETS = (("1 large", 10.0, 1.1), ("200 small", 10.0, 2.0))


def _keras_setup(
    make_optimizer: Callable, compiled: bool = False
) -> Callable[[Workload], Callable[[], None]]:
    """A Keras optimizer's `apply` on the workload, gradients given; eager, or `torch.compile`d."""

    def setup(workload: Workload) -> Callable[[], None]:
        import keras
        import torch

        variables = [keras.Variable(np.zeros(shape, "float32")) for shape in workload.shapes]
        grads = [torch.from_numpy(g) for g in gradients(workload)]
        optimizer = make_optimizer()
        optimizer.build(variables)

        def step() -> None:
            with torch.no_grad():
                optimizer.apply(grads, variables)

        return torch.compile(step, fullgraph=True) if compiled else step

    return setup


def torch_backend_systems() -> list[System]:
    """The systems compared on the torch backend, in table order."""
    import keras

    import keras_adam

    return [
        System(KERAS, "keras", _keras_setup(keras.optimizers.Adam), sparse=False),
        System(OURS, "keras_adam", _keras_setup(keras_adam.Adam), sparse=False),
        System(
            OURS_OPS,
            "keras_adam",
            _keras_setup(lambda: keras_adam.Adam(fused=False)),
            sparse=False,
        ),
        System(KERAS_COMPILED, "keras", _keras_setup(keras.optimizers.Adam, True), sparse=False),
        System(OURS_COMPILED, "keras_adam", _keras_setup(keras_adam.Adam, True), sparse=False),
        System(TORCH_FUSED, "torch", _torch_setup(fused=True), sparse=False),
        System(TORCH_FOREACH, "torch", _torch_setup(foreach=True), sparse=False),
    ]


def markdown(results: list[run.Measurement], chosen: list[Workload], meta: dict) -> str:
    """One table of every measurement, then the targets."""
    index = {(r.workload, r.system): r for r in results}
    lines = [
        "# Adam on the PyTorch backend",
        "",
        f"{meta['machine']}; {meta['repeats']} interleaved rounds; median ms per step, "
        "gradients given. *keras ÷ this*: Keras's torch Adam time over this system's "
        "(higher is faster); *this ÷ torch fused*: this system's time over "
        "`torch.optim.Adam(fused=True)`'s (lower is faster).",
        "",
        "| system | workload | first call s | median ms | keras ÷ this | this ÷ torch fused |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for workload in chosen:
        keras_row = index.get((workload.name, KERAS))
        fused_row = index.get((workload.name, TORCH_FUSED))
        for r in (r for r in results if r.workload == workload.name):
            speedup = f"{keras_row.median_ms / r.median_ms:.2f}×" if keras_row else "–"
            versus = f"{r.median_ms / fused_row.median_ms:.2f}×" if fused_row else "–"
            lines.append(
                f"| {r.system} | {workload.name} | {r.first_call_s:.2f} | {r.median_ms:.2f} | "
                f"{speedup} | {versus} |"
            )
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(results: list[run.Measurement]) -> list[tuple[str, str, bool]]:
    """Each target, the measured ratio and whether it is met."""
    index = {(r.workload, r.system): r for r in results}
    rows = []
    for workload, minimum_speedup, maximum_ratio in TARGETS:
        ours = index.get((workload, OURS))
        keras_row = index.get((workload, KERAS))
        fused_row = index.get((workload, TORCH_FUSED))
        if ours and keras_row:
            s = keras_row.median_ms / ours.median_ms
            rows.append(
                (
                    f"≥ {minimum_speedup:g}× faster than Keras's torch Adam, {workload}",
                    f"{s:.1f}×",
                    s >= minimum_speedup,
                )
            )
        if ours and fused_row:
            ratio = ours.median_ms / fused_row.median_ms
            rows.append(
                (
                    f"≤ {maximum_ratio:g}× torch.optim.Adam(fused=True)'s time, {workload}",
                    f"{ratio:.2f}×",
                    ratio <= maximum_ratio,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> str:
    """Parse the command line, run and print the table; return it."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_backend", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="workloads scaled down 8×")
    parser.add_argument("--repeats", type=int, default=25, help="interleaved rounds (≥ 20)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "torch":
        parser.error(f"needs KERAS_BACKEND=torch (Keras runs on {keras.backend.backend()})")
    chosen = [w for w in workloads(args.quick) if w.name in WORKLOADS]
    candidates = torch_backend_systems()
    results = []
    for workload in chosen:
        print(f"{workload.name}: {workload.description} ({workload.parameters:,} parameters)")
        results += run.time_workload(workload, args.repeats, candidates=candidates)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "repeats": args.repeats,
    }
    table = markdown(results, chosen, meta)
    from benchmarks import report

    report.show_and_save(table, args.output)
    return table


if __name__ == "__main__":
    main()
