"""The quantized Adam kernel as an XLA custom call, for the JAX engine.

`quantized_adam_xla.cc` wraps the same step as the ctypes library
(`quantized_adam.h`: decode, float32 Adam, encode, one pass per block) in
XLA's FFI. This module builds it with the machine's C++ compiler against
the headers jaxlib ships (`jax.ffi.include_dir()`), into the kernels'
cache (`quantized.find_or_compile`), registers it with JAX, and calls it
with `jax.ffi.ffi_call`: inside `jax.jit` it is one node of the program,
whose results alias the variable's and its moments' buffers.

`available()` is False (logged once) where the library cannot be built or
loaded, or `KERAS_ADAM_KERNEL=0`: the engine then runs the `keras.ops`
step, which gives the same numbers to round-off.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keras_adam.kernels import loader, quantized
from keras_adam.quantization import QuantizedMoment

SOURCE = quantized._HERE / "quantized_adam_xla.cc"
TARGET = "keras_adam_quantized_adam"

FLAG_BITS = quantized.FLAG_BITS
VARIABLES_PER_CALL = quantized.VARIABLES_PER_CALL

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _flags() -> tuple[str, ...]:
    return (*quantized.FLAGS, "-std=c++17", "-I", jax.ffi.include_dir())


def available() -> bool:
    """Whether the custom call is registered (built and loaded on first use)."""
    return (
        loader.load_once(
            _state,
            _lock,
            "library",
            _build_and_register,
            "keras_adam: the quantized Adam XLA kernel is unavailable (%s); using the "
            "keras.ops step for quantized moments instead.",
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
        AttributeError: If it lacks the handler.
    """
    path = quantized.find_or_compile(SOURCE, _flags(), "keras_adam_quantized_xla")
    ctypes.CDLL(str(path)).KerasAdamQuantizedAdamXla  # noqa: B018 - it must resolve
    return path


def _build_and_register() -> ctypes.CDLL:
    library = ctypes.CDLL(str(build()))
    jax.ffi.register_ffi_target(
        TARGET, jax.ffi.pycapsule(library.KerasAdamQuantizedAdamXla), platform="cpu"
    )
    return library


threads = quantized.threads


def step(
    params: list[Any],
    grads: list[Any],
    moments: list[list[QuantizedMoment]],
    scalars: Any,
    flags: dict[str, bool],
) -> list[tuple[Any, list[Any]]]:
    """One Adam step of float32 variables with quantized moments.

    One custom call per `VARIABLES_PER_CALL` variables. The variables share
    their hyperparameters (`scalars`, `flags`) and moment format; a call
    splits their blocks over `threads()`.

    Args:
        params: The variables' values.
        grads: Their dense gradients.
        moments: Each variable's m, v and with AMSGrad v̂.
        scalars: The 7 float32 scalars (`engine.quantized_kernel_scalars`).
        flags: Which of `FLAG_BITS` apply (`engine.quantized_kernel_flags`).

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
    """`step` of at most `VARIABLES_PER_CALL` variables: one custom call."""
    m, v = moments[0][0], moments[0][1]
    m_lookup, v_lookup = m.fmt.lookup, v.fmt.lookup
    inputs, results, aliases = [], [], {}
    fixed = 7  # the lookups and the scalars come first
    for param, grad, slots in zip(params, grads, moments, strict=True):
        stored = quantized.stored_moments(slots, jnp.zeros((0,), jnp.uint8))
        first_input, first_result = fixed + len(inputs), len(results)
        inputs += [jnp.asarray(param, jnp.float32), jnp.asarray(grad, jnp.float32), *stored]
        results += [jax.ShapeDtypeStruct(param.shape, jnp.float32)]
        results += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in stored]
        # The variable, then its moments (after the gradient).
        aliases[first_input] = first_result
        aliases.update({first_input + 2 + k: first_result + 1 + k for k in range(3)})
    call = jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases)
    outputs = call(
        *(
            jnp.asarray(lookup[name])
            for lookup in (m_lookup, v_lookup)
            for name in ("table", "magnitude_mid", "lut")
        ),  # fmt: skip
        jnp.asarray(scalars, jnp.float32),
        *inputs,
        bits=np.int32(m.fmt.bits),
        block=np.int32(m.fmt.block_size),
        m_zero=np.int32(m_lookup["zero"]),
        lut_shift=np.int32(m_lookup["lut_shift"]),
        m_lut_base=np.int32(m_lookup["lut_base"]),
        v_lut_base=np.int32(v_lookup["lut_base"]),
        flags=np.int32(quantized.flag_bits(flags)),
        threads=np.int32(threads()),
    )
    return quantized.results_per_variable(outputs, moments)
