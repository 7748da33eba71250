"""The Adam kernels: two TensorFlow CPU ops in one library built at first use.

- `KerasAdamMultiTensorApplyAdam` (`multi_tensor_adam.cc`): the dense fused
  step of all float32 (or float64) variables of a step in one call.
- `KerasAdamSparseApplyAdam` (`sparse_rows_adam.cc`): the lazy sparse step
  (`Adam(lazy_sparse=True)`) of one variable, on the rows a `tf.IndexedSlices`
  gradient touches only, repeated indices summed first.

Both include `adam_step.h`, the elementwise step they share: Keras's
arithmetic, with the scalars (1 − β1, 1 − β2 and the bias-corrected step
size) passed in, computed as Keras computes them.

The two sources are compiled with the machine's C++ compiler into one
shared library the first time a step needs either op (about 15 s, once:
a WARNING says so when it starts and how long it took when it ends), into
a per-user cache directory (`$KERAS_ADAM_CACHE_DIR`, else
`$XDG_CACHE_HOME/keras_adam`, else `~/.cache/keras_adam`). To build it
ahead, in a Docker image or a CI step:

    python -m keras_adam.kernels build    # or: keras-adam-kernels build

prints the library's path (exit status 0), or one line saying why it
cannot build (exit status 1).

The library's name is a hash of what changes the binary: the sources and
the header, the TensorFlow version and its compile and link flags (ABI
included) with its install path left out, our flags, the machine, and the
compiler's version. Virtual environments with the same TensorFlow share one
library. Where no compiler is found, a library built ahead for the same
sources and TensorFlow is loaded (whichever compiler built it): an image
can build in one stage and run without a compiler. Concurrent processes
(pytest-xdist workers) take a file lock, so one compiles and the others wait
and load; the library is written under a temporary name and renamed into
place.

Anything that fails (no compiler and no library built ahead, a compile
error, a library TensorFlow refuses to load, a library without both ops) is
logged once and `load()` returns None: callers then use the `keras.ops`
step (Keras's own arithmetic, which XLA fuses), so correctness never
depends on these kernels. `KERAS_ADAM_KERNEL=0` disables both.
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
import time
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
FLAGS = ("-O3", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-w")
COMPILE_TIMEOUT = 600
#: What the compile usually takes (g++ 12, one core of a 2-core x86-64 VM), for the log.
EXPECTED_COMPILE_SECONDS = 15

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
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = None
            try:
                _state["module"], _state["library"] = _build_and_load()
            except Exception as error:  # noqa: BLE001 - any failure means: fall back
                _state["error"] = error
                _logger.warning(
                    "keras_adam: the Adam kernels are unavailable (%s); using the "
                    "keras.ops step instead (Keras's speed). Set %s=0 to silence this.",
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


def _tensorflow_flags() -> list[str]:
    """TensorFlow's compile and link flags (include and library directories, ABI)."""
    import tensorflow as tf

    return [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def _commands(compiler: str, objects: list[str], output: str) -> list[list[str]]:
    """One compile command per source (into `objects`), then the link into `output`."""
    import tensorflow as tf

    compile_flags = tf.sysconfig.get_compile_flags()
    return [
        *(
            [compiler, *FLAGS, "-c", str(source), "-o", target, *compile_flags]
            for source, target in zip(SOURCES, objects, strict=True)
        ),
        [compiler, *FLAGS, "-shared", *objects, "-o", output, *tf.sysconfig.get_link_flags()],
    ]


def _binary_key() -> str:
    """A hash of what makes the library differ, the compiler aside.

    The sources and the header, the TensorFlow version, our flags and
    TensorFlow's flags with TensorFlow's install directory replaced by a
    placeholder (`-I<tensorflow>/include`, `-L<tensorflow>`: the library
    finds `libtensorflow_framework` already loaded by TensorFlow, so it does
    not depend on where TensorFlow is installed), and the machine. Paths of
    the sources and the compiler are left out too.
    """
    import tensorflow as tf

    install = tf.sysconfig.get_lib()
    flags = [flag.replace(install, "<tensorflow>") for flag in _tensorflow_flags()]
    key = hashlib.sha256()
    for part in (
        *(path.read_bytes() for path in SOURCES + HEADERS),
        tf.__version__,
        getattr(tf, "__git_version__", ""),
        " ".join(FLAGS),
        " ".join(flags),
        platform.machine(),
        platform.system(),
    ):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return key.hexdigest()[:20]


def _compiler_key(compiler: str) -> str:
    """A hash of the compiler's identity: its `--version` output, not its path."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False, timeout=60
    ).stdout
    return hashlib.sha256(version.encode()).hexdigest()[:8]


def _library_path(compiler: str) -> Path:
    """The cached library `compiler` builds for these sources and this TensorFlow."""
    return cache_dir() / f"keras_adam_kernels-{_binary_key()}-{_compiler_key(compiler)}.so"


def _prebuilt_library() -> Path | None:
    """A library built ahead for these sources and this TensorFlow, by any compiler."""
    candidates = sorted(
        cache_dir().glob(f"keras_adam_kernels-{_binary_key()}-*.so"),
        key=lambda path: path.stat().st_mtime,
    )
    return candidates[-1] if candidates else None


@contextlib.contextmanager
def _file_lock(path: Path, library: Path):
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _logger.warning(
                "keras_adam: waiting for another process to compile the Adam kernels into %s",
                library,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_all(commands: list[list[str]]) -> None:
    """Run `commands` at the same time; raise if any fails or overruns COMPILE_TIMEOUT."""
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    deadline = time.monotonic() + COMPILE_TIMEOUT
    try:
        for command, process in zip(commands, processes, strict=True):
            _, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            if process.returncode != 0:
                name = " ".join(Path(part).name for part in command if part.endswith(".cc"))
                what = name or "the library"
                raise RuntimeError(f"compiling {what} failed: {stderr.strip()[-2000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _compile(compiler: str, library: Path) -> None:
    """Compile the sources (each its own process: they parse TensorFlow's headers) and link."""
    _logger.warning(
        "keras_adam: compiling the Adam kernels once for this TensorFlow, about %d s, "
        "into %s (`python -m keras_adam.kernels build` does it ahead of time)",
        EXPECTED_COMPILE_SECONDS,
        library,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=library.stem + ".", dir=library.parent) as work:
        objects = [os.path.join(work, f"{source.stem}.o") for source in SOURCES]
        temporary = os.path.join(work, library.name)
        *compile_commands, link = _commands(compiler, objects, temporary)
        _run_all(compile_commands)
        _run_all([link])
        os.replace(temporary, library)
    _logger.warning("keras_adam: compiled the Adam kernels in %.1f s", time.perf_counter() - start)


def _find_or_compile() -> Path:
    """The library's path, compiled first unless the cache holds it."""
    try:
        compiler = _compiler()
    except RuntimeError as error:
        library = _prebuilt_library()
        if library is None:
            raise RuntimeError(
                f"{error}, and {cache_dir()} holds no library built ahead for this "
                "TensorFlow (`python -m keras_adam.kernels build`)"
            ) from None
        return library
    library = _library_path(compiler)
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(library.with_suffix(".lock"), library):
            if not library.exists():
                _compile(compiler, library)
    return library


def _build_and_load() -> tuple[Any, Path]:
    import tensorflow as tf

    library = _find_or_compile()
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
