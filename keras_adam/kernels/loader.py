"""Loading the kernels' library: once per process, or not at all.

`load()` asks `builder.find_or_compile()` for the library (which compiles it
unless the cache holds it), loads it with `tf.load_op_library`, checks that
it defines every op, and keeps the result (module or failure) for the life
of the process. `KERAS_ADAM_KERNEL=0` disables the ops: `load()` then
returns None without building anything.

Anything that fails (no compiler and no library built ahead, a compile
error, a library TensorFlow refuses to load, a library without every op) is
logged once and `load()` returns None: callers then use the `keras.ops`
step (Keras's own arithmetic, which XLA fuses), so correctness never
depends on these kernels. `build()`, behind `python -m keras_adam.kernels
build`, raises instead.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keras_adam.kernels import builder

#: Name of the multi-tensor op, as it appears in traced graphs.
OP_NAME = "KerasAdamMultiTensorApplyAdam"
#: Name of the sparse-rows op, as it appears in traced graphs.
SPARSE_OP_NAME = "KerasAdamSparseApplyAdam"
#: Name of the quantized-moments op of one variable (functional; tf.distribute).
QUANTIZED_OP_NAME = "KerasAdamQuantizedAdam"
#: Name of the quantized-moments op of many variables (in place, without a strategy).
QUANTIZED_MULTI_TENSOR_OP_NAME = "KerasAdamMultiTensorQuantizedAdam"
#: Set to "0" (or "false", "no", "off") to disable the kernels.
ENV_SWITCH = "KERAS_ADAM_KERNEL"

#: The Python wrappers `tf.load_op_library` generates for the ops.
_WRAPPERS = {
    OP_NAME: "keras_adam_multi_tensor_apply_adam",
    SPARSE_OP_NAME: "keras_adam_sparse_apply_adam",
    QUANTIZED_OP_NAME: "keras_adam_quantized_adam",
    QUANTIZED_MULTI_TENSOR_OP_NAME: "keras_adam_multi_tensor_quantized_adam",
}

_logger = logging.getLogger("keras_adam")
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "module" once tried; "library" if loaded; "error" if failed


def enabled() -> bool:
    """Whether `KERAS_ADAM_KERNEL` allows the kernel (read at every call)."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def load() -> Any | None:
    """The loaded op library, or None where it is disabled or unavailable.

    Builds it on first call if the cache does not hold it yet; the result
    (library or failure) is kept for the life of the process.
    """

    def build() -> Any:
        module, _state["library"] = _build_and_load()
        return module

    return load_once(
        _state,
        _lock,
        "module",
        build,
        "keras_adam: the Adam kernels are unavailable (%s); using the keras.ops step "
        f"instead (Keras's speed). Set {ENV_SWITCH}=0 to silence this.",
    )


def load_once(
    state: dict[str, Any],
    lock: threading.Lock,
    key: str,
    build: Callable[[], Any],
    unavailable: str,
) -> Any | None:
    """`build()`'s result, built on the first call and kept in `state[key]`.

    Shared by the kernels' loaders (this module's `load`, `quantized.load`,
    `quantized_xla.available`): None where `KERAS_ADAM_KERNEL` disables the
    kernels, or if `build` raised, which is logged once (`unavailable`, with
    one `%s` for the error) and kept in `state["error"]`.
    """
    if not enabled():
        return None
    with lock:
        if key not in state:
            state[key] = None
            try:
                state[key] = build()
            except Exception as error:  # noqa: BLE001 - any failure means: fall back
                state["error"] = error
                _logger.warning(unavailable, error)
        return state[key]


def reset() -> None:
    """Forget the result of `load()` (for tests)."""
    with _lock:
        _state.clear()


def _build_and_load() -> tuple[Any, Path]:
    import tensorflow as tf

    library = builder.find_or_compile()
    module = tf.load_op_library(str(library))
    missing = [op for op, wrapper in _WRAPPERS.items() if not hasattr(module, wrapper)]
    if missing:
        raise RuntimeError(f"{library} does not define {', '.join(missing)}")
    return module, library


def build() -> Path:
    """Build the library now unless the cache holds it; load it; return its path.

    What `python -m keras_adam.kernels build` runs: for Docker images and CI,
    so that the first training step does not wait for the compiler. It
    builds even where `KERAS_ADAM_KERNEL=0` disables the kernels' use.

    Returns:
        The path of the library in `cache_dir()`.

    Raises:
        RuntimeError: If it cannot be built or loaded (no compiler and no
            library built ahead, a compile error, a library without both
            ops).
    """
    with _lock:
        if _state.get("module") is None:
            _state["module"], _state["library"] = _build_and_load()
            _state.pop("error", None)
        return _state["library"]


def library_path() -> Path | None:
    """The path of the library `load()` loaded, or None if it loaded none."""
    with _lock:
        return _state.get("library") if _state.get("module") is not None else None
