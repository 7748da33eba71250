"""`python -m keras_adam.kernels build` (`keras-adam-kernels build`): compile ahead.

For Docker images and CI: run it once after installing keras_adam (and
TensorFlow), and the first training step loads the library instead of
waiting for the compiler. It prints the library's path and exits with
status 0 (at once if the cache already holds it), or prints one line
saying why it cannot build and exits with status 1. The cache directory is
`$KERAS_ADAM_CACHE_DIR`, else `$XDG_CACHE_HOME/keras_adam`, else
`~/.cache/keras_adam`; copy it along (or set the variable to a directory
inside the image) if the image runs as another user.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it.

    Args:
        argv: The arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 if the library is built and loads, 1 if not.
    """
    parser = argparse.ArgumentParser(
        prog="python -m keras_adam.kernels",
        description="Build keras_adam's TensorFlow kernels ahead of their first use.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="compile the kernels unless cached; print the library's path"
    )
    build.add_argument(
        "-v", "--verbose", action="store_true", help="on failure, print the whole error"
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    from keras_adam import kernels

    try:
        library = kernels.build()
    except Exception as error:  # noqa: BLE001 - any failure is reported, not raised
        text = str(error).strip() or type(error).__name__
        lines = text.splitlines()
        print(f"keras_adam.kernels: cannot build the kernels: {lines[0]}", file=sys.stderr)
        if args.verbose and len(lines) > 1:
            print("\n".join(lines[1:]), file=sys.stderr)
        return 1
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
