"""`python -m benchmarks --fit [--backend NAME]`: `model.fit` time per epoch on four real models.

Runs in a process of one Keras backend (`KERAS_BACKEND`). For each model of
`benchmarks.models` and each compile mode (`--modes`: `jit_compile="auto"`,
Keras's default, everywhere; by default also `jit_compile=True` on
TensorFlow, XLA, and on PyTorch, torch.compile), it trains from the same
initial weights, in the same data order (no shuffling), with:

- `keras.optimizers.Adam()`;
- `keras_adam.Adam()`, the default path;
- `keras_adam.Adam(lazy_sparse=True)` for the models with embeddings, on
  TensorFlow (the only backend whose gradients are sparse rows);
- under torch.compile, `keras_adam.Adam(fused=False)` (the `keras.ops`
  step, which the compiler traces like Keras's), to compare the first
  compiled epoch with. Each compiled fit starts from empty Dynamo and
  Inductor caches, as a new process on a new machine would;
- with `--control`, `keras.optimizers.Adam()` a second time, as its own
  system (`CONTROL`): an A/A comparison whose speed-up and spread are what
  two runs of the same program differ by on this machine, the noise any
  other row's ratio is read against.

Each system trains `--rounds` times (the systems in a new random order each
round). The table gives the first epoch (tracing, compilation and the
first steps), the median steady epoch (epochs 2 and later), the speed-up
over Keras's Adam (above 1: faster than Keras's) as the median of each
round's ratio, with the lowest and highest round's (the spread: the rounds
are paired, so a machine's slow spell slows both), and how far the loss
curve is from Keras's: the largest relative difference of an epoch's mean
training loss. `--output fit_<backend>.md` also writes
`fit_<backend>.json`, every number; `python -m benchmarks --fit --backend
all` runs the three backends and draws `fit_speedup.png` from them
(`plot_speedups`). `keras_adam.Adam()` differs from Keras's Adam by design where an
embedding sees repeated rows in a batch (see the migration guide).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Label of the row every ratio and loss difference is taken against.
KERAS = "keras Adam"
#: Label of the A/A control (`--control`): Keras's Adam again, timed as its own system.
CONTROL = "keras Adam again"


@dataclass
class Run:
    """One system's training runs on one model in one mode.

    Attributes:
        model: The model's name.
        mode: A key of `MODES`.
        system: The optimizer's label.
        first: Seconds of the first epoch, one per round.
        steady: Median seconds of the later epochs, one per round.
        losses: Each epoch's mean training loss (first round).
    """

    model: str
    mode: str
    system: str
    first: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


#: Compile modes: name to `jit_compile`.
MODES = {"auto": "auto", "true": True, "false": False}
#: The modes measured on each backend unless `--modes` says otherwise (on JAX
#: "auto" is `jax.jit`, on PyTorch it is eager, on TensorFlow CPU `tf.function`).
DEFAULT_MODES = {"tensorflow": ("auto", "true"), "jax": ("auto",), "torch": ("auto", "true")}


def mode_title(mode: str, backend: str) -> str:
    """A mode's section title, e.g. "jit_compile=True (XLA)"."""
    if mode == "auto":
        return 'jit_compile="auto" (Keras\'s default)'
    if mode == "false":
        return "jit_compile=False"
    return f"jit_compile=True ({'torch.compile' if backend == 'torch' else 'XLA'})"


def systems(backend: str, embeddings: bool, mode: str = "auto", control: bool = False) -> dict:
    """Label to optimizer factory for a model; `control` adds Keras's Adam again (`CONTROL`)."""
    import keras

    import keras_adam

    chosen = {KERAS: keras.optimizers.Adam, "keras_adam": keras_adam.Adam}
    if control:
        chosen[CONTROL] = keras.optimizers.Adam
    if embeddings and backend == "tensorflow":
        chosen["keras_adam lazy_sparse"] = lambda: keras_adam.Adam(lazy_sparse=True)
    if backend == "torch" and mode == "true":
        chosen["keras_adam fused=False"] = lambda: keras_adam.Adam(fused=False)
    return chosen


def train(case, make_optimizer, mode: str, epochs: int, data) -> tuple[list[float], list[float]]:
    """Seconds and mean training loss of each epoch of one `fit` from seed 0."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    keras.backend.clear_session()
    compile_cache = contextlib.nullcontext()
    if keras.backend.backend() == "torch":
        import torch
        from torch._inductor.utils import fresh_cache

        # Each fit compiles its own model, as in a process of its own: else
        # Dynamo recompiles Keras's step function once per model and, past its
        # recompile limit (8), runs the later fits' steps eagerly.
        torch._dynamo.reset()
        if MODES[mode] is True:
            # And from an empty Inductor cache: else the first fit of a model
            # compiles the kernels the later ones load (its first epoch 40 s, theirs 15 s).
            compile_cache = fresh_cache()
    with compile_cache:
        return _fit(case, make_optimizer, mode, epochs, data, EpochClock())


def _fit(case, make_optimizer, mode: str, epochs: int, data, clock) -> tuple[list, list]:
    """`train`'s fit, its epochs timed by `clock`."""
    import keras

    keras.utils.set_random_seed(0)
    model = case.build()
    model.compile(
        optimizer=make_optimizer(),
        loss=case.loss,
        jit_compile=MODES[mode],
    )
    x, y = data
    history = model.fit(
        x, y, batch_size=case.batch_size, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[clock],
    )  # fmt: skip
    return clock.seconds, [float(v) for v in history.history["loss"]]


def measure(
    quick: bool,
    epochs: int,
    rounds: int,
    names: list[str] | None,
    modes: list[str] | None = None,
    compiled_rounds: int | None = None,
    control: bool = False,
) -> list[Run]:
    """Train every model, mode and system; rounds interleaved.

    `compiled_rounds` (default `rounds`) is the rounds of `jit_compile=True`,
    whose every fit compiles anew (on torch, half a minute and more);
    `control` adds the A/A row (`CONTROL`).
    """
    import keras

    from benchmarks.models import cases

    backend = keras.backend.backend()
    modes = modes or DEFAULT_MODES[backend]
    runs = []
    rng = random.Random(0)
    for case in cases(quick):
        if names and case.name not in names:
            continue
        data = case.data()
        for mode in modes:
            chosen = systems(backend, case.embeddings, mode, control)
            results = {label: Run(case.name, mode, label) for label in chosen}
            mode_rounds = rounds if mode != "true" or compiled_rounds is None else compiled_rounds
            for round_ in range(mode_rounds):
                order = list(chosen)
                rng.shuffle(order)
                for label in order:
                    seconds, losses = train(case, chosen[label], mode, epochs, data)
                    run = results[label]
                    run.first.append(seconds[0])
                    run.steady.append(statistics.median(seconds[1:]))
                    if round_ == 0:
                        run.losses = losses
                    print(
                        f"{case.name} {mode} {label}: first {seconds[0]:.2f} s, "
                        f"then {statistics.median(seconds[1:]):.2f} s/epoch, "
                        f"loss {losses[-1]:.4f}",
                        flush=True,
                    )
            runs += results.values()
    return runs


def round_ratios(run: Run, keras_run: Run) -> list[float]:
    """Keras's steady epoch over the run's, round by round (the rounds are paired)."""
    return [k / r for k, r in zip(keras_run.steady, run.steady, strict=True)]


def loss_difference(ours: list[float], keras_losses: list[float]) -> float:
    """Largest relative difference of an epoch's mean loss."""
    return max(abs(a - b) / abs(b) for a, b in zip(ours, keras_losses, strict=True))


def markdown(runs: list[Run], meta: dict) -> str:
    """The table, one section per mode."""
    from benchmarks.models import cases

    descriptions = {c.name: c.description for c in cases()}
    lines = [
        f"# model.fit on the {meta['backend']} backend",
        "",
        f"{meta.get('date', 'undated')}, {meta['machine']}; {meta['epochs']} epochs, "
        f"{meta['rounds']} rounds"
        + (
            f" ({meta['compiled_rounds']} with jit_compile=True)"
            if meta.get("compiled_rounds")
            else ""
        )
        + ", "
        f"{'quick (a quarter of the data)' if meta['quick'] else 'full data'}. "
        "Times are medians over the rounds; speedup is the median over the rounds of "
        "Keras's steady epoch over the row's (above 1: faster than Keras's Adam), and "
        "spread the lowest and highest round's; loss diff is the largest relative "
        "difference of an epoch's mean training loss from Keras's Adam's."
        + (f" {meta['note']}" if meta.get("note") else ""),
    ]
    for mode in dict.fromkeys(r.mode for r in runs):
        lines += [
            "",
            f"## {mode_title(mode, meta['backend'])}",
            "",
            "| model | optimizer | first epoch s | epoch s | speedup | spread | loss diff "
            "| final loss |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for model in dict.fromkeys(r.model for r in runs if r.mode == mode):
            group = {r.system: r for r in runs if r.mode == mode and r.model == model}
            keras_run = group[KERAS]
            for label, run in group.items():
                ratios = round_ratios(run, keras_run)
                difference, spread = "-", "-"
                if label != KERAS:
                    difference = f"{loss_difference(run.losses, keras_run.losses):.1e}"
                    spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
                lines.append(
                    f"| {model} | {label} | {statistics.median(run.first):.2f} | "
                    f"{statistics.median(run.steady):.3f} | {statistics.median(ratios):.2f}x | "
                    f"{spread} | {difference} | {run.losses[-1]:.4f} |"
                )
    lines += ["", "Models:", ""]
    lines += [f"- `{name}`: {text}" for name, text in descriptions.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the models, print the table and write it to `--output`."""
    import platform

    parser = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end")
    parser.add_argument("--quick", action="store_true", help="a quarter of the data")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--compiled-rounds", type=int, default=None,
        help="rounds of jit_compile=True (default: --rounds); each of its fits compiles",
    )  # fmt: skip
    from benchmarks.models import cases

    names = [case.name for case in cases()]
    parser.add_argument("--models", nargs="+", default=None, choices=names)
    parser.add_argument(
        "--modes", nargs="+", default=None, choices=list(MODES),
        help="jit_compile modes (default: auto, and true on TensorFlow and PyTorch)",
    )  # fmt: skip
    parser.add_argument(
        "--control", action="store_true",
        help=f"also time Keras's Adam a second time ({CONTROL!r}): the A/A noise of a ratio",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first is reported apart), got {args.epochs}")
    for name in ("rounds", "compiled_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    import keras

    runs = measure(
        args.quick, args.epochs, args.rounds, args.models, args.modes, args.compiled_rounds,
        args.control,
    )  # fmt: skip
    meta = {
        "backend": keras.backend.backend(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "epochs": args.epochs,
        "rounds": args.rounds,
        "compiled_rounds": args.compiled_rounds,
        "quick": args.quick,
    }
    table = markdown(runs, meta)
    from benchmarks import report

    report.show_and_save(table, args.output)
    if args.output:
        saved = {"meta": meta, "runs": [dataclasses.asdict(run) for run in runs]}
        args.output.with_suffix(".json").write_text(json.dumps(saved, indent=1))


def plot_speedups(paths: list[Path], output: Path, mode: str = "auto") -> None:
    """Bar chart of `keras_adam.Adam()`'s speed-up over Keras's Adam, per model and backend.

    One bar per backend (each `fit_<backend>.json` of `paths`) in each
    model's group, at the median of the rounds' ratios, with a line from the
    lowest to the highest round's; `mode` picks the `jit_compile` section.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    for path in paths:
        saved = json.loads(Path(path).read_text())
        runs = [Run(**run) for run in saved["runs"] if run["mode"] == mode]
        keras_runs = {run.model: run for run in runs if run.system == KERAS}
        results[saved["meta"]["backend"]] = {
            run.model: round_ratios(run, keras_runs[run.model])
            for run in runs
            if run.system == "keras_adam"
        }
    models = list(dict.fromkeys(model for ratios in results.values() for model in ratios))
    width = 0.8 / max(1, len(results))
    figure, axes = plt.subplots(figsize=(1.6 * len(models) + 2, 3.6))
    for k, (backend, ratios) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * width for i, m in enumerate(models) if m in ratios]
        values = [ratios[m] for m in models if m in ratios]
        medians = [statistics.median(v) for v in values]
        low = [m - min(v) for m, v in zip(medians, values, strict=True)]
        high = [max(v) - m for m, v in zip(medians, values, strict=True)]
        axes.bar(xs, medians, width, yerr=[low, high], capsize=3, label=backend, color=f"C{k}")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(models)), models)
    axes.set_ylabel("speed-up over keras.optimizers.Adam")
    axes.set_title(f"model.fit, steady epochs, jit_compile={mode!r}")
    axes.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
