"""How a step of `keras_adam.Adam` runs on each Keras backend.

`keras_adam.update_rule` is the math; `keras_adam.adam` is Keras's plumbing
(arguments, state, serialization). What differs between backends, how a step
is *executed*, lives here, one module per backend:

- `keras_adam.backends.tensorflow`: our multi-tensor and sparse-rows
  kernels (`keras_adam.kernels`), sparse `tf.IndexedSlices` gradients,
  `tf.distribute`.
- `keras_adam.backends.jax`: the `keras.ops` step, which XLA compiles and
  fuses; skipping non-finite steps without control flow over state.
- `keras_adam.backends.torch`: PyTorch's fused Adam kernels
  (`torch._fused_adam_`, `torch._fused_adamw_`), grouped by device and dtype.

`engine(optimizer)` picks one from `keras.backend.backend()`, once per
optimizer. `keras_adam.backends.engine.Engine` is what they share.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_adam.backends.engine import Engine


def engine(optimizer: Any) -> Engine:
    """The execution engine of `optimizer` for the current Keras backend.

    Args:
        optimizer: The `keras_adam.Adam` it will run.

    Returns:
        The backend's engine (the generic `keras.ops` engine for a backend
        without a module of its own).
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_adam.backends.tensorflow import TensorFlowEngine

        return TensorFlowEngine(optimizer)
    if name == "jax":
        from keras_adam.backends.jax import JaxEngine

        return JaxEngine(optimizer)
    if name == "torch":
        from keras_adam.backends.torch import TorchEngine

        return TorchEngine(optimizer)
    return Engine(optimizer)


__all__ = ["Engine", "engine"]
