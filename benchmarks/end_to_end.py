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
  compiled epoch with.

Each system trains `--rounds` times (the systems in a new random order each
round). The table gives the first epoch (tracing, compilation and the
first steps), the median steady epoch (epochs 2 and later), its ratio to
Keras's Adam (above 1: faster than Keras's), and how far the loss curve is
from Keras's: the largest relative difference of an epoch's mean training
loss. `keras_adam.Adam()` differs from Keras's Adam by design where an
embedding sees repeated rows in a batch (see the migration guide).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Label of the row every ratio and loss difference is taken against.
KERAS = "keras Adam"


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


def systems(backend: str, embeddings: bool, mode: str = "auto") -> dict:
    """Label to optimizer factory for a model."""
    import keras

    import keras_adam

    chosen = {KERAS: keras.optimizers.Adam, "keras_adam": keras_adam.Adam}
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
    keras.utils.set_random_seed(0)
    model = case.build()
    model.compile(
        optimizer=make_optimizer(),
        loss=case.loss,
        jit_compile=MODES[mode],
    )
    clock = EpochClock()
    x, y = data
    history = model.fit(
        x, y, batch_size=case.batch_size, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[clock],
    )  # fmt: skip
    return clock.seconds, [float(v) for v in history.history["loss"]]


def measure(
    quick: bool, epochs: int, rounds: int, names: list[str] | None, modes: list[str] | None = None
) -> list[Run]:
    """Train every model, mode and system; rounds interleaved."""
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
            chosen = systems(backend, case.embeddings, mode)
            results = {label: Run(case.name, mode, label) for label in chosen}
            for round_ in range(rounds):
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
        f"{meta['machine']}; {meta['epochs']} epochs, {meta['rounds']} rounds, "
        f"{'quick (a quarter of the data)' if meta['quick'] else 'full data'}. "
        "Times are medians over the rounds; speedup is Keras's steady epoch over the row's "
        "(above 1: faster than Keras's Adam); loss diff is the largest relative difference "
        "of an epoch's mean training loss from Keras's Adam's.",
    ]
    for mode in dict.fromkeys(r.mode for r in runs):
        lines += [
            "",
            f"## {mode_title(mode, meta['backend'])}",
            "",
            "| model | optimizer | first epoch s | epoch s | speedup | loss diff | final loss |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for model in dict.fromkeys(r.model for r in runs if r.mode == mode):
            group = {r.system: r for r in runs if r.mode == mode and r.model == model}
            keras_run = group[KERAS]
            base = statistics.median(keras_run.steady)
            for label, run in group.items():
                steady = statistics.median(run.steady)
                difference = "-"
                if label != KERAS:
                    difference = f"{loss_difference(run.losses, keras_run.losses):.1e}"
                lines.append(
                    f"| {model} | {label} | {statistics.median(run.first):.2f} | {steady:.3f} | "
                    f"{base / steady:.2f}x | {difference} | {run.losses[-1]:.4f} |"
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
    from benchmarks.models import cases

    names = [case.name for case in cases()]
    parser.add_argument("--models", nargs="+", default=None, choices=names)
    parser.add_argument(
        "--modes", nargs="+", default=None, choices=list(MODES),
        help="jit_compile modes (default: auto, and true on TensorFlow and PyTorch)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first is reported apart), got {args.epochs}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    import keras

    runs = measure(args.quick, args.epochs, args.rounds, args.models, args.modes)
    meta = {
        "backend": keras.backend.backend(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "epochs": args.epochs,
        "rounds": args.rounds,
        "quick": args.quick,
    }
    table = markdown(runs, meta)
    from benchmarks import report

    report.show_and_save(table, args.output)


if __name__ == "__main__":
    main()
