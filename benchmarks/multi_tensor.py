"""`python -m benchmarks.multi_tensor`: the multi-tensor kernel against its peers.

A focused run on the full-size dense workloads: the default path (the
multi-tensor kernel), the same optimizer traced with the kernel disabled
(the `keras.ops` step per variable), torch's fused Adam and the floor,
interleaved round by round; prints medians and ratios. Nothing is written.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SYSTEMS = (
    "keras_adam default, tf.function",
    "keras_adam without our kernels (KERAS_ADAM_KERNEL=0), tf.function",
    "torch Adam fused",
    "floor (Adam's memory traffic)",
)


def main(argv: list[str] | None = None) -> None:
    """Time the chosen systems and print the ratios."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multi_tensor")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for TF, torch and the floor's OpenMP"
    )
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass

    import statistics
    import time

    from benchmarks.systems import systems, torch_available
    from benchmarks.workloads import workloads

    chosen = [s for s in systems() if s.name in SYSTEMS]
    if not torch_available():
        chosen = [s for s in chosen if s.family != "torch"]
    for workload in (w for w in workloads(args.quick) if not w.sparse):
        steps = {}
        for system in chosen:
            step = system.setup(workload)
            start = time.perf_counter()
            step()
            first = time.perf_counter() - start
            step()
            steps[system.name] = step
            print(f"  setup {system.name}: first call {first:.2f} s")
        samples = {name: [] for name in steps}
        order = list(steps.items())
        for round_number in range(args.repeats):
            shift = round_number % len(order)
            for name, step in order[shift:] + order[:shift]:
                start = time.perf_counter()
                step()
                samples[name].append(1e3 * (time.perf_counter() - start))
        medians = {name: statistics.median(ms) for name, ms in samples.items()}
        floor = medians.get(SYSTEMS[3])
        torch_fused = medians.get(SYSTEMS[2])
        print(f"{workload.name} ({workload.parameters:,} parameters)")
        for name, ms in medians.items():
            ratios = []
            if floor:
                ratios.append(f"{ms / floor:5.2f}× floor")
            if torch_fused:
                ratios.append(f"{ms / torch_fused:5.2f}× torch fused")
            print(f"  {name:<56} {ms:8.2f} ms  {'  '.join(ratios)}")


if __name__ == "__main__":
    main()
