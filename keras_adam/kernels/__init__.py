"""The Adam kernels: three TensorFlow CPU ops in one library built at first use.

- `KerasAdamMultiTensorApplyAdam` (`multi_tensor_adam.cc`): the dense fused
  step of all float32 (or float64) variables of a step in one call.
- `KerasAdamSparseApplyAdam` (`sparse_rows_adam.cc`): the lazy sparse step
  (`Adam(lazy_sparse=True)`) of one variable, on the rows a `tf.IndexedSlices`
  gradient touches only, repeated indices summed first.
- `KerasAdamQuantizedAdam` (`quantized_adam.cc`): the step of one variable
  with quantized moments (`moment_dtype="int8"` or `"int4"`), one pass per
  block: `quantized_adam.h`, which `quantized_adam_c.cc` also builds, without
  TensorFlow, into a library for ctypes (`quantized`, the torch engine's).

The first two include `adam_step.h`, the elementwise step they share: Keras's
arithmetic, with the scalars (1 − β1, 1 − β2 and the bias-corrected step
size) passed in, computed as Keras computes them.

Two modules hold the Python side:

- `builder` builds the library: it finds a C++ compiler, compiles the
  sources with TensorFlow's flags into a per-user cache (`cache_dir()`), the
  library named by a hash of what changes the binary, one process at a time
  under a file lock; without a compiler it finds a library built ahead.
- `loader` loads it: `load()` has `builder` find or build the library, loads
  it once per process with `tf.load_op_library`, honours
  `KERAS_ADAM_KERNEL=0`, and on any failure logs once and returns None, so
  that callers take the `keras.ops` step; `build()` (what
  `python -m keras_adam.kernels build` runs) raises instead.

This package re-exports the names callers use. A test that patches one
patches it in the module that reads it (`builder` or `loader`), not here.
"""

from keras_adam.kernels.builder import COMPILE_TIMEOUT, FLAGS, HEADERS, SOURCES, cache_dir
from keras_adam.kernels.builder import _binary_key as _binary_key
from keras_adam.kernels.builder import _compiler as _compiler
from keras_adam.kernels.builder import _file_lock as _file_lock
from keras_adam.kernels.builder import _library_path as _library_path
from keras_adam.kernels.builder import _tensorflow_flags as _tensorflow_flags
from keras_adam.kernels.loader import _WRAPPERS as _WRAPPERS
from keras_adam.kernels.loader import (
    ENV_SWITCH,
    OP_NAME,
    QUANTIZED_MULTI_TENSOR_OP_NAME,
    QUANTIZED_OP_NAME,
    SPARSE_OP_NAME,
    build,
    enabled,
    library_path,
    load,
    reset,
)
from keras_adam.kernels.loader import _state as _state

__all__ = [
    "COMPILE_TIMEOUT",
    "ENV_SWITCH",
    "FLAGS",
    "HEADERS",
    "OP_NAME",
    "SOURCES",
    "QUANTIZED_MULTI_TENSOR_OP_NAME",
    "QUANTIZED_OP_NAME",
    "SPARSE_OP_NAME",
    "build",
    "cache_dir",
    "enabled",
    "library_path",
    "load",
    "reset",
]
