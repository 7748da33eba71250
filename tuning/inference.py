"""The loss and metrics that fit a model's output and its targets, or an error naming `loss`.

A fixed default loss would fit some models and silently not others: a
cross-entropy that expects probabilities, on a model that ends in logits
(as most do, the package's own examples included), scores every trial
meaninglessly and nothing says so. Therefore:

- with `loss=None`, the loss is inferred from the model's last layer and
  the targets (`infer_loss`): a final softmax or sigmoid gives
  probabilities, a linear last layer gives logits (`from_logits=True`);
  integer targets mean classification (sparse categorical cross-entropy,
  or binary cross-entropy for one output unit); one output unit and float
  targets mean regression (mean squared error). Anything else raises a
  `ValueError` that asks for `loss`;
- a given cross-entropy whose `from_logits` contradicts the model's last
  layer (probabilities expected from logits, or the reverse) is refused
  (`check_loss`);
- with `metrics=None`, accuracy is added for classification only.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

_CROSSENTROPIES = {
    "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
    "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
    "binary_crossentropy": keras.losses.BinaryCrossentropy,
}


def output_kind(model: keras.Model) -> tuple[str | None, int | None]:
    """What the model's single output is, read off its last layer.

    Returns:
        `(kind, units)`: kind is "softmax", "sigmoid", "linear" (logits or a
        regression output) or None when it cannot be told (several outputs,
        a custom last layer); units is the size of the output's last axis,
        or None.
    """
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if not outputs or len(outputs) != 1 or not model.layers:
        return None, None
    units = outputs[0].shape[-1]
    layer = model.layers[-1]
    if isinstance(layer, keras.layers.Softmax):
        return "softmax", units
    activation = getattr(layer, "activation", None)
    if activation is None or not isinstance(layer, keras.layers.Dense | keras.layers.Activation):
        return None, units
    name = getattr(activation, "__name__", "")
    return (name if name in ("softmax", "sigmoid", "linear") else None), units


def _targets(y: Any) -> np.ndarray | None:
    if isinstance(y, np.ndarray):
        return y
    if isinstance(y, list | tuple):
        try:
            return np.asarray(y)
        except ValueError:
            return None
    try:  # tensors of any backend
        return np.asarray(keras.ops.convert_to_numpy(y)) if y is not None else None
    except Exception:  # noqa: BLE001 - not a tensor: cannot infer
        return None


def infer_loss(model: keras.Model, y: Any) -> tuple[Any, list, str]:
    """The loss and metrics for a model and its targets.

    Args:
        model: The built (uncompiled) model.
        y: The training targets (an array), or None (a dataset).

    Returns:
        `(loss, metrics, task)`, task being "classification" or "regression".

    Raises:
        ValueError: naming `loss`, when the output or targets do not say.
    """
    kind, units = output_kind(model)
    targets = _targets(y)
    why = None
    if kind is None:
        why = (
            "the model's last layer is not a Dense/Activation/Softmax layer with a known activation"
        )
    elif targets is None:
        why = "the targets are not an array (a dataset or generator)"
    elif units is None:
        why = "the model's output size is unknown"
    if why is None:
        logits = kind == "linear"
        integer = targets.dtype.kind in "iub"
        squeezed = targets.reshape(len(targets), -1).shape[1] == 1 if targets.ndim else False
        if units == 1 and not integer and kind == "linear":
            return "mse", [], "regression"
        if units == 1 and (integer or kind == "sigmoid") and kind in ("linear", "sigmoid"):
            values = np.unique(targets)
            if np.all(np.isin(values, (0, 1))):
                metric = keras.metrics.BinaryAccuracy(threshold=0.0 if logits else 0.5)
                return (
                    keras.losses.BinaryCrossentropy(from_logits=logits),
                    [metric],
                    "classification",
                )
        if units > 1 and integer and squeezed and kind in ("linear", "softmax"):
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
            return loss, ["accuracy"], "classification"
        if units > 1 and not integer and targets.ndim == 2 and targets.shape[-1] == units:
            one_hot = np.all(np.isin(targets, (0, 1))) and np.all(targets.sum(axis=-1) == 1)
            if one_hot and kind in ("linear", "softmax"):
                loss = keras.losses.CategoricalCrossentropy(from_logits=logits)
                return loss, ["accuracy"], "classification"
            if not one_hot and kind == "linear":
                return "mse", [], "regression"
        why = (
            f"a {kind} output of {units} unit(s) does not match targets of dtype "
            f"{targets.dtype} and shape {targets.shape}"
        )
    raise ValueError(
        f"Argument `loss` is required: it cannot be inferred ({why}). Pass loss=..., e.g. "
        "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True) for logits and "
        'integer labels, or loss="mse" for regression.'
    )


def check_loss(model: keras.Model, loss: Any) -> None:
    """Refuse a cross-entropy whose `from_logits` contradicts the model's last layer.

    Raises:
        ValueError: naming `loss`, e.g. a probability loss on logits.
    """
    if isinstance(loss, str) and loss in _CROSSENTROPIES:
        name, from_logits = loss, False
    elif isinstance(loss, tuple(_CROSSENTROPIES.values())):
        name, from_logits = type(loss).__name__, bool(loss.get_config().get("from_logits"))
    else:
        return
    kind, _ = output_kind(model)
    if kind == "linear" and not from_logits:
        raise ValueError(
            f"Argument `loss` expects probabilities but the model outputs logits (its last "
            f"layer has no softmax or sigmoid): every trial would score meaninglessly. Pass "
            f"{_class_name(name)}(from_logits=True), or loss=None to infer it. "
            f"Received: loss={loss!r}"
        )
    if kind in ("softmax", "sigmoid") and from_logits:
        raise ValueError(
            f"Argument `loss` expects logits (from_logits=True) but the model ends in a "
            f"{kind}. Pass {_class_name(name)}(from_logits=False), or loss=None to infer it. "
            f"Received: loss={loss!r}"
        )


def _class_name(name: str) -> str:
    if name in _CROSSENTROPIES:
        return f"keras.losses.{_CROSSENTROPIES[name].__name__}"
    return f"keras.losses.{name}"
