"""`python -m keras_adam.kernels build` (`keras-adam-kernels build`): compile ahead.

For Docker images and CI: run it once after installing keras_adam and the
backends you use, and the first training step loads the kernels instead of
waiting for the compiler. It builds every library that applies here: the
TensorFlow ops (if TensorFlow is installed), the quantized-moments library
(PyTorch's path; it needs only a compiler), its XLA custom call for JAX (if
JAX is installed) and for TensorFlow's XLA (if TensorFlow is installed). It
prints each library's path, one per line, and exits with status 0 (at once
if the cache already holds them), or prints one line per library it cannot
build, saying why, and exits with status 1. The cache
directory is `$KERAS_ADAM_CACHE_DIR`, else `$XDG_CACHE_HOME/keras_adam`,
else `~/.cache/keras_adam`; copy it along (or set the variable to a
directory inside the image) if the image runs as another user.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path


def _libraries() -> list[tuple[str, Callable[[], Path]]]:
    """(what, build) for each library that applies to the installed backends."""
    from keras_adam import kernels
    from keras_adam.kernels import quantized

    libraries: list[tuple[str, Callable[[], Path]]] = []
    has_tensorflow = importlib.util.find_spec("tensorflow") is not None
    if has_tensorflow:
        libraries.append(("the kernels", kernels.build))
    libraries.append(("the quantized Adam kernel", quantized.build))
    if importlib.util.find_spec("jax") is not None:

        def xla() -> Path:
            from keras_adam.kernels import quantized_xla

            return quantized_xla.build()

        libraries.append(("the quantized Adam XLA kernel", xla))
    if has_tensorflow:

        def tf_xla() -> Path:
            from keras_adam.kernels import quantized_tf_xla

            return quantized_tf_xla.build()

        libraries.append(("the quantized Adam kernel for TensorFlow's XLA", tf_xla))
    return libraries


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it.

    Args:
        argv: The arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 if every library is built and loads, 1 if not.
    """
    parser = argparse.ArgumentParser(
        prog="python -m keras_adam.kernels",
        description="Build keras_adam's C++ kernels ahead of their first use.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="compile the kernels unless cached; print each library's path"
    )
    build.add_argument(
        "-v", "--verbose", action="store_true", help="on failure, print the whole error"
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    status = 0
    for what, build_library in _libraries():
        try:
            library = build_library()
        except Exception as error:  # noqa: BLE001 - any failure is reported, not raised
            text = str(error).strip() or type(error).__name__
            lines = text.splitlines()
            print(f"keras_adam.kernels: cannot build {what}: {lines[0]}", file=sys.stderr)
            if args.verbose and len(lines) > 1:
                print("\n".join(lines[1:]), file=sys.stderr)
            status = 1
            continue
        print(library, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
