"""The Adam kernels: two TensorFlow CPU ops in one library built at first use.

- `KerasAdamMultiTensorApplyAdam` (`multi_tensor_adam.cc`): the dense fused
  step of all float32 (or float64) variables of a step in one call.
- `KerasAdamSparseApplyAdam` (`sparse_rows_adam.cc`): the lazy sparse step
  (`Adam(lazy_sparse=True)`) of one variable, on the rows a `tf.IndexedSlices`
  gradient touches only, repeated indices summed first.

Both include `adam_step.h`, the elementwise step they share. The two sources
are compiled with the machine's C++ compiler into one shared library the
first time a step needs either op, into a per-user cache directory
(`$KERAS_ADAM_CACHE_DIR`, else `$XDG_CACHE_HOME/keras_adam`, else
`~/.cache/keras_adam`). The library's name is a hash of everything that makes
it differ: the sources and the header, the TensorFlow version and build
flags, the compiler and its version, and the flags. Concurrent processes
(pytest-xdist workers) take a file lock, so one compiles and the others wait
and load; the library is written under a temporary name and renamed into
place.

Anything that fails (no compiler, a compile error, a library TensorFlow
refuses to load, a library without both ops) is logged once and `load()`
returns None: callers then use `tf.raw_ops.ResourceApplyAdam` per variable
for dense gradients and `keras.ops` gathers and scatters for lazy sparse
rows, so correctness never depends on these kernels. `KERAS_ADAM_KERNEL=0`
disables both.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

#: Name of the multi-tensor op, as it appears in traced graphs.
OP_NAME = "KerasAdamMultiTensorApplyAdam"
#: Name of the sparse-rows op, as it appears in traced graphs.
SPARSE_OP_NAME = "KerasAdamSparseApplyAdam"
#: Set to "0" (or "false", "no", "off") to disable the kernels.
ENV_SWITCH = "KERAS_ADAM_KERNEL"

_HERE = Path(__file__).parent
#: The sources compiled together into the one library.
SOURCES = (_HERE / "multi_tensor_adam.cc", _HERE / "sparse_rows_adam.cc")
#: Headers the sources include (part of the cache key).
HEADERS = (_HERE / "adam_step.h",)
#: The Python wrappers `tf.load_op_library` generates for the two ops.
_WRAPPERS = {
    OP_NAME: "keras_adam_multi_tensor_apply_adam",
    SPARSE_OP_NAME: "keras_adam_sparse_apply_adam",
}
# No -march: the library may be cached on a shared home directory. The
# elementwise loop is cloned for AVX-512/AVX2/baseline and picked at load time.
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off", "-w")
COMPILE_TIMEOUT = 600

_logger = logging.getLogger("keras_adam")
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "module" once tried; "error" if it failed


def enabled() -> bool:
    """Whether `KERAS_ADAM_KERNEL` allows the kernel (read at every call)."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def load() -> Any | None:
    """The loaded op library, or None where it is disabled or unavailable.

    Builds it on first call if the cache does not hold it yet; the result
    (library or failure) is kept for the life of the process.
    """
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = None
            try:
                _state["module"] = _build_and_load()
            except Exception as error:  # noqa: BLE001 - any failure means: fall back
                _state["error"] = error
                _logger.warning(
                    "keras_adam: the Adam kernels are unavailable (%s); using "
                    "ResourceApplyAdam per variable and keras.ops for lazy sparse rows. "
                    "Set %s=0 to silence this.",
                    error,
                    ENV_SWITCH,
                )
        return _state["module"]


def reset() -> None:
    """Forget the result of `load()` (for tests)."""
    with _lock:
        _state.clear()


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    if os.environ.get("KERAS_ADAM_CACHE_DIR"):
        return Path(os.environ["KERAS_ADAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keras_adam"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise RuntimeError("no C++ compiler found (set CXX)")


def _command(compiler: str, output: str) -> list[str]:
    import tensorflow as tf

    return [
        compiler,
        *FLAGS,
        *(str(source) for source in SOURCES),
        "-o",
        output,
        *tf.sysconfig.get_compile_flags(),
        *tf.sysconfig.get_link_flags(),
    ]


def _library_path(compiler: str) -> Path:
    import tensorflow as tf

    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False, timeout=60
    ).stdout
    key = hashlib.sha256()
    for part in (
        *(path.read_bytes() for path in SOURCES + HEADERS),
        tf.__version__,
        getattr(tf, "__git_version__", ""),
        tf.sysconfig.get_lib(),
        " ".join(_command(compiler, "")),
        version,
        platform.machine(),
        platform.system(),
    ):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return cache_dir() / f"keras_adam_kernels-{key.hexdigest()[:20]}.so"


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(compiler: str, library: Path) -> None:
    descriptor, temporary = tempfile.mkstemp(
        prefix=library.stem + ".", suffix=".tmp", dir=library.parent
    )
    os.close(descriptor)
    try:
        _logger.info("keras_adam: compiling the Adam kernels into %s", library)
        result = subprocess.run(
            _command(compiler, temporary),
            capture_output=True,
            text=True,
            check=False,
            timeout=COMPILE_TIMEOUT,
        )
        if result.returncode != 0:
            names = ", ".join(source.name for source in SOURCES)
            raise RuntimeError(f"compiling {names} failed: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, library)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _build_and_load() -> Any:
    import tensorflow as tf

    compiler = _compiler()
    library = _library_path(compiler)
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(library.with_suffix(".lock")):
            if not library.exists():
                _compile(compiler, library)
    module = tf.load_op_library(str(library))
    missing = [op for op, wrapper in _WRAPPERS.items() if not hasattr(module, wrapper)]
    if missing:
        raise RuntimeError(f"{library} does not define {', '.join(missing)}")
    return module
