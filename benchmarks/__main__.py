"""`python -m benchmarks [--fit] [--backend NAME] [--quick] [--output DIR]`: run, print and save.

`--backend tensorflow` (default) runs the full TensorFlow table here;
`--backend jax` and `--backend torch` run `benchmarks.jax_backend` or
`benchmarks.torch_backend` in a process of that backend (Keras reads
`KERAS_BACKEND` once per process) and save its table beside the others.
`--fit` times `model.fit` on five real models instead
(`benchmarks.end_to_end`), on the chosen backend, and saves
`fit_<backend>.md` and `.json`; `--fit --backend all` runs the three
backends one after the other and draws `fit_speedup.png`; `--fit --control`
adds an A/A row (Keras's Adam timed twice) to read every ratio's noise against.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmarks and write the report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, under 3 min")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument(
        "--compiled-repeats", type=int, default=None,
        help="with --fit: rounds of jit_compile=True (default: --repeats)",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory probes")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also write this docs page (e.g. docs/performance.md)",
    )
    parser.add_argument("--memory-probe", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch", "all"),
        default="tensorflow",
        help="the Keras backend to measure (default: tensorflow; all: every one, with --fit)",
    )
    parser.add_argument(
        "--fit", action="store_true", help="time model.fit on five real models (end_to_end)"
    )
    parser.add_argument(
        "--control", action="store_true",
        help="with --fit: time Keras's Adam twice, an A/A row showing the noise of a ratio",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.backend == "all" and not args.fit:
        parser.error("--backend all goes with --fit (the step tables run one backend each)")
    if args.control and not args.fit:
        parser.error("--control goes with --fit (it adds a row to the model.fit tables)")
    if args.fit:
        run_fit(args)
        return
    if args.backend != "tensorflow":
        run_backend(args)
        return

    from benchmarks import report, run
    from benchmarks.floor import Floor
    from benchmarks.workloads import workloads

    if args.memory_probe:
        run.memory_probe(int(args.memory_probe[0]), args.memory_probe[1], args.quick)
        return
    repeats = args.repeats or (5 if args.quick else 15)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    chosen = workloads(args.quick)
    results = []
    for workload in chosen:
        print(f"{workload.name}: {workload.description} ({workload.parameters:,} parameters)")
        results += run.time_workload(workload, repeats)
    measure_memory = not (args.no_memory or args.quick)
    if measure_memory:
        print("peak memory, one fresh process per system ...")
        for result in results:
            if result.family not in ("floor", "overhead"):
                index = [w.name for w in chosen].index(result.workload)
                result.peak_mb = run.peak_memory_mb(index, result.system, args.quick)
    meta = {
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": repeats,
        "quick": args.quick,
        "memory_measured": measure_memory,
        "floor_kind": Floor(1).kind,
    }
    table = report.markdown(results, chosen, meta)
    print()
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(table)
    report.write_json(args.output / "results.json", results, meta)
    report.plot(args.output / "results.png", results, chosen)
    print(f"wrote {args.output}/results.md, results.json, results.png")
    if args.docs:
        report.write_docs_page(args.docs, table, args.output / "results.png")
        print(f"wrote {args.docs}")


def run_backend(args: argparse.Namespace) -> None:
    """Run `benchmarks.<backend>_backend` under that backend; save (and document) its table."""
    saved = args.output / f"{args.backend}_backend.md"
    command = [sys.executable, "-m", f"benchmarks.{args.backend}_backend", "--output", str(saved)]
    command += ["--quick"] if args.quick else []
    if args.repeats:
        command += ["--repeats" if args.backend == "torch" else "--rounds", str(args.repeats)]
    env = {**os.environ, "KERAS_BACKEND": args.backend}
    subprocess.run(command, env=env, check=True)
    print(f"wrote {saved}")
    rewrite_docs(args)


def run_fit(args: argparse.Namespace) -> None:
    """Run `benchmarks.end_to_end` under the chosen backend(s); save (and document) the tables."""
    backends = ("tensorflow", "jax", "torch") if args.backend == "all" else (args.backend,)
    for backend in backends:
        saved = args.output / f"fit_{backend}.md"
        command = [sys.executable, "-m", "benchmarks.end_to_end", "--output", str(saved)]
        command += ["--quick"] if args.quick else []
        command += ["--rounds", str(args.repeats)] if args.repeats else []
        if args.compiled_repeats:
            command += ["--compiled-rounds", str(args.compiled_repeats)]
        command += ["--control"] if args.control else []
        env = {**os.environ, "KERAS_BACKEND": backend}
        subprocess.run(command, env=env, check=True)
        print(f"wrote {saved}")
    if args.backend == "all":
        from benchmarks.end_to_end import plot_speedups

        plot = args.output / "fit_speedup.png"
        plot_speedups([args.output / f"fit_{backend}.json" for backend in backends], plot)
        print(f"wrote {plot}")
    rewrite_docs(args)


def rewrite_docs(args: argparse.Namespace) -> None:
    """With `--docs`, rewrite the page from the saved TensorFlow table and every saved section."""
    from benchmarks import report

    tensorflow_table = args.output / "results.md"
    if args.docs and tensorflow_table.is_file():
        report.write_docs_page(args.docs, tensorflow_table.read_text(), args.output / "results.png")
        print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
