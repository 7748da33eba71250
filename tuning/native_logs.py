"""Keep TensorFlow's native start-up log lines out of `keras-adam-tune`'s output.

Loading TensorFlow 2.21 writes lines like these to the process's stderr
(file descriptor 2), from C++, before any of the command's own output::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796493667.977143   12300 port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:1796493667.977434   12300 cudart_stub.cc:31] Could not find cuda drivers ...
    E0000 00:00:1796489967.928836    8960 cuda_platform.cc:52] failed call to cuInit: ...

They come from absl's logging before anything initializes it, which
`TF_CPP_MIN_LOG_LEVEL` no longer reaches (even 3 leaves them). `filtered`
passes stderr through a pipe whose reader thread forwards every line but
those: absl's pre-initialization lines (`I0000 00:00:...`, `W0000`,
`E0000`: start-up only), info and warning lines of the same format at any
time, the banner above, and `cpu_feature_guard`'s "To enable the following
instructions: ..." continuation. Everything else, Python's warnings,
tracebacks and the kernels' build messages included, goes through as it
was written.

The command filters only when the user has not set `TF_CPP_MIN_LOG_LEVEL`
(it then sets it to 2, for the lines that level does reach); a user who
sets it, to any value, gets TensorFlow's own behaviour.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

#: The environment variable by which a user asks for TensorFlow's own logging.
LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"

#: Lines dropped (bytes, without their newline).
NATIVE_LINE = re.compile(
    rb"^(?:"
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]0000 00:00:\S+ +\d+ \S+:\d+\] "  # absl before initialization: start-up
    rb"|[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] "  # info and warnings, any time
    rb"|To enable the following instructions: .*rebuild TensorFlow with the appropriate"
    rb" compiler flags\."
    rb")"
)

#: Seconds `filtered` waits, on exit, for the pipe's last lines.
DRAIN_SECONDS = 5.0


class _Forwarder:
    """Fd 2 replaced by a pipe; a thread forwards its lines to the original stderr."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(
            target=self._forward, args=(read,), name="keras-adam-native-logs", daemon=True
        )
        self.thread.start()

    def _forward(self, read: int) -> None:
        pending = b""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not NATIVE_LINE.match(line))
                if kept:
                    self._write(kept)
        if pending and not NATIVE_LINE.match(pending):
            self._write(pending)

    def _write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.original, data) :]

    def close(self) -> None:
        """Give fd 2 back; the pipe ends, and the thread forwards what is left."""
        sys.stderr.flush()
        os.dup2(self.original, 2)  # the pipe's last writer (but children still running)
        self.thread.join(DRAIN_SECONDS)
        if not self.thread.is_alive():
            os.close(self.original)


@contextlib.contextmanager
def filtered() -> Iterator[bool]:
    """Inside, stderr without TensorFlow's native log lines, unless the user set their level.

    Yields:
        Whether the lines are filtered: False if `TF_CPP_MIN_LOG_LEVEL` was
        set, or stderr could not be redirected (a closed descriptor).
    """
    if LEVEL_VARIABLE in os.environ:
        yield False
        return
    os.environ[LEVEL_VARIABLE] = "2"
    try:
        forwarder = _Forwarder()
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        forwarder.close()
