"""Building the kernels' library: compiler, flags, cache, lock, compile.

The sources (`SOURCES`, which include `HEADERS`) are compiled with the
machine's C++ compiler into one shared library the first time a step needs
either op (once: a WARNING says so when it starts and how long it took when
it ends), into a per-user cache directory (`cache_dir()`:
`$KERAS_ADAM_CACHE_DIR`, else `$XDG_CACHE_HOME/keras_adam`, else
`~/.cache/keras_adam`). To build it ahead, in a Docker image or a CI step:

    python -m keras_adam.kernels build    # or: keras-adam-kernels build

prints the library's path (exit status 0), or one line saying why it
cannot build (exit status 1).

The library's name is a hash of what changes the binary: the sources and
the header, the TensorFlow version and its compile and link flags (ABI
included) with its install path left out, our flags, the machine, and the
compiler's version. Virtual environments with the same TensorFlow share one
library. Where no compiler is found, a library built ahead for the same
sources and TensorFlow is used (whichever compiler built it): an image can
build in one stage and run without a compiler. Concurrent processes
(pytest-xdist workers) take a file lock, so one compiles and the others wait
and load; the library is written under a temporary name and renamed into
place.
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
import time
from collections.abc import Iterator
from pathlib import Path

_HERE = Path(__file__).parent
#: The sources compiled together into the one library.
SOURCES = (
    _HERE / "multi_tensor_adam.cc",
    _HERE / "sparse_rows_adam.cc",
    _HERE / "quantized_adam.cc",
)
#: Headers the sources include (part of the cache key).
HEADERS = (
    _HERE / "adam_step.h",
    _HERE / "resource_variables.h",
    _HERE / "quantized_adam.h",
    _HERE / "quantized_adam_avx512.h",
    _HERE / "quantized_adam_threads.h",
)
# No -march: the library may be cached on a shared home directory. The
# elementwise loop is cloned for AVX-512/AVX2/baseline and picked at load time.
FLAGS = ("-O3", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-w")
COMPILE_TIMEOUT = 600
#: The compile time the log's first WARNING announces.
EXPECTED_COMPILE_SECONDS = 15

_logger = logging.getLogger("keras_adam")


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
def _file_lock(path: Path, library: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, saying so if another process holds it."""
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


def find_or_compile() -> Path:
    """The library's path, compiled first unless the cache holds it.

    Where no compiler is found, the newest library built ahead for these
    sources and this TensorFlow (by any compiler) is returned instead.

    Returns:
        The path of the library in `cache_dir()`.

    Raises:
        RuntimeError: If there is no compiler and no library built ahead,
            or the compile fails.
        subprocess.TimeoutExpired: If the compile overruns `COMPILE_TIMEOUT`.
    """
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
