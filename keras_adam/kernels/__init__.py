"""The multi-tensor Adam kernel: a TensorFlow CPU op built at first use.

`multi_tensor_adam.cc` is compiled with the machine's C++ compiler the first
time a step needs it, into a per-user cache directory
(`$KERAS_ADAM_CACHE_DIR`, else `$XDG_CACHE_HOME/keras_adam`, else
`~/.cache/keras_adam`). The library's name is a hash of everything that makes
it differ: the source, the TensorFlow version and build flags, the compiler
and its version, and the flags. Concurrent processes (pytest-xdist workers)
take a file lock, so one compiles and the others wait and load; the library
is written under a temporary name and renamed into place.

Anything that fails (no compiler, a compile error, a library TensorFlow
refuses to load) is logged once and `load()` returns None: callers then use
`tf.raw_ops.ResourceApplyAdam` per variable, so correctness never depends on
this kernel. `KERAS_ADAM_KERNEL=0` disables it.
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

#: Name of the op, as it appears in traced graphs.
OP_NAME = "KerasAdamMultiTensorApplyAdam"
#: Set to "0" (or "false", "no", "off") to disable the kernel.
ENV_SWITCH = "KERAS_ADAM_KERNEL"

SOURCE = Path(__file__).with_name("multi_tensor_adam.cc")
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
                    "keras_adam: the multi-tensor Adam kernel is unavailable (%s); "
                    "using ResourceApplyAdam per variable. Set %s=0 to silence this.",
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
        str(SOURCE),
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
        SOURCE.read_bytes(),
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
    return cache_dir() / f"multi_tensor_adam-{key.hexdigest()[:20]}.so"


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
        _logger.info("keras_adam: compiling the multi-tensor Adam kernel into %s", library)
        result = subprocess.run(
            _command(compiler, temporary),
            capture_output=True,
            text=True,
            check=False,
            timeout=COMPILE_TIMEOUT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {result.stderr.strip()[-2000:]}")
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
    if not hasattr(module, "keras_adam_multi_tensor_apply_adam"):
        raise RuntimeError(f"{library} does not define {OP_NAME}")
    return module
