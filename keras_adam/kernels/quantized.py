"""The quantized Adam kernel: a small C++ library without TensorFlow, through ctypes.

`quantized_adam.h` is the step on block-wise quantized moments (decode,
float32 Adam, encode, one pass per block); `quantized_adam_c.cc` exposes it
as a C function over several variables, split over threads. This module
builds that library with the machine's C++ compiler into the same cache as
the TensorFlow kernels (`builder.cache_dir()`), named by a hash of its
sources, flags, machine and compiler, under a file lock (pytest-xdist
workers), and loads it with ctypes, which releases the GIL during the call.

`load()` returns a `QuantizedKernel`, or None (logged once) where the
library cannot be built or loaded or `KERAS_ADAM_KERNEL=0`: callers then use
the `keras.ops` step, which gives the same numbers to round-off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from keras_adam.kernels import builder, loader
from keras_adam.quantization import Format

_HERE = Path(__file__).parent
SOURCE = _HERE / "quantized_adam_c.cc"
HEADERS = tuple(
    _HERE / name
    for name in ("quantized_adam.h", "quantized_adam_avx512.h", "quantized_adam_threads.h")
)
FLAGS = ("-O3", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-pthread", "-w")
ABI = 4

#: The buffers of one variable the kernel reads and writes, in its order:
#: the variable, its gradient, and each moment (scales and codes, one buffer).
BUFFERS = ("var", "grad", "m", "v", "vh")

#: The bit of each flag in the XLA calls' `flags` (QuantizedScalars::SetFlags).
FLAG_BITS = {"maximize": 1, "l2": 2, "decoupled": 4, "amsgrad": 8, "paper": 16}

#: Variables per XLA custom call (JAX's and TensorFlow's): XLA's compile
#: time grows with the square of a call's operands (200 variables in one
#: JAX call took 4.2 s to compile, in calls of 32 0.4 s), while a call
#: costs microseconds to run.
VARIABLES_PER_CALL = 32


def flag_bits(flags: dict[str, bool]) -> int:
    """The XLA calls' `flags` integer: the sum of `FLAG_BITS` of the flags set."""
    return sum(bit for name, bit in FLAG_BITS.items() if flags[name])


def results_per_variable(outputs: list, moments: list) -> list:
    """An XLA call's results, 4 per variable, as `(value, [stored moment, ...])`.

    Each variable's first result is its new value, then the stored buffers
    of m, v and v̂ (empty without AMSGrad: only `moments`' own are kept).
    """
    return [
        (outputs[4 * k], list(outputs[4 * k + 1 : 4 * k + 1 + len(slots)]))
        for k, slots in enumerate(moments)
    ]


def stored_moments(slots: list, empty: Any) -> list:
    """A variable's moments as a kernel call takes them: m, v and v̂, each one buffer.

    Args:
        slots: Its `QuantizedMoment`s, m, v and with AMSGrad v̂.
        empty: An empty uint8 tensor, v̂'s buffer without AMSGrad.
    """
    stored = [moment.variable.value for moment in slots]
    return stored if len(slots) == 3 else [*stored, empty]


def threads() -> int:
    """The threads an XLA call splits its blocks over: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_calls(call: Any, params: list, grads: list, moments: list, *rest: Any) -> list:
    """`call(params, grads, moments, *rest)` on `VARIABLES_PER_CALL` variables at a time.

    Returns:
        The calls' lists of results, one after the other.
    """
    stepped = []
    for first in range(0, len(params), VARIABLES_PER_CALL):
        part = slice(first, first + VARIABLES_PER_CALL)
        stepped += call(params[part], grads[part], moments[part], *rest)
    return stepped


_logger = logging.getLogger("keras_adam")
_lock = threading.Lock()
_state: dict[str, Any] = {}


class _Format(ctypes.Structure):
    _fields_ = [
        ("bits", ctypes.c_int32),
        ("block", ctypes.c_int32),
        ("zero", ctypes.c_int32),
        ("table", ctypes.c_void_p),
        ("mid", ctypes.c_void_p),
        ("lut", ctypes.c_void_p),
        ("lut_size", ctypes.c_int32),
        ("lut_shift", ctypes.c_int32),
        ("lut_base", ctypes.c_int32),
    ]


class _Scalars(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_float)
            for name in (
                "alpha",
                "one_minus_beta1",
                "one_minus_beta2",
                "epsilon",
                "weight_decay",
                "learning_rate",
                "bias_correction_2_sqrt",
            )
        ),  # fmt: skip
        *((name, ctypes.c_int32) for name in ("maximize", "l2", "decoupled", "amsgrad", "paper")),
    ]


def _library_path(compiler: str, source: Path, flags: tuple[str, ...], stem: str) -> Path:
    key = hashlib.sha256()
    for part in (
        source.read_bytes(),
        *(header.read_bytes() for header in HEADERS),
        " ".join(flags).encode(),
        platform.machine().encode(),
        platform.system().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    name = f"{stem}-{key.hexdigest()[:20]}-{builder._compiler_key(compiler)}.so"
    return builder.cache_dir() / name


def _compile(compiler: str, source: Path, flags: tuple[str, ...], library: Path) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=library.stem + ".", dir=library.parent) as work:
        temporary = os.path.join(work, library.name)
        builder._run_all([[compiler, *flags, "-shared", str(source), "-o", temporary]])
        os.replace(temporary, library)
    _logger.info("keras_adam: compiled %s in %.1f s", source.name, time.perf_counter() - start)


def find_or_compile(
    source: Path = SOURCE, flags: tuple[str, ...] = FLAGS, stem: str = "keras_adam_quantized"
) -> Path:
    """A library's path in the cache, compiled first if the cache lacks it.

    Args:
        source: The C++ file (it includes `HEADERS`); by default the ctypes
            library's. `quantized_xla` builds its XLA custom call here too.
        flags: The compiler's flags.
        stem: The start of the library's file name.

    Raises:
        RuntimeError: If there is no compiler or the compile fails.
    """
    compiler = builder._compiler()
    library = _library_path(compiler, source, flags, stem)
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with builder._file_lock(library.with_suffix(".lock"), library):
            if not library.exists():
                _compile(compiler, source, flags, library)
    return library


class QuantizedKernel:
    """The loaded library: `step` runs one Adam step of several variables.

    Attributes:
        path: The library's file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._library = ctypes.CDLL(str(path))
        if self._library.keras_adam_quantized_abi() != ABI:
            raise RuntimeError(f"{path} is not ABI version {ABI}")
        function = self._library.keras_adam_quantized_adam
        pointers = ctypes.POINTER(ctypes.c_void_p)
        function.argtypes = [*([pointers] * len(BUFFERS)),
                             ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                             ctypes.POINTER(_Format), ctypes.POINTER(_Format),
                             ctypes.POINTER(_Scalars), ctypes.c_int32]  # fmt: skip
        function.restype = ctypes.c_int32
        self._function = function
        self._library.keras_adam_quantized_portable_only.argtypes = [ctypes.c_int32]
        self._library.keras_adam_quantized_portable_only.restype = ctypes.c_int32
        self._formats: dict[Format, tuple[_Format, tuple]] = {}

    def portable_only(self, portable: bool) -> bool:
        """Run the portable loops (True) or the fastest path the CPU has (False).

        For tests, which compare both; it applies to the whole process.

        Returns:
            Whether this machine has a faster path (AVX-512) at all.
        """
        return bool(self._library.keras_adam_quantized_portable_only(int(portable)))

    def _format(self, fmt: Format) -> _Format:
        cached = self._formats.get(fmt)
        if cached is None:
            lookup = fmt.lookup
            arrays = tuple(
                np.ascontiguousarray(lookup[name]) for name in ("table", "magnitude_mid", "lut")
            )
            structure = _Format(
                fmt.bits,
                fmt.block_size,
                int(lookup["zero"]),
                *(array.ctypes.data for array in arrays),
                arrays[2].size,
                int(lookup["lut_shift"]),
                int(lookup["lut_base"]),
            )
            cached = self._formats[fmt] = (structure, arrays)  # the arrays stay alive
        return cached[0]

    def step(
        self,
        tensors: dict[str, list[int]],
        sizes: list[int],
        formats: tuple[Format, Format],
        scalars: dict[str, Any],
        threads: int,
    ) -> None:
        """One step of `len(sizes)` float32 variables, in place.

        Args:
            tensors: Data pointers (contiguous buffers) of each variable's
                `BUFFERS`: "var", "grad", "m", "v", and with AMSGrad "vh"
                (each moment one buffer, `quantization.pack`).
            sizes: Each variable's number of values.
            formats: The formats of m and of v (and v̂).
            scalars: `_Scalars`' fields.
            threads: Threads to split the blocks over.
        """
        count = len(sizes)
        arrays = [(ctypes.c_void_p * count)(*tensors.get(name, [0] * count)) for name in BUFFERS]
        m_format, v_format = (self._format(fmt) for fmt in formats)
        result = self._function(
            *(ctypes.cast(array, ctypes.POINTER(ctypes.c_void_p)) for array in arrays),
            (ctypes.c_int64 * count)(*sizes),
            count,
            ctypes.byref(m_format),
            ctypes.byref(v_format),
            ctypes.byref(_Scalars(**scalars)),
            max(int(threads), 1),
        )
        if result != 0:
            raise RuntimeError(f"the quantized Adam kernel failed ({result})")


def build() -> Path:
    """Build the library unless the cache holds it, and check that it loads.

    What `python -m keras_adam.kernels build` runs for this library.

    Returns:
        Its path in the kernels' cache.

    Raises:
        RuntimeError: If there is no compiler, the compile fails or the
            library is of another ABI.
    """
    return QuantizedKernel(find_or_compile()).path


def load() -> QuantizedKernel | None:
    """The kernel, built on first use; None where it is disabled or unavailable (logged once)."""
    return loader.load_once(
        _state,
        _lock,
        "kernel",
        lambda: QuantizedKernel(find_or_compile()),
        "keras_adam: the quantized Adam kernel is unavailable (%s); using the keras.ops step "
        "for quantized moments instead.",
    )
