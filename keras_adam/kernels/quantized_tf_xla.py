"""The quantized Adam kernel as an XLA custom call, for TensorFlow under XLA.

Under `tf.function(jit_compile=True)` (Keras's `jit_compile=True` on the
TensorFlow backend) a TensorFlow op without an XLA kernel cannot run, ours
included, so the step used to fall back to the `keras.ops` step, which XLA
does not fuse into one pass (1.8× the float32 step for int8, 4.2× for
int4). `quantized_adam_tf_xla.cc` wraps the same step as the other paths
(`quantized_adam.h`) in the custom-call API that TensorFlow's
`XlaCustomCallV2` op emits, and registers it with TensorFlow's XLA when it
loads. This module builds it with the machine's C++ compiler against the
headers and the `libtensorflow_cc` that TensorFlow ships, into the
kernels' cache (`quantized.find_or_compile`), loads it, and emits the call.

That API passes no shapes and no aliasing, so `step` checks the shapes
here and the call copies each variable and its moments into its results
before stepping them: one more pass over them than the in-place
kernels, still one pass over the moments.

`available()` is False (logged once) where the library cannot be built or
loaded, or `KERAS_ADAM_KERNEL=0`: the engine then runs the `keras.ops`
step, which gives the same numbers to round-off.
"""

from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path
from typing import Any

import tensorflow as tf

from keras_adam.kernels import loader, quantized
from keras_adam.quantization import QuantizedMoment

SOURCE = quantized._HERE / "quantized_adam_tf_xla.cc"
TARGET = "keras_adam_quantized_adam"

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _flags() -> tuple[str, ...]:
    """The compile flags: TensorFlow's headers and ABI, and its libtensorflow_cc.

    `--no-as-needed` keeps the link to libtensorflow_cc (which holds XLA's
    registry of custom-call targets) though it comes before the source.
    TensorFlow's version is a define, so that it keys the cache: the
    library links against that version's libtensorflow_cc.
    """
    library = tf.sysconfig.get_lib()
    abi = [f for f in tf.sysconfig.get_compile_flags() if f.startswith("-D_GLIBCXX_USE_CXX11_ABI")]
    return (
        *quantized.FLAGS, "-std=c++17", "-I", tf.sysconfig.get_include(), *abi,
        f"-DKERAS_ADAM_TENSORFLOW_VERSION={tf.__version__}",
        "-Wl,--no-as-needed", f"-L{library}", "-l:libtensorflow_cc.so.2",
        f"-Wl,-rpath,{library}",
    )  # fmt: skip


def available() -> bool:
    """Whether the custom call is registered (built and loaded on first use)."""
    return (
        loader.load_once(
            _state,
            _lock,
            "library",
            _load,
            "keras_adam: the quantized Adam kernel for TensorFlow's XLA is unavailable (%s); "
            "using the keras.ops step for quantized moments under XLA instead.",
        )
        is not None
    )


def build() -> Path:
    """Build the library unless the cache holds it (`python -m keras_adam.kernels build`).

    Returns:
        Its path in the kernels' cache.

    Raises:
        RuntimeError: If there is no compiler or the compile fails.
        OSError: If the library does not load.
        AttributeError: If it lacks the target.
    """
    path = quantized.find_or_compile(SOURCE, _flags(), "keras_adam_quantized_tf_xla")
    library = ctypes.CDLL(str(path))
    library.KerasAdamQuantizedAdamTfXla  # noqa: B018 - it must resolve
    library.keras_adam_quantized_tf_xla_register  # noqa: B018 - as must this
    return path


def _load() -> ctypes.CDLL:
    """Load the library and register its target with TensorFlow's XLA (once a process)."""
    library = ctypes.CDLL(str(build()))
    library.keras_adam_quantized_tf_xla_register()
    return library


def step(
    params: list[Any],
    grads: list[Any],
    moments: list[list[QuantizedMoment]],
    scalars: Any,
    flags: dict[str, bool],
) -> list[tuple[Any, list[Any]]]:
    """One Adam step of float32 variables with quantized moments, under XLA.

    One custom call per `quantized.VARIABLES_PER_CALL` variables, in a graph
    that XLA compiles. The variables share their hyperparameters (`scalars`,
    `flags`) and moment format; a call splits their blocks over threads.

    Args:
        params: The variables' values (float32 tensors).
        grads: Their dense gradients.
        moments: Each variable's m, v and with AMSGrad v̂.
        scalars: The 7 float32 scalars (`engine.quantized_kernel_scalars`).
        flags: Which of `quantized.FLAG_BITS` apply (`engine.quantized_kernel_flags`).

    Returns:
        Each variable's new value and its moments' new stored buffers.
    """
    return quantized.in_calls(_call, params, grads, moments, scalars, flags)


def _call(
    params: list[Any],
    grads: list[Any],
    moments: list[list[QuantizedMoment]],
    scalars: Any,
    flags: dict[str, bool],
) -> list[tuple[Any, list[Any]]]:
    """`step` of at most `quantized.VARIABLES_PER_CALL` variables: one custom call."""
    from tensorflow.compiler.tf2xla.ops import gen_xla_ops

    m_fmt, v_fmt = moments[0][0].fmt, moments[0][1].fmt
    m_lookup, v_lookup = m_fmt.lookup, v_fmt.lookup
    operands = [
        tf.constant(lookup[name])
        for lookup in (m_lookup, v_lookup)
        for name in ("table", "magnitude_mid", "lut")
    ]
    operands.append(tf.reshape(tf.cast(scalars, tf.float32), [7]))
    dtypes, shapes, sizes = [], [], []
    for param, grad, slots in zip(params, grads, moments, strict=True):
        size = math.prod(param.shape)
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(
                f"A gradient of shape {tuple(grad.shape)} does not fit a variable of shape "
                f"{tuple(param.shape)}."
            )
        for moment in slots:
            if moment.fmt.bits != m_fmt.bits or tuple(moment.shape) != tuple(param.shape):
                raise ValueError(
                    f"A moment of shape {moment.shape} and {moment.fmt.bits} bits does not fit "
                    f"a variable of shape {param.shape} with {m_fmt.bits}-bit moments."
                )
        stored = quantized.stored_moments(slots, tf.zeros([0], tf.uint8))
        expected = [m_fmt.storage_bytes(size)] * len(slots) + [0] * (3 - len(slots))
        if [math.prod(x.shape) for x in stored] != expected:
            raise ValueError(
                f"The moments of a variable of shape {param.shape} hold "
                f"{[math.prod(x.shape) for x in stored]} bytes; expected {expected}."
            )
        operands += [tf.cast(param, tf.float32), tf.cast(grad, tf.float32), *stored]
        dtypes += [tf.float32] + [x.dtype for x in stored]
        shapes += [list(param.shape)] + [list(x.shape) for x in stored]
        sizes.append(size)
    config = [
        m_fmt.bits, m_fmt.block_size, m_lookup["zero"], m_lookup["lut_shift"],
        m_lookup["lut_base"], v_lookup["lut_base"],
        quantized.flag_bits(flags),
        quantized.threads(), m_lookup["lut"].size, v_lookup["lut"].size, len(sizes), *sizes,
    ]  # fmt: skip
    outputs = gen_xla_ops.xla_custom_call_v2(
        operands=operands,
        call_target_name=TARGET,
        backend_config=" ".join(str(int(x)) for x in config),
        has_side_effect=False,
        result_dtypes=dtypes,
        result_shapes=shapes,
    )
    return quantized.results_per_variable(outputs, moments)
