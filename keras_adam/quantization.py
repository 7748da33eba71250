r"""Block-wise quantized moments: Adam's state in 8 or 4 bits per value.

With `moment_dtype="int8"` or `"int4"`, each moment of a large variable is
stored as codes plus one float32 scale per block of values, in the manner
of Dettmers et al. (2022, arXiv:2110.02861) and Li et al. (NeurIPS 2023):

- **Blocks.** The moment is flattened and cut into blocks of
  `Format.block_size` values (256 for int8, 128 for int4); the last block
  may be short. Each block keeps its largest magnitude, its *absmax*, as a
  float32 scale, and each value is stored as the code nearest to
  value / absmax, a number in [-1, 1].
- **Codes.** A code is an index into a table of `2**bits` (or fewer)
  values in [-1, 1], a non-linear *decade map*: the magnitudes of decade
  $k$ lie in $(10^{-k-1}, 10^{-k}]$, $c_k$ of them evenly spaced,
  $10^{-k-1}(1 + 9j/c_k)$ for $j = 1..c_k$, and each decade gets half the
  codes of the one above. Large values get fine steps, small values keep
  their order of magnitude: the shape of Adam's moments, which span
  decades inside a block. 1 is a code, so each block's largest value is
  stored exactly.
- **m** (signed) uses a map symmetric about a code at exactly 0.
- **v and v̂** (non-negative) use a map **without zero**: a small but
  nonzero v stored as 0 would make $m/(\sqrt{v}+\epsilon)$ explode (the
  "zero-point problem" of Li et al.); here it is stored as at least the
  smallest code times its block's absmax. Only a block that is all zeros
  (absmax 0) decodes to zeros.
- int4 codes are packed two per byte, the first value in the low nibble.

A step decodes the moments, runs the float32 step of `update_rule`, and
encodes them again (`decode`, `encode`), in `keras.ops`: under XLA and
`jax.jit` these fuse into one pass. Variables smaller than
`MIN_QUANTIZED_SIZE` values (biases, norms) keep float32 moments, as
bitsandbytes does: they cost little and their moments are the most
sensitive.

State per value: int8 1 + 4/256 bytes, int4 0.5 + 4/128 bytes, against 4
for float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np
from keras import ops

#: `moment_dtype` values that quantize.
QUANTIZED_DTYPES = ("int8", "int4")

#: Variables with fewer values keep float32 moments.
MIN_QUANTIZED_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Format:
    """How one moment is quantized.

    Attributes:
        bits: Bits per code, 8 or 4.
        block_size: Values per scale.
        signed: A map symmetric about 0 (for m) or a map of positive values
            without zero (for v and v̂).
    """

    bits: int
    block_size: int
    signed: bool
    #: The small arrays `nearest_codes` gathers from (built once, NumPy).
    lookup: dict = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lookup", _lookup(self))

    @property
    def decade_counts(self) -> tuple[int, ...]:
        """Codes per decade, from (0.1, 1] down: each decade half the one above.

        Signed: `bits - 1` magnitude bits give 2**(bits-1) - 1 positive codes
        (and as many negative, and 0). Unsigned without zero: `bits` bits give
        2**bits codes, the last decade repeated with one code so that none
        is wasted.
        """
        magnitude_bits = self.bits - 1 if self.signed else self.bits
        counts = [2 ** (magnitude_bits - 1 - k) for k in range(magnitude_bits)]
        return tuple(counts) if self.signed else (*counts, 1)

    @property
    def magnitudes(self) -> np.ndarray:
        """The positive codes' values, from 1 down (float64)."""
        return _magnitudes(self.decade_counts)

    @property
    def table(self) -> np.ndarray:
        """Every code's value, ascending (float32): the index is the code."""
        return self.lookup["table"]

    def stored_bytes(self, size: int) -> tuple[int, int]:
        """`(code bytes, scale count)` of a moment of `size` values."""
        blocks = math.ceil(size / self.block_size)
        return math.ceil(size * self.bits / 8), blocks


def formats(moment_dtype: str) -> tuple[Format, Format]:
    """`(format of m, format of v and v̂)` for `moment_dtype` "int8" or "int4"."""
    if moment_dtype == "int8":
        return Format(8, 256, True), Format(8, 256, False)
    if moment_dtype == "int4":
        return Format(4, 128, True), Format(4, 128, False)
    raise ValueError(
        f"Argument `moment_dtype` must be one of {QUANTIZED_DTYPES} to quantize. "
        f"Received: moment_dtype={moment_dtype!r}"
    )


def is_quantized(moment_dtype: str | None) -> bool:
    """Whether `moment_dtype` stores moments quantized."""
    return moment_dtype in QUANTIZED_DTYPES


def storage(moment_dtype: str | None, variable: Any) -> str | None:
    """How the moments of `variable` are stored under `moment_dtype`.

    Returns:
        "int8" or "int4" for a variable of at least `MIN_QUANTIZED_SIZE`
        values under a quantized `moment_dtype`; for a smaller one, float32
        (float64 for a float64 variable); else `moment_dtype` itself (None:
        the variable's dtype).
    """
    if not is_quantized(moment_dtype):
        return moment_dtype
    if math.prod(variable.shape) >= MIN_QUANTIZED_SIZE:
        return moment_dtype
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return "float64" if dtype == "float64" else "float32"


def _magnitudes(counts: tuple[int, ...]) -> np.ndarray:
    values = []
    for k, count in enumerate(counts):
        low = 10.0 ** (-k - 1)
        values += [low * (1 + 9 * j / count) for j in range(count, 0, -1)]
    return np.array(values)


def _lookup(fmt: Format) -> dict[str, np.ndarray]:
    """The code table and the small arrays `nearest_codes` gathers from."""
    counts = np.array(fmt.decade_counts)
    magnitudes = fmt.magnitudes
    if fmt.signed:
        table = np.concatenate([-magnitudes, [0.0], magnitudes[::-1]])
    else:
        table = magnitudes[::-1]
    low = 10.0 ** (-np.arange(len(counts)) - 1)
    midpoints = (table[:-1] + table[1:]) / 2
    return {
        **_kernel_lookup(fmt, table),
        "table": table.astype(np.float32),
        "low": low.astype(np.float32),
        "step": (9 * low / counts).astype(np.float32),
        "count": counts.astype(np.float32),
        "offset": np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.float32),
        # mid_above[i]: between codes i and i+1 (+inf past the last);
        # mid_below[i]: between codes i-1 and i (-inf before the first).
        "mid_above": np.append(midpoints, np.inf).astype(np.float32),
        "mid_below": np.insert(midpoints, 0, -np.inf).astype(np.float32),
    }


#: The kernel's lookup cells: the top 7 mantissa bits of a float32 magnitude
#: and its exponent, from 2**-32 (all smaller magnitudes share cell 0) to 1:
#: the fewest cells (a 16 KB table) that keep one midpoint per cell.
_CELL_BITS = 7
_CELL_SHIFT = 23 - _CELL_BITS
_CELL_BASE = (127 - 32) << _CELL_BITS


def _kernel_lookup(fmt: Format, table: np.ndarray) -> dict[str, Any]:
    """The arrays of the C++ kernel's encoder (`kernels/quantized_adam.h`).

    The midpoints between consecutive magnitudes (ascending, with 0 first
    for a signed map; float32, as `encode` compares with; +inf after the
    last), which int4 searches directly, and a packed lookup table.
    A magnitude's cell is its float32 bit pattern shifted right by
    `_CELL_SHIFT`: its exponent and top mantissa bits. For each cell the
    table holds, in the low 8 bits, the number of midpoints below the
    cell's low end: the nearest magnitude there; and above them the low
    `_CELL_SHIFT` bits of the midpoint inside the cell, or all ones if
    there is none. A value's nearest magnitude is the first number, plus
    one if its own low bits are above the second: midpoint and value share
    the cell's top bits, so comparing the rest compares the floats. So no
    cell may hold two midpoints, and the first and last cells (where
    smaller and larger magnitudes are clamped) none; both are checked here.
    """
    if fmt.signed:
        zero = int(np.flatnonzero(table == 0)[0])
        magnitudes = table[zero:]
    else:
        zero = -1
        magnitudes = table
    midpoints = ((magnitudes[:-1] + magnitudes[1:]) / 2).astype(np.float32)
    cells = np.arange(((127 << _CELL_BITS) - _CELL_BASE) + 1, dtype=np.uint32)
    low = ((cells + _CELL_BASE) << _CELL_SHIFT).view(np.float32)
    high = ((cells + 1 + _CELL_BASE) << _CELL_SHIFT).view(np.float32)
    below = np.searchsorted(midpoints, low, side="left")
    inside = np.searchsorted(midpoints, high, side="left") - below
    if inside.max() > 1 or inside[0] or inside[-1]:
        raise AssertionError(f"{fmt}: a lookup cell holds two midpoints, or an end cell one")
    if len(magnitudes) > 256:
        raise AssertionError(f"{fmt}: more than 256 magnitudes do not fit the packed table")
    none = (1 << _CELL_SHIFT) - 1
    low_bits = midpoints.view(np.uint32)[np.minimum(below, len(midpoints) - 1)] & none
    threshold = np.where(inside == 1, low_bits, none).astype(np.int64)
    return {
        "zero": zero,
        "magnitude_mid": np.append(midpoints, np.float32(np.inf)).astype(np.float32),
        "lut": (below | threshold << 8).astype(np.int32),
        "lut_shift": _CELL_SHIFT,
        "lut_base": _CELL_BASE,
    }


def nearest_codes(normalized: Any, fmt: Format) -> Any:
    """The code nearest to each value of `normalized` (in [-1, 1]), as int32.

    A first guess from the decade and the even steps inside it is off by
    at most one code (at a decade's edge, or below the smallest decade);
    one comparison with the midpoints on each side settles it.
    """
    names = ("low", "step", "count", "offset", "mid_above", "mid_below")
    arrays = {name: ops.convert_to_tensor(fmt.lookup[name]) for name in names}
    decades = len(fmt.decade_counts)
    magnitude = ops.abs(normalized)
    tiny = np.float32(10.0 ** (-decades - 1))
    decade = ops.floor(ops.negative(ops.log10(ops.maximum(magnitude, tiny))))
    decade = ops.cast(ops.clip(decade, 0, decades - 1), "int32")
    low = ops.take(arrays["low"], decade)
    step = ops.take(arrays["step"], decade)
    count = ops.take(arrays["count"], decade)
    j = ops.clip(ops.round(ops.divide(ops.subtract(magnitude, low), step)), 0.0, count)
    # Index among the magnitudes from the largest down (P: below them all).
    rank = ops.subtract(ops.add(ops.take(arrays["offset"], decade), count), j)
    positives = float(sum(fmt.decade_counts))
    if fmt.signed:
        guess = ops.where(ops.less(normalized, 0.0), rank, ops.subtract(2.0 * positives, rank))
    else:
        guess = ops.clip(ops.subtract(positives - 1.0, rank), 0.0, positives - 1.0)
    guess = ops.cast(guess, "int32")
    up = ops.greater(normalized, ops.take(arrays["mid_above"], guess))
    down = ops.less(normalized, ops.take(arrays["mid_below"], guess))
    return ops.add(guess, ops.subtract(ops.cast(up, "int32"), ops.cast(down, "int32")))


def _blocks(flat: Any, size: int, block_size: int) -> Any:
    """`flat` (of `size` values) zero-padded to whole blocks, as `[blocks, block_size]`."""
    blocks = math.ceil(size / block_size)
    padding = blocks * block_size - size
    if padding:
        flat = ops.pad(flat, [[0, padding]])
    return ops.reshape(flat, (blocks, block_size))


def encode(value: Any, fmt: Format) -> tuple[Any, Any]:
    """Quantize `value` (any shape, float) to `(codes, scales)`.

    Args:
        value: The moment, in float32 (or wider).
        fmt: Its format.

    Returns:
        `codes`, uint8 of `fmt.stored_bytes(size)[0]` bytes, and `scales`,
        float32, one absmax per block.
    """
    size = math.prod(value.shape)
    blocks = _blocks(ops.reshape(ops.cast(value, "float32"), (-1,)), size, fmt.block_size)
    scales = ops.max(ops.abs(blocks), axis=1)
    safe = ops.where(ops.greater(scales, 0.0), scales, ops.ones_like(scales))
    codes = nearest_codes(ops.divide(blocks, ops.expand_dims(safe, 1)), fmt)
    codes = ops.reshape(codes, (-1,))
    if fmt.bits == 4:
        pairs = ops.reshape(codes, (-1, 2))
        codes = ops.add(pairs[:, 0], ops.multiply(pairs[:, 1], 16))
    stored, _ = fmt.stored_bytes(size)
    return ops.cast(codes[:stored], "uint8"), scales


def decode(codes: Any, scales: Any, shape: tuple, fmt: Format) -> Any:
    """The float32 moment of `shape` stored as `(codes, scales)` (`encode`'s inverse)."""
    size = math.prod(shape)
    indices = ops.cast(codes, "int32")
    if fmt.bits == 4:
        indices = ops.reshape(
            ops.stack([ops.mod(indices, 16), ops.floor_divide(indices, 16)], axis=1), (-1,)
        )
    values = ops.take(ops.convert_to_tensor(fmt.table), indices)
    if values.shape[0] != size:  # int4 of an odd size: one nibble of padding
        values = values[:size]
    blocks = _blocks(values, size, fmt.block_size)
    flat = ops.reshape(ops.multiply(blocks, ops.expand_dims(scales, 1)), (-1,))
    return ops.reshape(flat[:size], shape)


class QuantizedMoment:
    """One quantized moment of one variable: two optimizer variables and a format.

    It stands where a moment variable would in the optimizer's slot lists:
    `value` reads it (decoded, float32) and `assign` writes it (encoded).

    Attributes:
        codes: The uint8 variable of codes.
        scales: The float32 variable of block scales.
        shape: The shape of the moment (its model variable's).
        fmt: The format.
    """

    dtype = "float32"

    def __init__(self, codes: keras.Variable, scales: keras.Variable, shape: tuple, fmt: Format):
        self.codes = codes
        self.scales = scales
        self.shape = tuple(shape)
        self.fmt = fmt

    @property
    def value(self) -> Any:
        """The moment, decoded to float32."""
        return decode(self.codes.value, self.scales.value, self.shape, self.fmt)

    def assign(self, value: Any) -> None:
        """Store `value` (of `shape`), encoded."""
        codes, scales = encode(value, self.fmt)
        self.codes.assign(codes)
        self.scales.assign(scales)

    def numpy(self) -> np.ndarray:
        """The moment, decoded, as a NumPy array."""
        return np.asarray(ops.convert_to_numpy(self.value))

    def __repr__(self) -> str:
        return (
            f"<QuantizedMoment {self.codes.path} shape={self.shape} "
            f"bits={self.fmt.bits} block={self.fmt.block_size}>"
        )
