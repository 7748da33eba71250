"""The quantized Adam kernel as an XLA custom call, for the JAX engine.

`quantized_adam_xla.cc` wraps the same step as the ctypes library
(`quantized_adam.h`: decode, float32 Adam, encode, one pass per block) in
XLA's FFI. This module builds it with the machine's C++ compiler against
the headers jaxlib ships (`jax.ffi.include_dir()`), into the kernels'
cache (`quantized.find_or_compile`), registers it with JAX, and calls it
with `jax.ffi.ffi_call`: inside `jax.jit` it is one node of the program,
whose results alias the variable's, codes' and scales' buffers.

`available()` is False (logged once) where the library cannot be built or
loaded, or `KERAS_ADAM_KERNEL=0`: the engine then runs the `keras.ops`
step, which gives the same numbers to round-off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keras_adam.kernels import loader, quantized
from keras_adam.quantization import QuantizedMoment

SOURCE = quantized._HERE / "quantized_adam_xla.cc"
TARGET = "keras_adam_quantized_adam"

#: Bits of the call's `flags` attribute.
MAXIMIZE, L2, DECOUPLED, AMSGRAD, PAPER = 1, 2, 4, 8, 16

_logger = logging.getLogger("keras_adam")
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _flags() -> tuple[str, ...]:
    return (*quantized.FLAGS, "-std=c++17", "-I", jax.ffi.include_dir())


def available() -> bool:
    """Whether the custom call is registered (built and loaded on first use)."""
    if not loader.enabled():
        return False
    with _lock:
        if "registered" not in _state:
            _state["registered"] = False
            try:
                path = quantized.find_or_compile(SOURCE, _flags(), "keras_adam_quantized_xla")
                library = ctypes.CDLL(str(path))
                jax.ffi.register_ffi_target(
                    TARGET, jax.ffi.pycapsule(library.KerasAdamQuantizedAdamXla), platform="cpu"
                )
                _state["library"] = library
                _state["registered"] = True
            except Exception as error:  # noqa: BLE001 - any failure means: fall back
                _state["error"] = error
                _logger.warning(
                    "keras_adam: the quantized Adam XLA kernel is unavailable (%s); using the "
                    "keras.ops step for quantized moments instead.",
                    error,
                )
        return _state["registered"]


def threads() -> int:
    """The threads a call splits its blocks over: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def step(
    param: Any,
    grad: Any,
    moments: list[QuantizedMoment],
    scalars: Any,
    flags: int,
) -> tuple[Any, list[tuple[Any, Any]]]:
    """One Adam step of one float32 variable with quantized moments.

    Args:
        param: The variable's value.
        grad: Its dense gradient.
        moments: m, v and with AMSGrad v̂.
        scalars: The 7 float32 scalars (`engine.quantized_kernel_scalars`).
        flags: `MAXIMIZE | L2 | DECOUPLED | AMSGRAD | PAPER`, those that apply.

    Returns:
        The new value and each moment's new `(codes, scales)`.
    """
    m, v = moments[0], moments[1]
    stored = []
    for moment in moments:
        stored += [moment.codes.value, moment.scales.value]
    if len(moments) == 2:
        stored += [jnp.zeros((0,), jnp.uint8), jnp.zeros((0,), jnp.float32)]
    m_lookup, v_lookup = m.fmt.lookup, v.fmt.lookup
    results = [jax.ShapeDtypeStruct(param.shape, jnp.float32)]
    results += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in stored]
    call = jax.ffi.ffi_call(
        TARGET,
        results,
        input_output_aliases={0: 0, **{2 + k: 1 + k for k in range(6)}},
    )
    outputs = call(
        jnp.asarray(param, jnp.float32),
        jnp.asarray(grad, jnp.float32),
        *stored,
        *(
            jnp.asarray(lookup[name])
            for lookup in (m_lookup, v_lookup)
            for name in ("table", "magnitude_mid", "lut")
        ),  # fmt: skip
        jnp.asarray(scalars, jnp.float32),
        bits=np.int32(m.fmt.bits),
        block=np.int32(m.fmt.block_size),
        m_zero=np.int32(m_lookup["zero"]),
        lut_shift=np.int32(m_lookup["lut_shift"]),
        lut_base=np.int32(m_lookup["lut_base"]),
        flags=np.int32(flags),
        threads=np.int32(threads()),
    )
    pairs = [(outputs[1 + 2 * k], outputs[2 + 2 * k]) for k in range(len(moments))]
    return outputs[0], pairs
