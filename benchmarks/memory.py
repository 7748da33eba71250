"""`python -m benchmarks.memory`: what quantized Adam moments save, and what they cost.

`keras_adam.Adam(moment_dtype="int8")` and `moment_dtype="int4"` keep Adam's
m and v block-wise quantized. This module measures four things against
float32 Adam (`keras.optimizers.Adam` and `keras_adam.Adam(moment_dtype=None)`),
on one Keras backend per process (Keras reads `KERAS_BACKEND` once):

- `state`: the optimizer's state bytes per parameter, and the process's peak
  resident memory (VmHWM) while `model.fit` trains a 50.4M-parameter MLP for
  a few steps, each configuration in a fresh process of its own;
- `quality`: three models shaped like keras-io examples (`benchmarks.models`:
  the MNIST convnet, the transformer text classifier, the embedding
  recommender at keras-io's MovieLens shape) on synthetic data, several
  seeds: final validation loss and per-epoch loss curves of int8 and int4
  beside float32's seed-to-seed spread; on the models with embedding tables
  also with `quantize_embeddings=True` ("tables quantized").
  On the torch backend, torch's own low-bit Adams (torchao's `AdamW8bit` and
  `AdamW4bit`, bitsandbytes' `Adam8bit`, whichever import) train the same
  models, from the same weights, in the same data order, in a plain torch loop;
- `error`: after 100 steps on one fixed heavy-tailed gradient sequence, the
  dequantized m and v (`optimizer.read_moments`) against a float64 NumPy
  Adam: relative RMS and maximum relative error, ours and torch's peers';
- `speed`: the optimizer step of int8 and int4 against the float32 fused step,
  interleaved in one process (`benchmarks.run.time_workload`), on 10.5M
  parameters in 4 tensors and on 200 small variables.

Usage::

    python -m benchmarks.memory [--backend tensorflow|jax|torch|all] [--quick]
        [--output DIR] [--part state|quality|error|speed|all ...]
        [--models convnet|transformer|recommender ...]

Writes `memory_<backend>.md` (the tables), `memory_<backend>.json` (every
number, the loss curves included) and `memory_<backend>_loss.png` (with
matplotlib), and `memory_state.md`, the state tables of every backend
measured so far side by side, under `--output` (default benchmarks/results).
`--models` limits the quality part to some models. Until `keras_adam` has
`moment_dtype="int8"`/`"int4"`, their rows are left out and the report
says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKENDS = ("tensorflow", "jax", "torch")
PARTS = ("state", "quality", "error", "speed")
#: The quantized moment dtypes measured, when `keras_adam` has them.
QUANTIZED = ("int8", "int4")
KERAS = "keras.optimizers.Adam"
FLOAT32 = "keras_adam float32"
#: Every run's learning rate and ε (Keras's; passed to torch's peers too).
LEARNING_RATE, EPSILON = 1e-3, 1e-7
BETA_1, BETA_2 = 0.9, 0.999
#: The torch loop's float32 reference for the peers (same loop, same data).
TORCH_ADAM = "torch.optim.Adam (loop)"


#: Label suffix of a quantized optimizer with `quantize_embeddings=True`.
TABLES = ", tables quantized"


def ours(moment_dtype: str | None, tables: bool = False) -> str:
    """The table label of `keras_adam.Adam(moment_dtype=..., quantize_embeddings=tables)`."""
    label = FLOAT32 if moment_dtype is None else f"keras_adam {moment_dtype}"
    return label + TABLES if tables else label


@dataclass(frozen=True)
class Settings:
    """How big each part runs.

    Attributes:
        seeds: Seeds per model and optimizer (quality).
        epochs: Epochs per training run (quality).
        samples: Samples drawn per model (quality), 20% held out.
        error_shape: Shape of the tensor whose moments are compared (error).
        error_steps: Adam steps before the comparison (error).
        state_widths: The MLP's layer widths (state), input first.
        state_steps: Training steps measured (state).
        speed_tensors: Shapes of the "few tensors" speed workload.
        speed_small: Shape and count of the many-small-variables workload.
        repeats: Interleaved timing rounds (speed).
        jit_compile: `compile`'s `jit_compile` (quality), Keras's "auto" but in `tiny`.
        tensorflow_modes: The TensorFlow step modes timed (speed): "function", "xla".
    """

    seeds: int
    epochs: int
    samples: dict[str, int]
    error_shape: tuple[int, int]
    error_steps: int
    state_widths: tuple[int, ...]
    state_steps: int
    speed_tensors: tuple[tuple[int, ...], ...]
    speed_small: tuple[tuple[int, ...], int]
    repeats: int
    jit_compile: str | bool = "auto"
    tensorflow_modes: tuple[str, ...] = ("function", "xla")


def settings(quick: bool = False, tiny: bool = False) -> Settings:
    """The full settings, `quick` ones (minutes a backend) or `tiny` ones (a smoke test)."""
    if tiny:
        return Settings(
            seeds=2,
            epochs=2,
            samples={"convnet": 160, "transformer": 40, "recommender": 320},
            error_shape=(128, 128),
            error_steps=100,
            state_widths=(256, 1024, 256),
            state_steps=2,
            speed_tensors=((65_536,), (65_536,)),
            speed_small=((5_000,), 10),
            repeats=3,
            jit_compile=False,
            tensorflow_modes=("function",),
        )
    mlp = (2048, 4096, 4096, 4096, 2048)  # 50.4M parameters
    if quick:
        return Settings(
            seeds=3,
            epochs=3,
            samples={"convnet": 1280, "transformer": 320, "recommender": 100_000},
            error_shape=(512, 512),
            error_steps=100,
            state_widths=mlp,
            state_steps=3,
            speed_tensors=((655_360,),) * 4,
            speed_small=((10_486,), 200),
            repeats=7,
        )
    return Settings(
        seeds=3,
        epochs=8,
        samples={"convnet": 8192, "transformer": 2048, "recommender": 100_000},
        error_shape=(1024, 1024),
        error_steps=100,
        state_widths=mlp,
        state_steps=5,
        speed_tensors=((2_621_440,),) * 4,
        speed_small=((10_486,), 200),
        repeats=21,
    )


# ---------------------------------------------------------------- optimizers


def quantized_available() -> tuple[str, ...]:
    """The quantized moment dtypes this `keras_adam` accepts."""
    from keras_adam import adam

    return tuple(d for d in QUANTIZED if d in adam.MOMENT_DTYPES)


def our_dtypes() -> tuple[str | None, ...]:
    """float32 (None) and every available quantized moment dtype."""
    return (None, *quantized_available())


def make_optimizer(label: str):
    """A fresh optimizer for a table label (`KERAS` or `ours(dtype)`)."""
    import keras

    import keras_adam

    if label == KERAS:
        return keras.optimizers.Adam(LEARNING_RATE, epsilon=EPSILON)
    tables = label.endswith(TABLES)
    label = label.removesuffix(TABLES)
    dtype = None if label == FLOAT32 else label.removeprefix("keras_adam ")
    return keras_adam.Adam(
        learning_rate=LEARNING_RATE, epsilon=EPSILON, moment_dtype=dtype, quantize_embeddings=tables
    )


def state_bytes(optimizer) -> int:
    """Bytes of an optimizer's variables, its step counter and learning rate left out."""
    import keras

    skipped = {id(optimizer.iterations)}
    learning_rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(learning_rate, keras.Variable):
        skipped.add(id(learning_rate))
    total = 0
    for variable in optimizer.variables:
        if id(variable) in skipped or variable.name in ("iteration", "learning_rate"):
            continue
        itemsize = np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
        total += math.prod(variable.shape) * itemsize
    return total


def read_moments(optimizer, variable) -> dict[str, np.ndarray]:
    """The m and v of `variable` as float32 NumPy arrays (dequantized by the optimizer)."""
    if hasattr(optimizer, "read_moments"):
        return {k: np.asarray(v, "float32") for k, v in optimizer.read_moments(variable).items()}
    index = optimizer._get_variable_index(variable)  # keras.optimizers.Adam
    return {
        "momentum": np.asarray(optimizer._momentums[index], "float32"),
        "velocity": np.asarray(optimizer._velocities[index], "float32"),
    }


def torch_peers() -> tuple[dict[str, Callable], list[str]]:
    """The low-bit Adams of torch that import here: label to `factory(params)`; and why not.

    Every peer gets Keras's learning rate, β and ε, and no weight decay, so
    that it is Adam.
    """
    import torch

    options = {"lr": LEARNING_RATE, "betas": (BETA_1, BETA_2), "eps": EPSILON}
    peers: dict[str, Callable] = {
        TORCH_ADAM: lambda params: torch.optim.Adam(params, **options),
    }
    notes = []
    try:
        from torchao import __version__ as torchao_version
        from torchao.optim import AdamW4bit, AdamW8bit

        peers[f"torchao {torchao_version} AdamW8bit"] = lambda params: AdamW8bit(
            params, weight_decay=0.0, **options
        )
        peers[f"torchao {torchao_version} AdamW4bit"] = lambda params: AdamW4bit(
            params, weight_decay=0.0, **options
        )
    except Exception as error:  # any failure to import is a reason to report
        notes.append(f"torchao: not run ({type(error).__name__}: {error})")
    try:
        import bitsandbytes

        peers[f"bitsandbytes {bitsandbytes.__version__} Adam8bit"] = lambda params: (
            bitsandbytes.optim.Adam8bit(params, **options)
        )
    except Exception as error:
        notes.append(f"bitsandbytes: not run ({type(error).__name__}: {error})")
    return peers, notes


def peer_moments(optimizer, param) -> tuple[np.ndarray, np.ndarray]:
    """A torch peer's m and v for `param`, dequantized to float32 NumPy arrays."""
    state = optimizer.state[param]
    if "exp_avg" in state:  # torch.optim.Adam, torchao (OptimState8bit/4bit subclasses)
        moments = [state["exp_avg"], state["exp_avg_sq"]]
        moments = [m.dequantize() if hasattr(m, "dequantize") else m for m in moments]
    else:  # bitsandbytes: uint8 codes, a code map and per-block absmax
        from bitsandbytes import functional

        moments = []
        for k in ("1", "2"):
            codes = state[f"state{k}"]
            if codes.dtype == param.dtype:  # a tensor below min_8bit_size: float32
                moments.append(codes)
                continue
            moments.append(
                functional.dequantize_blockwise(
                    codes, absmax=state[f"absmax{k}"], code=state[f"qmap{k}"], blocksize=256
                )
            )
    m, v = (np.asarray(t.detach().float().cpu().numpy(), "float32") for t in moments)
    return m.reshape(param.shape), v.reshape(param.shape)


# --------------------------------------------------------------------- state


def state_probe(label: str, widths: tuple[int, ...], steps: int) -> dict:
    """In a fresh process: train the MLP `steps` steps with one optimizer; its memory.

    Returns the parameters, the optimizer's state bytes, the process's peak
    resident memory (VmHWM) over the whole run, and the peak above what was
    resident once the model was built (the high-water mark is reset there):
    the optimizer's state, the gradients, the activations, and any
    compilation.
    """
    import keras

    from benchmarks import run

    keras.utils.set_random_seed(0)
    layers = [keras.Input((widths[0],))]
    layers += [keras.layers.Dense(w, activation="relu") for w in widths[1:-1]]
    layers.append(keras.layers.Dense(widths[-1]))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(0)
    batch = 16
    x = rng.standard_normal((batch * steps, widths[0]), dtype="float32")
    y = rng.standard_normal((batch * steps, widths[-1]), dtype="float32")
    optimizer = make_optimizer(label)
    model.compile(optimizer=optimizer, loss="mse")
    peak_before_kb = run._status_kb("VmHWM")
    built_kb = run._status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident set size
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    peak_kb = run._status_kb("VmHWM")
    return {
        "label": label,
        "parameters": int(model.count_params()),
        "state_bytes": state_bytes(optimizer),
        "peak_mb": max(peak_kb, peak_before_kb) / 1024,
        "peak_over_model_mb": (peak_kb - built_kb) / 1024,
        "model_mb": built_kb / 1024,
        "seconds": seconds,
        "loss": float(history.history["loss"][-1]),
    }


def run_state(backend: str, config: Settings, quick: bool, tiny: bool) -> list[dict]:
    """Every configuration's `state_probe`, each in a fresh process of `backend`."""
    rows = []
    for label in [KERAS, *(ours(d) for d in our_dtypes())]:
        command = [sys.executable, "-m", "benchmarks.memory", "--probe", label]
        command += ["--tiny"] if tiny else (["--quick"] if quick else [])
        env = {**os.environ, "KERAS_BACKEND": backend}
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        try:
            row = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            row = {"label": label, "error": (result.stderr or result.stdout).strip()[-600:]}
        print(f"  state {label}: {row}", flush=True)
        rows.append(row)
    return rows


def state_table(backend: str, rows: list[dict]) -> str:
    """The state part's table for one backend."""
    reference = next((r for r in rows if r["label"] == KERAS and "error" not in r), None)
    parameters = next((r["parameters"] for r in rows if "parameters" in r), 0)
    lines = [
        f"## Optimizer state and peak memory ({backend})",
        "",
        f"`model.fit`, a {parameters / 1e6:.1f}M-parameter MLP, a few steps of batch 16; each "
        "row a fresh process. *bytes/param*: the optimizer's variables (step counter and "
        "learning rate left out) over the model's parameters. *peak RSS*: the process's "
        "high-water mark (VmHWM). *peak over model*: the high-water mark during `fit` "
        "above the resident size once the model was built (state, gradients, "
        "activations, compilation).",
        "",
        "| optimizer | state MB | bytes/param | ÷ float32 Adam | peak RSS MB "
        "| peak over model MB | Δ peak vs keras Adam MB | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | failed: {_cell(row['error'])} |||||||")
            continue
        per_param = row["state_bytes"] / row["parameters"]
        delta = f"{row['peak_mb'] - reference['peak_mb']:+.0f}" if reference else "–"
        lines.append(
            f"| {row['label']} | {row['state_bytes'] / 2**20:.1f} | {per_param:.3f} "
            f"| {per_param / 8:.3f} | {row['peak_mb']:.0f} | {row['peak_over_model_mb']:.0f} "
            f"| {delta} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe in one Markdown table cell."""
    return " ".join(str(text).replace("|", "/").split())[-300:]


# ------------------------------------------------------------------- quality


@dataclass(frozen=True)
class QualityCase:
    """One model of the quality part.

    Attributes:
        name: Short name used in tables.
        build: Returns the (uncompiled) model; call after seeding.
        data: Returns `(x, y)` for a number of samples.
        loss: The Keras loss name.
        batch_size: Batch size.
        embeddings: Whether the model has embedding tables (then quantized
            optimizers also run with `quantize_embeddings=True`).
    """

    name: str
    build: Callable
    data: Callable
    loss: str
    batch_size: int
    embeddings: bool = False


def quality_cases() -> list[QualityCase]:
    """The convnet, the transformer and the recommender (keras-io's MovieLens shape)."""
    import functools

    from benchmarks import models

    movielens = {"users": models.MOVIELENS_USERS, "movies": models.MOVIELENS_MOVIES}

    return [
        QualityCase(
            "convnet",
            models.convnet,
            models.convnet_data,
            "sparse_categorical_crossentropy",
            128,
        ),
        QualityCase(
            "transformer",
            models.transformer,
            models.transformer_data,
            "sparse_categorical_crossentropy",
            32,
            embeddings=True,
        ),
        QualityCase(
            "recommender",
            functools.partial(models.recommender, **movielens),
            functools.partial(models.recommender_data, **movielens),
            "binary_crossentropy",
            64,
            embeddings=True,
        ),
    ]


def split(case: QualityCase, samples: int, seed: int) -> tuple[tuple, tuple]:
    """The case's data, the last 20% held out, the rest in the seed's order."""
    x, y = case.data(samples)
    held_out = samples // 5
    order = np.random.default_rng(seed).permutation(samples - held_out)
    train = (x[:-held_out][order], y[:-held_out][order])
    return train, (x[-held_out:], y[-held_out:])


def train_keras(
    case: QualityCase, label: str, seed: int, data: tuple, epochs: int, jit_compile="auto"
) -> dict:
    """`model.fit` from the seed's initial weights: per-epoch training and validation loss."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = case.build()
    model.compile(optimizer=make_optimizer(label), loss=case.loss, jit_compile=jit_compile)
    (x, y), validation = data
    history = model.fit(
        x, y, batch_size=case.batch_size, epochs=epochs, shuffle=False,
        validation_data=validation, verbose=0,
    )  # fmt: skip
    return {
        "loss": [float(v) for v in history.history["loss"]],
        "val_loss": [float(v) for v in history.history["val_loss"]],
        "quantized_share": _our_quantized_share(model, label),
    }


def _our_quantized_share(model, label: str) -> float:
    """Share of the trainable parameters whose moments are quantized."""
    from keras_adam import quantization

    variables = model.trainable_variables
    if label == KERAS:
        return 0.0
    optimizer = model.optimizer
    quantized = [
        v
        for v in variables
        if quantization.storage(optimizer.moment_dtype, v, optimizer.quantize_embeddings)
        in quantization.QUANTIZED_DTYPES
    ]
    return sum(math.prod(v.shape) for v in quantized) / sum(math.prod(v.shape) for v in variables)


def peer_quantized_share(optimizer, params: list) -> float:
    """Share of `params`' values whose state a torch peer keeps in fewer than 32 bits.

    torchao quantizes a tensor only when its size is a multiple of its
    block size (else float32 state); bitsandbytes from 4096 values.
    """
    import torch

    quantized = 0
    for param in params:
        state = optimizer.state.get(param, {})
        values = [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        # torchao's state is a tensor subclass (OptimState8bit, ...), bitsandbytes' uint8;
        # every tensor has a `dequantize` method, so that is no sign.
        if any(type(v) is not torch.Tensor or v.dtype == torch.uint8 for v in values):
            quantized += param.numel()
    return quantized / sum(p.numel() for p in params)


def train_torch(case: QualityCase, factory: Callable, seed: int, data: tuple, epochs: int) -> dict:
    """The same training in a plain torch loop over the Keras model's parameters.

    Same initial weights (the seed), same batches in the same order, the same
    loss (the Keras loss plus the model's regularization losses, as `fit`).
    """
    import keras
    import torch

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = case.build()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = factory(params)
    loss_fn = keras.losses.get(case.loss)
    (x, y), (x_val, y_val) = data

    def loss_of(xb: np.ndarray, yb: np.ndarray, training: bool):
        prediction = model(keras.ops.convert_to_tensor(xb), training=training)
        loss = keras.ops.mean(loss_fn(keras.ops.convert_to_tensor(yb), prediction))
        return loss + sum(model.losses) if model.losses else loss

    curves: dict[str, list[float]] = {"loss": [], "val_loss": []}
    for _ in range(epochs):
        losses = []
        for start in range(0, len(x), case.batch_size):
            batch = slice(start, start + case.batch_size)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(x[batch], y[batch], training=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            weighted = 0.0
            for start in range(0, len(x_val), 256):
                batch = slice(start, start + 256)
                weighted += float(loss_of(x_val[batch], y_val[batch], False)) * len(y_val[batch])
        curves["loss"].append(float(np.mean(losses)))
        curves["val_loss"].append(weighted / len(x_val))
    curves["quantized_share"] = peer_quantized_share(optimizer, params)
    return curves


def run_quality(
    backend: str, config: Settings, models: tuple[str, ...] | None = None
) -> tuple[list[dict], list[str]]:
    """Train every case (of `models`, default all) with every optimizer and seed.

    Returns:
        One row per (case, optimizer, seed), and notes on the torch peers.
    """
    runs = []
    notes = []
    peers: dict[str, Callable] = {}
    if backend == "torch":
        peers, notes = torch_peers()
    for case in quality_cases():
        if models is not None and case.name not in models:
            continue
        for seed in range(config.seeds):
            data = split(case, config.samples[case.name], seed)
            systems = [(ours(d), None) for d in our_dtypes()]
            if case.embeddings:
                systems += [(ours(d, tables=True), None) for d in quantized_available()]
            systems += list(peers.items())
            for label, factory in systems:
                start = time.perf_counter()
                try:
                    if factory is None:
                        curves = train_keras(
                            case, label, seed, data, config.epochs, config.jit_compile
                        )
                    else:
                        curves = train_torch(case, factory, seed, data, config.epochs)
                except Exception as error:  # reported in the table
                    curves = {"error": f"{type(error).__name__}: {error}"}
                seconds = time.perf_counter() - start
                runs.append({"model": case.name, "optimizer": label, "seed": seed,
                             "seconds": seconds, **curves})  # fmt: skip
                final = curves.get("val_loss", [curves.get("error")])[-1]
                print(f"  quality {case.name} seed {seed} {label}: {final} ({seconds:.1f} s)",
                      flush=True)  # fmt: skip
    return runs, notes


def _finals(runs: list[dict], model: str, label: str, key: str = "val_loss") -> list[float]:
    return [
        r[key][-1] for r in runs if r["model"] == model and r["optimizer"] == label and key in r
    ]


def _spread(runs: list[dict], model: str, label: str, key: str) -> tuple[float, float]:
    """Mean and standard deviation over seeds of the final `key` loss."""
    finals = _finals(runs, model, label, key)
    mean = statistics.fmean(finals) if finals else math.nan
    return mean, statistics.stdev(finals) if len(finals) > 1 else math.nan


def quality_table(backend: str, runs: list[dict], notes: list[str], config: Settings) -> str:
    """The quality part's tables: final validation (and training) loss, then the mean curves."""
    labels = list(dict.fromkeys(r["optimizer"] for r in runs))
    models = list(dict.fromkeys(r["model"] for r in runs))
    lines = [
        f"## Training quality ({backend})",
        "",
        f"{config.seeds} seeds (initial weights and data order), {config.epochs} epochs, "
        "synthetic data, 20% held out; learning rate 1e-3, ε 1e-7. *final val loss*: "
        "mean ± std over seeds (min … max). *Δ ÷ ref std*: the difference of the means "
        f"over the reference's seed-to-seed standard deviation (the reference: "
        f"`{FLOAT32}`; for torch's peers `{TORCH_ADAM}`; within ±2: indistinguishable "
        "from reseeding). *train loss*: the last epoch's mean training loss (the "
        "recommender's held-out pairs include movies rarely or never rated in training, so its "
        "training loss shows more). *quantized share*: the share of the parameters whose "
        "moments are stored in 8 or 4 bits (the rest keep float32 moments).",
        "",
        "| model | optimizer | final val loss | min … max | Δ vs ref | Δ ÷ ref std "
        "| train loss | train Δ ÷ ref std | quantized share | s per run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in models:
        for label in labels:
            reference = FLOAT32 if label.startswith("keras_adam") else TORCH_ADAM
            ref_mean, ref_std = _spread(runs, model, reference, "val_loss")
            train_ref_mean, train_ref_std = _spread(runs, model, reference, "loss")
            finals = _finals(runs, model, label)
            errors = [
                r["error"]
                for r in runs
                if r["model"] == model and r["optimizer"] == label and "error" in r
            ]
            if not finals and not errors:
                continue  # not run on this model
            if not finals:
                lines.append(f"| {model} | {label} | failed: {_cell(errors[0])} ||||||||")
                continue
            mean, std = _spread(runs, model, label, "val_loss")
            train_mean, _ = _spread(runs, model, label, "loss")
            mine = [r for r in runs if r["model"] == model and r["optimizer"] == label]
            seconds = statistics.fmean(r["seconds"] for r in mine)
            shares = [r["quantized_share"] for r in mine if "quantized_share" in r]
            share = f"{statistics.fmean(shares):.0%}" if shares else "–"
            delta = mean - ref_mean
            lines.append(
                f"| {model} | {label} | {mean:.4f} ± {std:.4f} | {min(finals):.4f} … "
                f"{max(finals):.4f} | {delta:+.4f} | {delta / ref_std:+.2f} "
                f"| {train_mean:.4f} | {(train_mean - train_ref_mean) / train_ref_std:+.2f} "
                f"| {share} | {seconds:.1f} |" + (f" ({len(errors)} runs failed)" if errors else "")
            )
    if backend == "torch":
        lines += [
            "",
            f"The torch peers (and `{TORCH_ADAM}`, their float32 reference) train in a "
            "plain torch loop over the Keras model's parameters (`model.parameters()`), "
            "from the same initial weights, in the same batches and order, with the same "
            "loss; keras_adam trains with `model.fit`. Peers get Keras's learning rate, "
            "β and ε, and weight_decay=0 (AdamW is then Adam). torchao keeps float32 "
            "state for a tensor whose size is not a multiple of its block size (256, 4-bit "
            "128): see *quantized share* (the recommender's tables, 610 and 9 724 rows of "
            "50, are not).",
        ]
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "### Validation loss per epoch, mean over seeds",
        "",
        "| model | optimizer | "
        + " | ".join(f"epoch {e + 1}" for e in range(config.epochs))
        + " |",
        "|---|---|" + "---:|" * config.epochs,
    ]
    for model in models:
        for label in labels:
            curves = [
                r["val_loss"]
                for r in runs
                if r["model"] == model and r["optimizer"] == label and "val_loss" in r
            ]
            if curves:
                mean_curve = np.mean(np.array(curves), axis=0)
                lines.append(
                    f"| {model} | {label} | " + " | ".join(f"{v:.4f}" for v in mean_curve) + " |"
                )
    return "\n".join(lines) + "\n"


def plot_quality(path: Path, runs: list[dict], backend: str) -> bool:
    """Plot validation loss curves (mean over seeds, float32's min … max shaded).

    Returns:
        False when matplotlib is not installed (nothing written), else True.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    models = list(dict.fromkeys(r["model"] for r in runs))
    labels = list(dict.fromkeys(r["optimizer"] for r in runs))
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        for label in labels:
            curves = np.array(
                [
                    r["val_loss"]
                    for r in runs
                    if r["model"] == model and r["optimizer"] == label and "val_loss" in r
                ]
            )
            if curves.size == 0:
                continue
            epochs = np.arange(1, curves.shape[1] + 1)
            axis.plot(epochs, curves.mean(axis=0), marker="o", label=label)
            if label == FLOAT32:
                axis.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), alpha=0.2)
        axis.set_title(f"{model} ({backend})")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("validation loss")
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# --------------------------------------------------------------------- error


def heavy_tailed_gradients(shape: tuple[int, ...], steps: int, seed: int = 0) -> Iterator:
    """A fixed gradient sequence: per-element log-normal scales, Student-t (3) noise, a drift.

    Magnitudes span orders of magnitude within each block, as in real
    models, which is what block-wise absmax quantization finds hardest.
    """
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 1.5, shape)).astype("float32") * 1e-3
    drift = (0.2 * rng.standard_normal(shape)).astype("float32")
    for _ in range(steps):
        yield (scale * (drift + rng.standard_t(3, shape))).astype("float32")


def oracle_step(m: np.ndarray, v: np.ndarray, g: np.ndarray) -> None:
    """One float64 Adam moment update, in place."""
    g = g.astype("float64")
    m += (1 - BETA_1) * (g - m)
    v += (1 - BETA_2) * (g * g - v)


def _update(m: np.ndarray, v: np.ndarray, step: int) -> np.ndarray:
    """Adam's update direction from m and v (bias-corrected), in float64."""
    m_hat = m.astype("float64") / (1 - BETA_1**step)
    v_hat = np.maximum(v.astype("float64"), 0) / (1 - BETA_2**step)
    return m_hat / (np.sqrt(v_hat) + EPSILON)


def errors(estimate: np.ndarray, oracle: np.ndarray) -> dict[str, float]:
    """Relative RMS error, maximum relative error and the share of nonzeros read as zero.

    The maximum relative error divides by `max(|oracle|, 1e-3 · rms(oracle))`, so
    that the few elements of m near a sign change do not decide it alone.
    """
    estimate = estimate.astype("float64")
    difference = estimate - oracle
    rms = float(np.sqrt(np.mean(oracle**2)))
    floor = np.maximum(np.abs(oracle), 1e-3 * rms)
    return {
        "rel_rms": float(np.sqrt(np.mean(difference**2)) / rms),
        "max_rel": float(np.max(np.abs(difference) / floor)),
        "zeroed": float(np.mean((estimate == 0) & (oracle != 0))),
    }


def run_error(backend: str, config: Settings) -> tuple[list[dict], list[str]]:
    """Step every optimizer on the same gradients; compare m, v (and the update) with float64."""
    import keras

    shape, steps = config.error_shape, config.error_steps
    if backend == "torch":
        import torch
    systems = {}
    for dtype in our_dtypes():
        label = ours(dtype)
        variable = keras.Variable(np.zeros(shape, "float32"))
        optimizer = make_optimizer(label)
        optimizer.build([variable])
        systems[label] = ("keras", optimizer, variable)
    notes: list[str] = []
    if backend == "torch":
        peers, notes = torch_peers()
        for label, factory in peers.items():
            param = torch.nn.Parameter(torch.zeros(shape))
            systems[label] = ("torch", factory([param]), param)
    m = np.zeros(shape, "float64")
    v = np.zeros(shape, "float64")
    seconds = dict.fromkeys(systems, 0.0)
    for g in heavy_tailed_gradients(shape, steps):
        oracle_step(m, v, g)
        for label, (kind, optimizer, variable) in systems.items():
            start = time.perf_counter()
            if kind == "keras":
                _apply(optimizer, variable, g)
            else:
                variable.grad = torch.from_numpy(g.copy())
                optimizer.step()
            seconds[label] += time.perf_counter() - start
    rows = []
    oracle_update = _update(m, v, steps)
    for label, (kind, optimizer, variable) in systems.items():
        if kind == "keras":
            moments = read_moments(optimizer, variable)
            m_q, v_q = moments["momentum"], moments["velocity"]
        else:
            m_q, v_q = peer_moments(optimizer, variable)
        row = {"optimizer": label, "seconds": seconds[label]}
        for name, estimate, oracle in (("m", m_q, m), ("v", v_q, v)):
            row.update({f"{name}_{k}": value for k, value in errors(estimate, oracle).items()})
        row["update_rel_rms"] = errors(_update(m_q, v_q, steps), oracle_update)["rel_rms"]
        rows.append(row)
        print(f"  error {label}: {row}", flush=True)
    return rows, notes


def _apply(optimizer, variable, gradient: np.ndarray) -> None:
    """One eager `optimizer.apply` (under `torch.no_grad()` on torch, as `fit`)."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
    else:
        optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])


def error_table(backend: str, rows: list[dict], notes: list[str], config: Settings) -> str:
    """The error part's table."""
    size = math.prod(config.error_shape)
    lines = [
        f"## Moment error after {config.error_steps} steps ({backend})",
        "",
        f"One {config.error_shape[0]}×{config.error_shape[1]} tensor ({size:,} values), one "
        "fixed heavy-tailed gradient sequence (log-normal scales, Student-t noise); the "
        "optimizer's dequantized m and v against float64 NumPy Adam's. *rel RMS*: "
        "‖q − o‖ / ‖o‖. *max rel*: max |q − o| / max(|o|, 10⁻³·rms(o)). *zeroed*: share of "
        "nonzero oracle values read back as exactly 0. *update rel RMS*: the same for "
        "m̂/(√v̂ + ε) computed from the read-back m and v.",
        "",
        "| optimizer | m rel RMS | m max rel | m zeroed | v rel RMS | v max rel | v zeroed "
        "| update rel RMS | s for all steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['m_rel_rms']:.2e} | {r['m_max_rel']:.2e} "
            f"| {r['m_zeroed']:.2%} | {r['v_rel_rms']:.2e} | {r['v_max_rel']:.2e} "
            f"| {r['v_zeroed']:.2%} | {r['update_rel_rms']:.2e} | {r['seconds']:.2f} |"
        )
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- speed


def speed_systems(backend: str, config: Settings) -> list:
    """The systems timed on `backend`: Keras's Adam and ours (float32, int8, int4); peers."""
    from benchmarks.systems import System

    labels = [KERAS, *(ours(d) for d in our_dtypes())]
    family = {KERAS: "keras"}
    chosen = []
    if backend == "tensorflow":
        from benchmarks.systems import _tf_setup

        names = {"function": "tf.function", "xla": "XLA"}
        for mode in config.tensorflow_modes:
            name = names[mode]
            for label in labels:
                chosen.append(
                    System(
                        f"{label}, {name}",
                        family.get(label, "keras_adam"),
                        _tf_setup(lambda label=label: make_optimizer(label), mode),
                    )
                )
    elif backend == "jax":
        from benchmarks.jax_backend import _keras_jit

        def jit_setup(label: str) -> Callable:
            def setup(workload) -> Callable[[], None]:
                import jax.numpy as jnp

                from benchmarks.workloads import gradients

                grads = [jnp.asarray(g) for g in gradients(workload)]
                return _keras_jit(lambda: make_optimizer(label))(grads)

            return setup

        for label in labels:
            chosen.append(
                System(f"{label}, jax.jit", family.get(label, "keras_adam"), jit_setup(label))
            )
    else:
        from benchmarks.torch_backend import _keras_setup

        for label in labels:
            chosen.append(
                System(
                    f"{label}, eager",
                    family.get(label, "keras_adam"),
                    _keras_setup(lambda label=label: make_optimizer(label)),
                )
            )
        peers, _ = torch_peers()
        for label, factory in peers.items():
            chosen.append(System(label, "torch", _torch_peer_setup(factory)))
    return chosen


def _torch_peer_setup(factory: Callable) -> Callable:
    def setup(workload) -> Callable[[], None]:
        import torch

        from benchmarks.workloads import gradients

        params = [torch.nn.Parameter(torch.zeros(shape)) for shape in workload.shapes]
        for param, grad in zip(params, gradients(workload), strict=True):
            param.grad = torch.from_numpy(grad)
        return factory(params).step

    return setup


def speed_workloads(config: Settings) -> list:
    """The "few tensors" workload and the many-small-variables one."""
    from benchmarks.workloads import Workload

    few = Workload(
        f"{len(config.speed_tensors)} tensors",
        "a few large tensors",
        config.speed_tensors,
    )
    shape, count = config.speed_small
    many = Workload(f"{count} small", f"{count} variables of {shape[0]:,}", (shape,) * count)
    return [few, many]


def run_speed(backend: str, config: Settings) -> list[dict]:
    """Time every system, interleaved round by round; median ms per step."""
    from benchmarks import run

    rows = []
    chosen = speed_systems(backend, config)
    for workload in speed_workloads(config):
        print(f"  speed {workload.name} ({workload.parameters:,} parameters)", flush=True)
        try:
            measured = run.time_workload(workload, config.repeats, candidates=chosen)
        except Exception:  # find the failing systems, time the others
            survivors = []
            for system in chosen:
                try:
                    system.setup(workload)()
                    survivors.append(system)
                except Exception as error:  # reported in the table
                    rows.append(
                        {
                            "workload": workload.name,
                            "parameters": workload.parameters,
                            "system": system.name,
                            "error": f"{type(error).__name__}: {error}",
                        }
                    )
            measured = run.time_workload(workload, config.repeats, candidates=survivors)
        for m in measured:
            rows.append(
                {
                    "workload": workload.name,
                    "parameters": workload.parameters,
                    "system": m.system,
                    "median_ms": m.median_ms,
                    "first_call_s": m.first_call_s,
                }
            )
    return rows


def speed_table(backend: str, rows: list[dict], config: Settings) -> str:
    """The speed part's table: each system's median and its ratio to float32 in the same mode."""
    lines = [
        f"## Optimizer step time ({backend})",
        "",
        f"Median of {config.repeats} interleaved rounds (random order each round), gradients "
        "given. *÷ float32*: this step's time over `keras_adam.Adam()`'s (float32 moments, "
        "the fused step) in the same mode. Keras optimizers: `optimizer.apply` (on torch "
        "eagerly under `torch.no_grad()`, on JAX `stateless_apply` under `jax.jit`); "
        f"torch's optimizers (`{TORCH_ADAM}` and the peers): `optimizer.step()` with "
        f"`.grad` set, divided by `{TORCH_ADAM}`'s.",
        "",
        "| workload | system | median ms | ÷ float32 | first call s |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['workload']} | {row['system']} | failed: {_cell(row['error'])} ||"
            )
            continue
        reference = _speed_reference(row, rows)
        ratio = f"{row['median_ms'] / reference:.2f}×" if reference else "–"
        lines.append(
            f"| {row['workload']} ({row['parameters'] / 1e6:.1f}M) | {row['system']} "
            f"| {row['median_ms']:.2f} | {ratio} | {row['first_call_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _speed_reference(row: dict, rows: list[dict]) -> float | None:
    """The float32 row's median for `row`'s workload and mode."""
    system = row["system"]
    if "," in system:
        wanted = f"{FLOAT32},{system.split(',', 1)[1]}"
    else:
        wanted = TORCH_ADAM
    for other in rows:
        if other["workload"] == row["workload"] and other["system"] == wanted:
            return other.get("median_ms")
    return None


# ---------------------------------------------------------------- the report


def measure(
    backend: str,
    parts: list[str],
    quick: bool,
    tiny: bool,
    models: tuple[str, ...] | None = None,
) -> tuple[str, dict]:
    """Run the chosen parts in this process (of `backend`); the Markdown and the data.

    `models` limits the quality part to those cases (default: all).
    """
    import keras

    if keras.backend.backend() != backend:
        raise RuntimeError(
            f"needs KERAS_BACKEND={backend}, Keras runs on {keras.backend.backend()}"
        )
    config = settings(quick, tiny)
    available = quantized_available()
    data: dict = {
        "backend": backend,
        "quick": quick,
        "tiny": tiny,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, Keras {keras.__version__}",
        "quantized_available": list(available),
    }
    sections = [
        f"# Quantized Adam moments ({backend})",
        "",
        f"{data['machine']}. "
        + ("Quick settings. " if quick else "")
        + ("Tiny settings (a smoke test). " if tiny else ""),
    ]
    missing = [d for d in QUANTIZED if d not in available]
    if missing:
        sections.append(
            f"`moment_dtype` {', '.join(missing)} not in this keras_adam "
            "(`keras_adam.adam.MOMENT_DTYPES`): those rows are left out.\n"
        )
    data["part_seconds"] = {}
    for part in parts:
        print(f"{part} ...", flush=True)
        start = time.perf_counter()
        if part == "state":
            data["state"] = run_state(backend, config, quick, tiny)
            sections.append(state_table(backend, data["state"]))
        elif part == "quality":
            data["quality"], notes = run_quality(backend, config, models)
            data["quality_notes"] = notes
            sections.append(quality_table(backend, data["quality"], notes, config))
        elif part == "error":
            data["error"], notes = run_error(backend, config)
            data["error_notes"] = notes
            sections.append(error_table(backend, data["error"], notes, config))
        else:
            data["speed"] = run_speed(backend, config)
            sections.append(speed_table(backend, data["speed"], config))
        data["part_seconds"][part] = time.perf_counter() - start
        print(f"{part}: {data['part_seconds'][part]:.0f} s", flush=True)
    return "\n".join(sections), data


def combined_state(output: Path) -> str | None:
    """The state tables of every backend saved under `output`, one after another."""
    tables = []
    for backend in BACKENDS:
        saved = output / f"memory_{backend}.json"
        if saved.is_file():
            rows = json.loads(saved.read_text()).get("state")
            if rows:
                tables.append(state_table(backend, rows))
    if not tables:
        return None
    return "# Optimizer state and peak memory, every backend\n\n" + "\n".join(tables)


def save(output: Path, backend: str, table: str, data: dict) -> list[Path]:
    """Write the tables, the JSON, the loss plot and the combined state page; their paths."""
    output.mkdir(parents=True, exist_ok=True)
    written = [output / f"memory_{backend}.md", output / f"memory_{backend}.json"]
    written[0].write_text(table)
    written[1].write_text(json.dumps(data, indent=1))
    if data.get("quality") and plot_quality(
        output / f"memory_{backend}_loss.png", data["quality"], backend
    ):
        written.append(output / f"memory_{backend}_loss.png")
    combined = combined_state(output)
    if combined:
        written.append(output / "memory_state.md")
        written[-1].write_text(combined)
    return written


def main(argv: list[str] | None = None) -> str | None:
    """Parse the command line; run here or in a process of the chosen backend.

    Returns:
        The Markdown report when it ran in this process, else None.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        help="the Keras backend (default: KERAS_BACKEND, else tensorflow); all: each in turn",
    )
    parser.add_argument("--quick", action="store_true", help="a few minutes a backend")
    parser.add_argument("--tiny", action="store_true", help="seconds: a smoke test, no numbers")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--part", nargs="+", choices=(*PARTS, "all"), default=["all"], help="one or more parts"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("convnet", "transformer", "recommender"),
        help="the quality part's models (default: all three)",
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        config = settings(args.quick, args.tiny)
        print(json.dumps(state_probe(args.probe, config.state_widths, config.state_steps)))
        return None
    parts = [p for p in PARTS if p in args.part or "all" in args.part]
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    here = os.environ.get("KERAS_BACKEND", "tensorflow")
    if "keras" in sys.modules:
        here = sys.modules["keras"].backend.backend()
    for backend in backends:
        if backend != here or len(backends) > 1:
            command = [sys.executable, "-m", "benchmarks.memory", "--backend", backend]
            command += ["--output", str(args.output), "--part", *args.part]
            command += ["--quick"] * args.quick + ["--tiny"] * args.tiny
            command += ["--models", *args.models] if args.models else []
            subprocess.run(command, env={**os.environ, "KERAS_BACKEND": backend}, check=True)
            continue
        models = tuple(args.models) if args.models else None
        table, data = measure(backend, parts, args.quick, args.tiny, models)
        print()
        print(table)
        for path in save(args.output, backend, table, data):
            print(f"wrote {path}")
        return table
    return None


if __name__ == "__main__":
    main()
