"""Tables, targets, JSON and the plot."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

from benchmarks.run import Measurement
from benchmarks.systems import CAPTURED

KERAS_FUNCTION = "keras Adam, tf.function"
KERAS_XLA = "keras Adam, XLA"
TORCH_FUSED = "torch Adam fused"
FLOOR = "floor (Adam's memory traffic)"
OURS = "keras_adam default, tf.function"
OURS_XLA = "keras_adam default, XLA"
LAZY = "keras_adam lazy_sparse, tf.function"
DENSE_TABLE = "keras_adam dense update of the table, tf.function"
CALL_OVERHEAD = "tf.function call, gradients in, no update"


def _by_name(results: list[Measurement]) -> dict:
    return {(r.workload, r.system): r for r in results}


def _ratio(numerator, denominator) -> str:
    if numerator is None or denominator is None:
        return "–"
    return f"{numerator.median_ms / denominator.median_ms:.2f}×"


def markdown(results: list[Measurement], workloads, meta: dict) -> str:
    """The results as markdown: one table per workload, then the targets."""
    index = _by_name(results)
    lines = [
        "# Benchmark results",
        "",
        f"{meta.get('date', 'Undated')}, {meta['machine']}; {meta['repeats']} interleaved "
        "rounds; median ms per optimizer "
        "step with gradients given. *× keras* is keras Adam (tf.function) time over this "
        "system's (higher is faster); *× torch fused* likewise; *× floor* is this "
        f"system's time over the floor's ({meta['floor_kind']}). First call includes "
        "tracing and XLA compilation.",
        "",
    ]
    for workload in workloads:
        keras_fn = index.get((workload.name, KERAS_FUNCTION))
        torch_fused = index.get((workload.name, TORCH_FUSED))
        floor = index.get((workload.name, FLOOR))
        lines += [
            f"## {workload.name}: {workload.description}",
            "",
            "| system | median ms | × keras | × torch fused | × floor | first call s | peak MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in results if r.workload == workload.name):
            peak = "–" if r.peak_mb is None else f"{r.peak_mb:.0f}"
            lines.append(
                f"| {r.system} | {r.median_ms:.2f} | {_ratio(keras_fn, r)} | "
                f"{_ratio(torch_fused, r)} | {_ratio(r, floor)} | {r.first_call_s:.2f} | {peak} |"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results, workloads):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(results: list[Measurement], workloads) -> list[tuple[str, str, bool]]:
    """The issue's targets, each with the measured ratio and whether it is met."""
    index = _by_name(results)
    rows = []

    def get(workload, system):
        return index.get((workload, system))

    def speedup(workload, slow, fast):
        a, b = get(workload, slow), get(workload, fast)
        return None if a is None or b is None else a.median_ms / b.median_ms

    names = [w.name for w in workloads]
    for workload, minimum in (("1 large", 4.0), ("200 small", 1.3)):
        s = speedup(workload, KERAS_FUNCTION, OURS)
        if s is not None:
            rows.append(
                (f"tf.function: ≥ {minimum}× keras Adam, {workload}", f"{s:.2f}×", s >= minimum)
            )
    for workload in names:
        s = speedup(workload, KERAS_XLA, OURS_XLA)
        if s is not None:
            rows.append((f"XLA: ≥ 0.95× keras Adam, {workload}", f"{s:.2f}×", s >= 0.95))
    for workload in ("1 large", "50 medium"):
        s = speedup(workload, OURS, FLOOR)
        if s is not None:
            rows.append(
                (f"default path within 1.3× of the floor, {workload}", f"{s:.2f}×", s <= 1.3)
            )
    s = speedup("embedding", DENSE_TABLE, LAZY)
    if s is not None:
        rows.append(("lazy sparse ≥ 10× the dense update of the table", f"{s:.1f}×", s >= 10))
    for workload in names:
        ours, theirs = get(workload, OURS), get(workload, KERAS_FUNCTION)
        if ours and theirs and ours.peak_mb is not None and theirs.peak_mb is not None:
            rows.append(
                (
                    f"peak memory ≤ keras Adam's, {workload}",
                    f"{ours.peak_mb:.0f} vs {theirs.peak_mb:.0f} MB",
                    ours.peak_mb <= theirs.peak_mb * 1.05,
                )
            )
    for workload in names:
        # Like every other target, with the gradients passed in.
        best_ours = min(
            (
                r
                for r in results
                if r.workload == workload
                and r.family == "keras_adam"
                and not r.system.endswith(CAPTURED)
            ),
            key=lambda r: r.median_ms,
            default=None,
        )
        torch_fused = get(workload, TORCH_FUSED)
        if best_ours and torch_fused:
            ratio = torch_fused.median_ms / best_ours.median_ms
            measured = f"{ratio:.2f}×"
            overhead = get(workload, CALL_OVERHEAD)
            if overhead is not None:
                measured += f" (the call alone: {torch_fused.median_ms / overhead.median_ms:.2f}×)"
            rows.append(
                (
                    f"stretch: at or below torch fused, {workload} ({best_ours.system})",
                    measured,
                    ratio >= 1.0,
                )
            )
    return rows


def write_json(path, results: list[Measurement], meta: dict) -> None:
    """All measurements, with the samples, as JSON."""
    with open(path, "w") as handle:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, handle, indent=1)


def plot(path, results: list[Measurement], workloads) -> None:
    """Median ms per system, one panel per workload, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "keras_adam": "#1f77b4",
        "keras": "#ff7f0e",
        "torch": "#2ca02c",
        "floor": "#7f7f7f",
        "overhead": "#bcbd22",
    }
    counts = [sum(r.workload == w.name for r in results) for w in workloads]
    fig, axes = plt.subplots(
        len(workloads),
        1,
        figsize=(10, 0.22 * sum(counts) + 1.2 * len(workloads)),
        gridspec_kw={"height_ratios": [n + 4 for n in counts]},
        squeeze=False,
    )
    axes = axes[:, 0]
    for ax, workload in zip(axes, workloads, strict=True):
        rows = [r for r in results if r.workload == workload.name]
        ax.barh(
            [r.system for r in rows],
            [r.median_ms for r in rows],
            color=[colors[r.family] for r in rows],
        )
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{workload.name}: {workload.description}", fontsize=10)
        ax.set_xlabel("median ms per step (log scale, lower is faster)")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DOCS_INTRO = """# Performance

Adam's step is memory-bound: in float32 it reads the parameter, the gradient
and both moments and writes back the parameter and the moments, 28 bytes per
parameter. `keras_adam.Adam` runs dense updates through a multi-tensor kernel
(one op per step and dtype, one pass per element, on TensorFlow's CPU thread
pool) inside `tf.function` and eagerly, through the `keras.ops` step under
XLA (which XLA fuses into the same program as Keras's Adam), and sparse
`Embedding` gradients with `lazy_sparse=True` through a sparse-rows kernel
(one op per table: sum repeated rows, update only the touched rows). Both
kernels take Keras's scalars (1 − β computed in double, rounded once), so
the default path gives `keras.optimizers.Adam`'s numbers. The other
backends' tables follow the TensorFlow ones ([Backends](backends.md)).

Reproduce everything below with

```bash
pip install ".[test]"            # torch 2.13.0 (CPU) is the optional peer
python -m benchmarks --docs docs/performance.md   # about 25 minutes
python -m benchmarks --quick     # smaller workloads, under 3 minutes
```

All systems run in one process, interleaved round by round (where their
state would not fit in memory together, as the embedding workload's on a
24 GB machine, in groups that do, each interleaved). Peak memory is
measured in a fresh process per system: the peak resident memory of setting
up and running three steps, less the weights and gradients, so optimizer
state, temporaries and compilation. Read ratios, not absolute times: the
machines are shared and noisy.

![median ms per step](img/benchmarks.png)

## Reading the results

- *keras_adam default* and *keras_adam fused=True* run the same code: their
  difference is the noise of the machine.
- Inside `tf.function` without XLA (tf.distribute, op determinism, layers
  that don't compile), the fused kernel is several times faster than Keras's
  Adam on large variables, and uses a fraction of its temporary memory.
  Under XLA, both compile to about the same speed.
- Many small variables are dominated by per-kernel dispatch: 200 calls of
  a per-variable fused op on 10k parameters each cost about 4× one call on
  all 2.1M parameters. Like torch's fused Adam, the default path updates
  every tensor in one multi-tensor kernel; *keras_adam without our kernels*
  is the same optimizer with that kernel disabled (`KERAS_ADAM_KERNEL=0`:
  the `keras.ops` step, one variable at a time).
- `lazy_sparse=True` costs in proportion to the rows touched, not the table
  size. The sparse-rows kernel groups repeated rows (no sort when the
  indices are already ordered, a radix sort otherwise), then updates each
  distinct row of the weights and both moments in one pass, rows split over
  the thread pool. Its cost is the scattered access to three tables of
  256 MB (each touched row a cache miss in each table), which it hides in
  part by asking for the rows 8 rows ahead (software prefetch: the op went
  from about 3.7 to 2.8 ms). Under XLA, and with `fused=False`, the same
  update is gathers, `keras.ops` and scatters.
- Most of that scattered access is address translation: each touched row
  sits on its own 4 KiB page of each table. With transparent huge pages the
  whole lazy step went from 2.6–3.1 to 2.1–2.4 ms on this machine (three
  runs each, prefetching on). Linux gives them to TensorFlow's large
  buffers when glibc is asked to, before Python starts:
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py` (glibc
  2.35 or later, and `/sys/kernel/mm/transparent_hugepage/enabled` set to
  `madvise` or `always`). The tables above are measured without it.
- *tf.function call, gradients in, no update* is a `tf.function` that
  takes the same gradients and does nothing. Every TensorFlow row pays at
  least that per step, in Python and in TensorFlow's function runtime, so
  it bounds what any optimizer called this way can reach. On 200 small
  variables the call alone (200 gradients in, 600 variable handles
  captured) costs 0.84–0.89× torch's whole fused step (the two runs of
  2026-12-06). The rest of our step is TensorFlow's cost per input too,
  not the update's. Sampled with `perf` (the step with its gradients
  captured, one thread, 2026-12-06): 28% of the time in our kernel's
  arithmetic, about 3% in the op's own work per variable (finding, locking
  and checking 600 variables), and the rest in the function call: Python
  (27%), and TensorFlow's function runtime and its allocations (an `_Arg`
  kernel per input, each resource handle copied with its name and
  shapes). In the same run one variable of the same 2.1M values took
  1.7 ms against 3.9 ms for the 200, and a `tf.function` that captures
  the same 800 inputs and only passes them through `IdentityN` cost 0.6×
  our whole step. Keras's Adam pays the same per input. Fewer inputs would
  need one moment buffer per dtype instead of one per variable, which
  would change the state that moves between `keras.optimizers.Adam` and
  ours. In `model.fit` the gradients are computed
  inside the training function, so they are not passed in, but the
  captured handles are: the rows *…, gradients captured* time that form (a
  `tf.function` without arguments that closes over the gradients, as torch's
  `step()` finds them in `param.grad`). The targets use the rows with the
  gradients passed in.
- Timing method: every round runs the systems in a new random order, with
  a 20 ms busy wait after each step. Without it, OpenMP threads left
  spinning by torch and the floor took the cores from whichever system ran
  next (with a fixed rotation, always the same one: it looked 20–40% slower
  than the identical *fused=True* row).

"""


#: Put above the TensorFlow step tables when they carry no date: saved before
#: the date was added, they predate the kernels' exact scalars.
UNDATED_NOTE = """
!!! note "Measured before the exact scalars"
    These TensorFlow tables were measured before the kernels took Keras's
    scalars and before `ResourceApplyAdam` was retired. Their
    *keras_adam ResourceApplyAdam per variable* row timed that op; with
    `KERAS_ADAM_KERNEL=0` the optimizer now runs the `keras.ops` step, and
    under XLA the default path is the `keras.ops` step too (measured at
    0.95–1.03× Keras's Adam under XLA when the change was made). The next
    `python -m benchmarks --docs docs/performance.md` refreshes them. The
    JAX and PyTorch tables below are current.
"""


#: The other backends' tables (`python -m benchmarks --backend NAME`), with
#: the page section each gets: written by `benchmarks.<name>_backend`.
BACKEND_SECTIONS = {
    "jax": (
        "On the JAX backend",
        "`KERAS_BACKEND=jax`: the step under `jax.jit` (as in `model.fit`), "
        "against `keras.optimizers.Adam` and `optax.adam` compiled the same way. "
        "Under `jax.jit` our default step is Keras's program: `model.fit`'s traced "
        "training step has the same jaxpr with either optimizer (tested, with a "
        "schedule, `clipnorm`, loss scaling and EMA too), so a ratio away from 1 "
        "between those two rows is the machine's noise (the 50-medium step's "
        "optimized HLO is the same 1725 instructions with either). "
        "Reproduce with `python -m benchmarks --backend jax`.",
    ),
    "torch": (
        "On the PyTorch backend",
        "`KERAS_BACKEND=torch`: `optimizer.apply` eagerly (as in `model.fit`) and "
        "under `torch.compile` (as in `model.fit(jit_compile=True)`), against Keras's "
        "own torch Adam and `torch.optim.Adam`. A compiled step pays torch.compile's "
        "per-call checks on every tensor it reads (Dynamo's guards and Inductor's "
        "input asserts, about 1.5 ms on 200 variables and their moments, the same for "
        "Keras's Adam), so on many small variables it is slower than our eager step; "
        "inside a compiled `fit` those checks cover the whole training step. "
        "On 200 small variables our eager step is faster than torch's own fused Adam "
        "but short of 10× Keras's: it updates them in one call on one thread, "
        "streaming 28 bytes per parameter. A second thread made the step alone 12% "
        "faster (the median of five runs), but in `model.fit`, right after the "
        "backward pass, whose OpenMP threads still spin, it waited for a core and "
        "epochs were 4-10% slower, so the step keeps one thread. "
        "Reproduce with `python -m benchmarks --backend torch`.",
    ),
}


#: The `model.fit` section (`python -m benchmarks --fit`): its introduction.
FIT_INTRO = """The tables above time the optimizer's step alone. In `model.fit` the step
is one part of the training step, beside the forward and backward passes, so
the speedup shows only where the optimizer's share is large: models whose
parameters are many and cheap to use, as in collaborative filtering (large
embedding tables, a dot product). Elsewhere (convolutions, attention,
recurrences) the optimizer is a small part of the step, and a few rounds on
shared cores swing epoch times by tens of percent: a ratio far from 1 there
is noise unless it holds over more rounds (`--repeats`). Under XLA the dense step of
both optimizers is `keras.ops` code compiled into the same program.
Five keras-io example models on synthetic data of the right shapes
(`benchmarks/models.py`), trained from the same weights in the same order.
Reproduce with `python -m benchmarks --fit --backend all` (one backend:
`--backend jax`, and so on; `--quick` trains on a quarter of the data).
The rounds are paired: each round trains every optimizer once, in a new
random order, and the *speedup* is the median of the rounds' ratios, with
the lowest and highest round's as the *spread*. With `--control` a table
has a row *keras Adam again*: Keras's Adam timed a second time, as a system
of its own, so its speed-up and spread are what the noise alone gives. On
JAX (the table below) those read 0.95-1.03x, with spreads up to
0.89-1.25, and every keras_adam row lies within them (0.97-1.02x): under
`jax.jit` both optimizers are one program, and the earlier 0.96x
(convnet) and 1.22x (recommender) were this noise. On TensorFlow the A/A
rows read 0.91-1.18x, with spreads as wide as 0.66-1.78. Its two
keras_adam rows below 0.95x, the LSTM's 0.88x (8 steps an epoch on the
quick data) and the recommender's 0.91x under XLA, were 1.00x when timed
again on the full data with every model built once in one process and
its epochs interleaved (12 and 6 rounds; Keras's Adam against itself
1.00x and 1.02x).

On PyTorch, epoch times swing with the machine's other load, Keras's Adam's
most. torch's CPU ops split their work over all of torch's threads
(OpenMP) and each waits at its end for the slowest thread; when another
process holds one of the cores, every such op waits for a thread that is
not running. Measured on 2 cores with 2 torch threads (quick data, 3
epochs, a busy loop pinned to the second core for the "busy" runs), the
convnet's epochs went from 1.0 s to 3.4-3.7 s with Keras's Adam and from
1.2 s to 2.8-3.3 s with ours, and the recommender's from 3.9 s to
9.7-12.6 s with Keras's Adam and from 3.0 s to 5.2-7.0 s with ours:
Keras's step runs several ops per variable, each one such wait, where
ours runs one kernel call per group of variables. That is why Keras's
epochs on torch can take 2 s in one run and 18 s in the next on a shared
machine, or grow after the first epoch when other work starts; the
optimizer's state is not the cause (no subnormal value appeared in its
moments, checked in the same runs). Giving torch only the cores that are
free avoids the waits: with `torch.set_num_threads(1)` on the free core,
the recommender's epochs with Keras's Adam took 3.2-3.4 s while the other
core was busy.

The *loss diff* column is the largest relative difference of an epoch's
mean loss from Keras's Adam's. Models with an `Embedding` differ by design:
Keras's Adam squares each slice of a repeated row before summing, ours
squares the row's summed gradient (the correct Adam step; see
[the migration guide](migrating.md#my-embedding-model-trains-differently-from-kerasoptimizersadam)).
`lazy_sparse=True` differs more, as it should: untouched rows keep their
moments. In the recommender, the user and movie tables carry an L2
regularizer, whose gradient is dense, so there only the bias tables'
gradients are sparse rows.

Under `jit_compile=True` on PyTorch each fit compiles its own graphs, from
empty Dynamo and Inductor caches. The LSTM's epochs (8 steps on the quick
data) read 0.94x with ours; in one process with both models compiled and
timed alternately (6 rounds of 16 steps on 2 threads) a step took 89.4 ms
with ours and 89.5 ms with Keras's Adam (87.6 ms with ours and no per-call
thread setting): the gap is between separately compiled fits, not in the
optimizer's step.
"""


def _saved_section(path, level: str) -> str:
    """A saved table's text without its title line, its headings demoted to `level`."""
    body = path.read_text().split("\n", 1)[1]  # the page gives the section its own title
    return body.replace("\n## ", f"\n{level} ").replace("\n# ", f"\n{level} ")


def fit_sections(results_dir) -> str:
    """The Performance page's `model.fit` section, from the saved `fit_<backend>.md` tables."""
    from pathlib import Path

    titles = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
    parts = []
    for name, title in titles.items():
        saved = Path(results_dir) / f"fit_{name}.md"
        if saved.is_file():
            parts.append(f"\n### On {title}\n{_saved_section(saved, '####')}")
    if not parts:
        return ""
    plot = Path(results_dir) / "fit_speedup.png"
    figure = ""
    if plot.is_file():
        figure = (
            "\n![keras_adam.Adam's speed-up over keras.optimizers.Adam in model.fit, "
            "per model and backend](img/fit-speedup.png)\n"
        )
    return "\n## Training real models (`model.fit`)\n\n" + FIT_INTRO + figure + "".join(parts)


def backend_sections(results_dir) -> str:
    """The Performance page's sections for `model.fit` and the other backends' saved tables."""
    from pathlib import Path

    parts = [fit_sections(results_dir)]
    for name, (title, intro) in BACKEND_SECTIONS.items():
        saved = Path(results_dir) / f"{name}_backend.md"
        if saved.is_file():
            parts.append(f"\n## {title}\n\n{intro}\n{_saved_section(saved, '###')}")
    return "".join(parts)


def show_and_save(table: str, output) -> None:
    """Print a backend's table, and write it to `output` (a path, or None)."""
    print()
    print(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table)


def write_docs_page(path, table: str, png) -> None:
    """Write the docs' Performance page from a results table and plot.

    The other backends' tables saved beside `png` are added as sections.
    """
    import shutil
    from pathlib import Path

    path = Path(path)
    image = path.parent / "img" / "benchmarks.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, image)
    fit_plot = Path(png).parent / "fit_speedup.png"
    if fit_plot.is_file():
        shutil.copyfile(fit_plot, image.parent / "fit-speedup.png")
    body = table.split("\n", 1)[1]  # the page has its own title
    dated = re.match(r"\s*\d{4}-\d{2}-\d{2}, ", body) is not None
    path.write_text(
        DOCS_INTRO
        + "## Results\n"
        + ("" if dated else UNDATED_NOTE)
        + body.replace("\n## ", "\n### ").replace("\n### Targets", "\n## Targets")
        + backend_sections(Path(png).parent)
    )
