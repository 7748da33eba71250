"""The kernels' first-use build is visible and avoidable (keras_adam/kernels).

- A cold cache compiles once, with one WARNING when the compile starts
  (naming the library's path) and one with its duration when it ends, seen
  on stderr by a user who configured no logging; a warm cache loads quietly.
- `python -m keras_adam.kernels build` builds ahead (Docker images, CI):
  the TensorFlow library, the quantized-moments library and its XLA calls
  for JAX and for TensorFlow's XLA (TensorFlow and JAX are installed
  here). It prints their paths, one per line, and exits 0, again at once
  when cached; it exits 1 with one line per library saying why when it
  cannot build.
- Where no compiler is found, a library built ahead is loaded.
- The cache key is what changes the binary: the sources, TensorFlow's
  version and flags, the compiler's version; not where TensorFlow, the
  sources or the compiler are installed.

Two cold builds run once for the test session (`once_per_session`), each into
a fresh cache directory in a subprocess: `load()` of the TensorFlow library,
and the build command of every library (about 5 minutes on 2 cores); the
other tests copy what they need from them instead of compiling again.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from keras_adam import kernels
from tests.helpers.tf_support import needs_compiler

START = "compiling the Adam kernels once for this TensorFlow"
DONE = "compiled the Adam kernels in"

LOAD = (
    "from keras_adam import kernels\n"
    "assert kernels.load() is not None, kernels._state.get('error')\n"
    "print(kernels.library_path())\n"
)


def python(args, cache, **env):
    """Run Python in a fresh process with `cache` as the kernels' cache."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_ADAM_CACHE_DIR": str(cache)}
    environment.pop(kernels.ENV_SWITCH, None)
    environment.update(env)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
        check=False,
    )
    return result, time.perf_counter() - start


def once_per_session(tmp_path_factory, name, args):
    """Run `python args` on a fresh cache once for the whole test session.

    pytest-xdist's workers share the result (the first to come runs it under a
    file lock, the other waits: a cold build compiles its sources side by side
    on both cores anyway), so a cold build is paid once, not once per worker.

    Returns:
        (the cache directory, the finished process).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, shared by the workers
    cache, saved = root / f"{name}_cache", root / f"{name}.json"
    with open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not saved.exists():
            shutil.rmtree(cache, ignore_errors=True)  # what a killed run left
            cache.mkdir()
            result, _ = python(args, cache)
            saved.write_text(json.dumps([result.returncode, result.stdout, result.stderr]))
    returncode, stdout, stderr = json.loads(saved.read_text())
    assert returncode == 0, stderr[-3000:]
    return cache, subprocess.CompletedProcess(args, returncode, stdout, stderr)


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """A first use on an empty cache: (cache directory, its process result)."""
    return once_per_session(tmp_path_factory, "cold", ["-c", LOAD])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The build command on an empty cache: (cache directory, its process result).

    The one cold build of every library in this module (about 5 minutes on 2
    cores); the tests that need the other libraries present copy them from here.
    """
    return once_per_session(tmp_path_factory, "built", ["-m", "keras_adam.kernels", "build"])


def copy_libraries(source, target, *, skip=()):
    """Copy the built libraries in `source` to `target`, except those named in `skip`."""
    for library in source.glob("*.so"):
        if not library.name.startswith(tuple(skip)):
            shutil.copy2(library, target / library.name)


@needs_compiler
def test_a_cold_cache_logs_one_warning_at_the_start_and_one_with_the_time(cold):
    cache, result = cold
    library = result.stdout.strip().splitlines()[-1]
    starts = [line for line in result.stderr.splitlines() if START in line]
    dones = [line for line in result.stderr.splitlines() if DONE in line]
    assert len(starts) == 1 and len(dones) == 1, result.stderr
    assert library in starts[0]  # where it goes
    assert "python -m keras_adam.kernels build" in starts[0]  # how to avoid it
    seconds = float(dones[0].split(DONE)[1].split()[0])
    assert 0 < seconds < kernels.COMPILE_TIMEOUT
    # WARNING level: Python shows it with no logging configured (INFO it would not).
    assert [path.name for path in cache.glob("*.so")] == [os.path.basename(library)]


@needs_compiler
def test_a_warm_cache_loads_without_a_word(cold):
    cache, first = cold
    result, _ = python(["-c", LOAD], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == first.stdout.strip()
    assert START not in result.stderr and DONE not in result.stderr


#: The libraries' file name stems, in the order the build command prints them.
STEMS = (
    "keras_adam_kernels-",
    "keras_adam_quantized-",
    "keras_adam_quantized_xla-",
    "keras_adam_quantized_tf_xla-",
)


def _printed(result):
    return result.stdout.strip().splitlines()


@needs_compiler
def test_build_command_builds_every_library_into_an_empty_cache(built):
    cache, result = built
    libraries = _printed(result)
    assert all(
        os.path.basename(p).startswith(stem) for p, stem in zip(libraries, STEMS, strict=True)
    )
    for library in libraries:
        assert os.path.dirname(library) == str(cache) and os.path.isfile(library)
    assert result.stderr.count(START) == 1 and result.stderr.count(DONE) == 1
    again, _ = python(["-m", "keras_adam.kernels", "build"], cache)
    assert again.returncode == 0 and _printed(again) == libraries
    assert START not in again.stderr
    # What the build made is what the backends then load, without compiling.
    loaded, _ = python(
        ["-c", "from keras_adam.kernels import quantized; print(quantized.load().path)"], cache
    )
    assert loaded.stdout.strip() == libraries[1], loaded.stderr[-3000:]
    warm, _ = python(["-c", LOAD], cache)
    assert warm.stdout.strip() == libraries[0], warm.stderr[-3000:]
    assert START not in warm.stderr


@needs_compiler
def test_build_command_finds_what_load_built_and_is_idempotent(cold, built, tmp_path):
    # A cache where load() built the TensorFlow library and the others are present:
    # the command builds nothing, prints the same paths twice, and the first is the
    # library load() made (load and build agree on its name).
    _, first = cold
    library = first.stdout.strip()
    shutil.copy2(library, tmp_path / os.path.basename(library))
    copy_libraries(built[0], tmp_path, skip=STEMS[:1])
    printed = None
    for _ in range(2):
        result, _ = python(["-m", "keras_adam.kernels", "build"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert _printed(result)[0] == str(tmp_path / os.path.basename(library))
        assert printed in (None, _printed(result))
        printed = _printed(result)
        assert START not in result.stderr and DONE not in result.stderr
    names = sorted(os.path.basename(p) for p in printed)
    assert sorted(p.name for p in tmp_path.glob("*.so")) == names
    assert [os.path.basename(p) for p in printed[1:]] == [
        os.path.basename(p) for p in _printed(built[1])[1:]
    ]


def test_build_command_fails_with_one_line_per_library_and_status_1(tmp_path):
    # No compiler on an empty PATH, and nothing built ahead in the cache.
    result, _ = python(["-m", "keras_adam.kernels", "build"], tmp_path, PATH="", CXX="")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "keras_adam" in line]
    assert [line.split(":")[1] for line in lines] == [
        " cannot build the kernels",
        " cannot build the quantized Adam kernel",
        " cannot build the quantized Adam XLA kernel",
        " cannot build the quantized Adam kernel for TensorFlow's XLA",
    ], result.stderr
    assert all("no C++ compiler" in line for line in lines)
    assert result.stdout == ""


@needs_compiler
def test_without_a_compiler_a_library_built_ahead_is_loaded(cold):
    # A Docker image may build in one stage and run without a compiler.
    cache, first = cold
    result, _ = python(["-c", LOAD], cache, PATH="", CXX="")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == first.stdout.strip()


def test_build_command_needs_a_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "keras_adam.kernels"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "build" in result.stderr


# -- the cache key ---------------------------------------------------------------------


def moved_tensorflow(monkeypatch, prefix):
    """Make TensorFlow look installed under `prefix` (its flags name its path)."""
    here = tf.sysconfig.get_lib()
    compile_flags = [flag.replace(here, prefix) for flag in tf.sysconfig.get_compile_flags()]
    link_flags = [flag.replace(here, prefix) for flag in tf.sysconfig.get_link_flags()]
    monkeypatch.setattr(tf.sysconfig, "get_lib", lambda: prefix)
    monkeypatch.setattr(tf.sysconfig, "get_include", lambda: f"{prefix}/include")
    monkeypatch.setattr(tf.sysconfig, "get_compile_flags", lambda: compile_flags)
    monkeypatch.setattr(tf.sysconfig, "get_link_flags", lambda: link_flags)


def test_key_ignores_where_tensorflow_is_installed(monkeypatch):
    here = kernels._binary_key()
    with monkeypatch.context() as patch:
        moved_tensorflow(patch, "/opt/other-venv/lib/python3.12/site-packages/tensorflow")
        assert "/opt/other-venv" in " ".join(kernels._tensorflow_flags())  # it moved
        assert kernels._binary_key() == here
    assert kernels._binary_key() == here


def test_key_changes_with_tensorflow_version_and_abi(monkeypatch):
    here = kernels._binary_key()
    with monkeypatch.context() as patch:
        patch.setattr(tf, "__version__", "2.99.0")
        assert kernels._binary_key() != here
    with monkeypatch.context() as patch:
        flags = [
            flag.replace("_GLIBCXX_USE_CXX11_ABI=1", "_GLIBCXX_USE_CXX11_ABI=0")
            for flag in tf.sysconfig.get_compile_flags()
        ] + ["-DSOMETHING_ELSE"]
        patch.setattr(tf.sysconfig, "get_compile_flags", lambda: flags)
        assert kernels._binary_key() != here
    with monkeypatch.context() as patch:
        patch.setattr(kernels.builder, "FLAGS", (*kernels.FLAGS, "-march=native"))
        assert kernels._binary_key() != here


def test_key_follows_the_sources_not_where_they_are(monkeypatch, tmp_path):
    here = kernels._binary_key()
    copies = {path.name: tmp_path / path.name for path in kernels.SOURCES + kernels.HEADERS}
    for path in kernels.SOURCES + kernels.HEADERS:
        copies[path.name].write_bytes(path.read_bytes())
    monkeypatch.setattr(kernels.builder, "SOURCES", tuple(copies[p.name] for p in kernels.SOURCES))
    monkeypatch.setattr(kernels.builder, "HEADERS", tuple(copies[p.name] for p in kernels.HEADERS))
    assert kernels._binary_key() == here  # same bytes elsewhere: same library
    copies["adam_step.h"].write_bytes(copies["adam_step.h"].read_bytes() + b"// changed\n")
    assert kernels._binary_key() != here


@needs_compiler
def test_key_follows_the_compiler_version_not_its_path(tmp_path):
    compiler = kernels._compiler()
    elsewhere = tmp_path / "bin" / "g++"
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(compiler)
    assert kernels._library_path(str(elsewhere)) == kernels._library_path(compiler)
    fake = tmp_path / "bin" / "other-c++"
    fake.write_text("#!/bin/sh\necho 'other-c++ 1.0'\n")
    fake.chmod(0o755)
    assert kernels._library_path(str(fake)) != kernels._library_path(compiler)
    assert kernels._library_path(compiler).name.startswith(
        f"keras_adam_kernels-{kernels._binary_key()}-"
    )


# -- failures and waiting, in process ---------------------------------------------------


@needs_compiler
def test_a_compile_error_is_one_line_from_the_build_command(built, monkeypatch, tmp_path, capsys):
    from keras_adam.kernels.__main__ import main

    broken = tmp_path / "src" / "multi_tensor_adam.cc"
    broken.parent.mkdir()
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels.builder, "SOURCES", (broken, *kernels.SOURCES[1:]))
    # The other libraries are in the cache already (built once for the module):
    # the command must go on past the failure to find and print them.
    (tmp_path / "cache").mkdir()
    copy_libraries(built[0], tmp_path / "cache", skip=STEMS[:1])
    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(tmp_path / "cache"))
    kernels.reset()
    try:
        assert main(["build"]) == 1
    finally:
        kernels.reset()  # the next load() (unpatched) finds the real library
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("keras_adam.kernels")]
    assert len(lines) == 1
    assert "cannot build the kernels: compiling multi_tensor_adam.cc failed" in lines[0]
    # The others are still printed; nothing of the broken one is left half-written.
    built = sorted(p.name for p in (tmp_path / "cache").glob("*.so"))
    assert [os.path.basename(p) for p in sorted(captured.out.split())] == built
    assert [name.startswith(STEMS[0]) for name in built] == [False, False, False]


def test_a_process_that_waits_for_another_ones_compile_says_so(tmp_path, caplog):
    import threading

    lock = tmp_path / "k.lock"
    library = tmp_path / "k.so"
    entered = threading.Event()

    def second():
        with kernels._file_lock(lock, library):
            entered.set()

    with kernels._file_lock(lock, library):
        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 30
        while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not entered.is_set()
    thread.join(30)
    assert entered.is_set()
    assert str(library) in caplog.text
