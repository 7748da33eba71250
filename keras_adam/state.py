"""Adam's state between optimizers and files: named layouts and `transfer_state`.

Float state (`moment_dtype` None or a float dtype) is saved exactly as
`keras.optimizers.Adam` saves it: arrays "0", "1", ... in the order of
`optimizer.variables`, so either class loads it. Quantized state
(`moment_dtype` "int8" or "int4") is saved with one more entry, `LAYOUT_KEY`:
the quantization format and each array's variable name, shape and dtype. A
load checks it before assigning anything, so state saved for another model
(a layer added, removed or reshaped), another format, or float state loaded
into a quantized optimizer (and the reverse) fails with an error that says
which, instead of loading wrong. `transfer_state` converts between float and
quantized state.
"""

from __future__ import annotations

import json
import re
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_adam import quantization
from keras_adam.quantization import QuantizedMoment

#: The store entry of a quantized optimizer's layout.
LAYOUT_KEY = "layout"

#: Version of the stored moments (`quantization.Format.table`, `quantization.pack`):
#: version 4 stores each moment in one variable (scales, then codes) and
#: int8 with float maps, v's with 4 mantissa bits. Unreleased development
#: versions saved version 3 (codes and scales in two variables each),
#: version 2 (v's map with 3 bits) and version 1 ("keras_adam.decade_map/1",
#: a decade map for int8 too).
FORMAT = "keras_adam.code_maps/4"

_MOMENT_NAMES = ("momentum", "velocity", "velocity_hat")

#: The end of a quantized moment's variable name (`Adam._add_moment`).
QUANTIZED_SUFFIX = "_quantized"


def layout(optimizer: Any) -> dict:
    """The layout record of a quantized optimizer's variables (see the module docstring)."""
    return {
        "format": FORMAT,
        "moment_dtype": optimizer.moment_dtype,
        "variables": [
            {
                "name": variable.name,
                "shape": list(variable.shape),
                "dtype": keras.backend.standardize_dtype(variable.dtype),
            }
            for variable in optimizer.variables
        ],
    }


def encode_layout(record: dict) -> np.ndarray:
    """A layout record as a uint8 array (stores hold arrays)."""
    return np.frombuffer(json.dumps(record).encode(), dtype=np.uint8).copy()


def decode_layout(store: Any) -> dict | None:
    """The layout record of `store`, or None if it has none (float state)."""
    if LAYOUT_KEY not in store:
        return None
    return json.loads(np.asarray(store[LAYOUT_KEY], dtype=np.uint8).tobytes().decode())


def saved_arrays(store: Any) -> list[np.ndarray]:
    """The arrays "0", "1", ... of `store`, in order."""
    count = sum(1 for key in store.keys() if key != LAYOUT_KEY)
    return [np.array(store[str(i)]) for i in range(count)]


def _normalized(name: str) -> str:
    # Keras numbers layers it names ("dense_3") per session and may drop
    # the model's name from paths: compare names without those numbers.
    return "_".join(t for t in re.split(r"[_/]", name) if t and not t.isdigit())


def _same_variable(saved: str, own: str) -> bool:
    a, b = _normalized(saved), _normalized(own)
    return a == b or a.endswith("_" + b) or b.endswith("_" + a)


def check_layout(optimizer: Any, saved: dict | None, arrays: list[np.ndarray]) -> None:
    """Raise unless state with layout `saved` (None: float state) fits `optimizer`.

    Args:
        optimizer: The `keras_adam.Adam` that loads, built.
        saved: The saved layout record, or None.
        arrays: The saved arrays.

    Raises:
        ValueError: if float and quantized state meet, or the format, count,
            names, shapes or dtypes differ.
    """
    own = layout(optimizer) if quantization.is_quantized(optimizer.moment_dtype) else None
    where = f"Cannot load optimizer state into '{optimizer.name}'"
    convert = (
        "Load it into an optimizer of the saving `moment_dtype`, then move it with "
        "`keras_adam.transfer_state(source, target)`, which quantizes and dequantizes."
    )
    if saved is None and own is not None:
        raise ValueError(
            f"{where}: the saved state has float moments but this optimizer has "
            f"moment_dtype={optimizer.moment_dtype!r}. {convert}"
        )
    if saved is not None and own is None:
        raise ValueError(
            f"{where}: the saved state has quantized moments "
            f"(moment_dtype={saved.get('moment_dtype')!r}) but this optimizer has "
            f"moment_dtype={optimizer.moment_dtype!r}. {convert}"
        )
    if saved is None:
        return
    if saved.get("format") != FORMAT or saved.get("moment_dtype") != own["moment_dtype"]:
        raise ValueError(
            f"{where}: the saved state is {saved.get('moment_dtype')!r} in format "
            f"{saved.get('format')!r}; this optimizer has moment_dtype="
            f"{own['moment_dtype']!r} in format {FORMAT!r}. {convert}"
        )
    entries = saved["variables"]
    if len(entries) != len(own["variables"]) or len(arrays) != len(entries):
        raise ValueError(
            f"{where}: the saved state has {len(entries)} variables but this optimizer "
            f"has {len(own['variables'])}. Was it saved for another model, or with other "
            "options (amsgrad, quantize_embeddings, skip_nonfinite, use_ema, "
            "gradient_accumulation_steps)?"
        )
    for i, (entry, mine, array) in enumerate(zip(entries, own["variables"], arrays, strict=True)):
        saved_quantized, own_quantized = (
            x["name"].endswith(QUANTIZED_SUFFIX) for x in (entry, mine)
        )
        bare = [x["name"].removesuffix(QUANTIZED_SUFFIX) for x in (entry, mine)]
        if saved_quantized != own_quantized and _same_variable(*bare):
            raise ValueError(
                f"{where}: saved variable {i} ('{entry['name']}') is a moment "
                f"{'quantized' if saved_quantized else 'in float32'} but this optimizer keeps "
                f"it {'quantized' if own_quantized else 'in float32'} ('{mine['name']}'). Was "
                "it saved with other options (quantize_embeddings)?"
            )
        if not _same_variable(entry["name"], mine["name"]) or entry["shape"] != mine["shape"]:
            raise ValueError(
                f"{where}: saved variable {i} is '{entry['name']}' of shape "
                f"{tuple(entry['shape'])} but this optimizer's is '{mine['name']}' of shape "
                f"{tuple(mine['shape'])}: the model changed since the state was saved."
            )
        if list(array.shape) != mine["shape"] or entry["dtype"] != mine["dtype"]:
            raise ValueError(
                f"{where}: saved variable {i} ('{entry['name']}') holds an array of shape "
                f"{array.shape} and dtype {entry['dtype']}, expected {tuple(mine['shape'])} "
                f"and {mine['dtype']}."
            )


# -- moments, read and moved --------------------------------------------------------


def moment_slots(optimizer: Any, index: int) -> list:
    """`[m, v]`, and with AMSGrad `[m, v, v_hat]`, of model variable `index`.

    For `keras_adam.Adam` and `keras.optimizers.Adam` alike (their slot lists
    have the same names).
    """
    slots = [optimizer._momentums[index], optimizer._velocities[index]]
    if getattr(optimizer, "amsgrad", False):
        slots.append(optimizer._velocity_hats[index])
    return slots


def _read(slot: Any) -> np.ndarray:
    if isinstance(slot, QuantizedMoment):
        return slot.numpy()
    return np.asarray(ops.convert_to_numpy(slot))


def read_moments(optimizer: Any, variable: Any) -> dict[str, np.ndarray]:
    """The moments of one model variable, decoded: "momentum", "velocity" (and "velocity_hat").

    Args:
        optimizer: A built `keras_adam.Adam` or `keras.optimizers.Adam`.
        variable: One of the model variables it updates.

    Returns:
        NumPy arrays of the variable's shape (float32 for quantized moments).
    """
    slots = moment_slots(optimizer, optimizer._get_variable_index(variable))
    return {name: _read(slot) for name, slot in zip(_MOMENT_NAMES, slots, strict=False)}


def transfer_state(source: Any, target: Any) -> None:
    """Move Adam's state from `source` to `target`, quantizing or dequantizing.

    Either optimizer may be a `keras.optimizers.Adam` or a `keras_adam.Adam`
    of any `moment_dtype`: float32 state goes into int8 or int4 state
    (encoded), and back (decoded), and between float dtypes (cast). The
    step counter moves too; each optimizer keeps its own hyperparameters.
    Everything is checked before anything is written: on an error `target`
    is unchanged.

    Example:
        >>> # model trained with keras.optimizers.Adam; continue in 8 bits:
        >>> quantized = keras_adam.Adam(moment_dtype="int8")
        >>> keras_adam.transfer_state(model.optimizer, quantized)  # doctest: +SKIP
        >>> model.compile(optimizer=quantized, loss="mse")  # doctest: +SKIP

    Args:
        source: A built Adam.
        target: An Adam; if it is not built, it is built on `source`'s
            variables.

    Raises:
        ValueError: if `source` is not built, the two update different
            numbers or shapes of variables, or only one has AMSGrad.
    """
    for name, optimizer in (("source", source), ("target", target)):
        if not hasattr(optimizer, "_momentums") and optimizer.built:
            raise ValueError(
                f"Argument `{name}` must be a keras.optimizers.Adam or a keras_adam.Adam. "
                f"Received: {name}={optimizer!r}"
            )
    if not source.built:
        raise ValueError(
            "Argument `source` must be built (it has no state before its first step "
            f"or `build`). Received: source={source.name!r}, not built"
        )
    variables = list(source._trainable_variables)
    if not target.built:
        target.build(variables)
    own = list(target._trainable_variables)
    if len(own) != len(variables):
        raise ValueError(
            f"Cannot transfer state from '{source.name}' to '{target.name}': the source "
            f"updates {len(variables)} variables, the target {len(own)}."
        )
    for a, b in zip(variables, own, strict=True):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"Cannot transfer state from '{source.name}' to '{target.name}': "
                f"'{a.path}' has shape {tuple(a.shape)} but '{b.path}' has {tuple(b.shape)}."
            )
    if bool(getattr(source, "amsgrad", False)) != bool(getattr(target, "amsgrad", False)):
        raise ValueError(
            f"Cannot transfer state from '{source.name}' to '{target.name}': one has "
            f"amsgrad=True and the other not (source amsgrad={source.amsgrad!r}, target "
            f"amsgrad={target.amsgrad!r}); AMSGrad's running maximum would be made up."
        )
    values = []
    for index in range(len(variables)):
        slots = moment_slots(source, index)
        values.append([None if slot is None else _read(slot) for slot in slots])
    for index, moments in enumerate(values):
        for slot, value in zip(moment_slots(target, index), moments, strict=True):
            if slot is None or value is None:
                continue
            if isinstance(slot, QuantizedMoment):
                slot.assign(ops.convert_to_tensor(value, "float32"))
            else:
                slot.assign(ops.cast(ops.convert_to_tensor(value), slot.dtype))
    steps = ops.convert_to_numpy(source.iterations)
    target.iterations.assign(ops.cast(steps, target.iterations.dtype))
