"""How a step of `keras_adam.Adam` runs on each Keras backend.

`keras_adam.update_rule` is the math; `keras_adam.adam` is Keras's plumbing
(arguments, moments, state). How a step is *executed* lives here: the
`Engine` (`keras_adam.backends.engine`) declares every hook and runs the
reference path; one module per backend overrides what it runs differently:

- `keras_adam.backends.tensorflow`: our multi-tensor and sparse-rows
  kernels (`keras_adam.kernels`), `tf.IndexedSlices` gradients,
  `tf.distribute`.
- `keras_adam.backends.jax`: the reference path, compiled by XLA, eagerly
  too; sparse `BCOO` gradients.
- `keras_adam.backends.torch`: torch's fused Adam kernels.

`engine()` picks one from `keras.backend.backend()`, once per optimizer.
"""

from __future__ import annotations

import keras

from keras_adam.backends.engine import Engine


def engine() -> Engine:
    """The execution engine for the current Keras backend.

    Returns:
        The backend's engine (the generic one for a backend without a
        module of its own).
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_adam.backends.tensorflow import TensorFlowEngine

        return TensorFlowEngine()
    if name == "jax":
        from keras_adam.backends.jax import JaxEngine

        return JaxEngine()
    if name == "torch":
        from keras_adam.backends.torch import TorchEngine

        return TorchEngine()
    return Engine()


__all__ = ["Engine", "engine"]
