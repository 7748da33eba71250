r"""Block-wise quantized moments: Adam's state in 8 or 4 bits per value.

With `moment_dtype="int8"` or `"int4"`, each moment of a large variable is
stored as codes plus one float32 scale per block of values, in the manner
of Dettmers et al. (2022, arXiv:2110.02861) and Li et al. (NeurIPS 2023):

- **Blocks.** The moment is flattened and cut into blocks of
  `Format.block_size` values (256 for int8, 128 for int4); the last block
  may be short. Each block keeps its largest magnitude, its *absmax*, as a
  float32 scale, and each value is stored as the code nearest to
  value × (1 / absmax), a number in [-1, 1].
- **Codes.** A code is an index into a table of `2**bits` (or fewer)
  values in [-1, 1], its *map*. Both maps are non-linear: a small value
  keeps its order of magnitude, as it must, since Adam's moments span
  decades inside a block. 1 is a code of both, so each block's largest
  value is stored exactly.
  - int8 uses a **float map** (`FloatMap`): float32 numbers with few
    mantissa bits, counted down from 1, the grid of an 8-bit float format
    placed below each block's absmax. m has 3 mantissa bits (1, 0.9375,
    0.875, ..., 0.5, 0.46875, ...), a step of 1/16 to 1/8 of each value,
    down to $2^{-16}$. v and v̂ have 4 in the 8 binades below 1 (1,
    0.96875, ..., a step of 1/32 to 1/16) and 3 below them, down to
    $2^{-24}$: with β2 = 0.999 a step moves v by 0.1% of itself, far
    less than a code's step, so v keeps its code for many steps, and the
    finer grid near the block's largest value shortens that lag
    (docs/memory.md, "How it works"). A code is a few integer operations
    on the value's float32 bits (`nearest_codes`): the kernels encode and
    decode without tables.
  - int4 uses a **decade map**: the magnitudes of decade $k$ lie in
    $(10^{-k-1}, 10^{-k}]$, $c_k$ of them evenly spaced,
    $10^{-k-1}(1 + 9j/c_k)$ for $j = 1..c_k$, and each decade gets half the
    codes of the one above: with 7 or 16 magnitudes, a float grid would
    have steps of a third or more of the value, or reach no lower than
    $2^{-8}$.
- **m** (signed) uses a map symmetric about a code at exactly 0.
- **v and v̂** (non-negative) use a map **without zero**: a small but
  nonzero v stored as 0 would make $m/(\sqrt{v}+\epsilon)$ explode (the
  "zero-point problem" of Li et al.); here it is stored as at least the
  smallest code times its block's absmax. Only a block that is all zeros
  (absmax 0) decodes to zeros.
- int4 codes are packed two per byte, the first value in the low nibble.

A step decodes the moments, runs the float32 step of `update_rule`, and
encodes them again (`decode`, `encode`), in `keras.ops` (XLA fuses them
into a few passes), or in one pass per block in the C++ kernels
(`keras_adam/kernels`). Variables smaller than
`MIN_QUANTIZED_SIZE` values (biases, norms) keep float32 moments, as
bitsandbytes does: they cost little and their moments are the most
sensitive. Embedding tables keep them too unless the optimizer has
`quantize_embeddings=True`: measured on a recommender, quantized tables
take a different path from Adam's, ahead early and behind at the end
(docs/memory.md, "Embedding tables").

A moment is stored in one uint8 variable: its scales, then its codes
(`pack`). State per value: int8 1 + 4/256 bytes, int4 0.5 + 4/128 bytes,
against 4 for float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import keras
import numpy as np
from keras import ops

#: `moment_dtype` values that quantize.
QUANTIZED_DTYPES = ("int8", "int4")

#: Variables with fewer values keep float32 moments.
MIN_QUANTIZED_SIZE = 4096

#: The name of an embedding table's variable (`keras.layers.Embedding`'s,
#: and its subclasses'): float32 moments unless `quantize_embeddings`.
EMBEDDINGS_NAME = "embeddings"


@dataclasses.dataclass(frozen=True)
class FloatMap:
    """int8's map: float32 numbers with few mantissa bits, two grids.

    `fine_bits` mantissa bits in the `fine_binades` binades below 1 (and 1
    itself), `coarse_bits` below them. Magnitude index k (1 the smallest
    signed, 0 unsigned; `largest` is 1.0) is the float32 of bit pattern
    `(k + fine_base) << fine_shift` from `split_index` up (the magnitudes
    from `2**-fine_binades`), else `(k + coarse_base) << coarse_shift`.
    The two grids meet at `2**-fine_binades` (bit pattern `split_bits`),
    so the indices run on without a gap, and rounding a value's bits to
    its grid's mantissa bits gives its nearest magnitude's index
    (`nearest_codes`).
    """

    fine_bits: int
    fine_binades: int
    coarse_bits: int

    def parameters(self, largest: int) -> tuple[int, int, int, int, int, int]:
        """`(fine_shift, fine_base, coarse_shift, coarse_base, split_bits, split_index)`.

        Args:
            largest: The index of 1.0: the number of magnitudes, less one
                unsigned (whose smallest is index 0).
        """
        fine_shift = 23 - self.fine_bits
        fine_base = (127 << self.fine_bits) - largest
        split_exponent = 127 - self.fine_binades
        split_index = (split_exponent << self.fine_bits) - fine_base
        coarse_base = (split_exponent << self.coarse_bits) - split_index
        split_bits = split_exponent << 23
        return fine_shift, fine_base, 23 - self.coarse_bits, coarse_base, split_bits, split_index


#: int8's maps: m's, and v's and v̂'s.
M_FLOAT_MAP = FloatMap(fine_bits=3, fine_binades=0, coarse_bits=3)
V_FLOAT_MAP = FloatMap(fine_bits=4, fine_binades=8, coarse_bits=3)


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
    #: The code table and the arrays `nearest_codes` looks up in (built once, NumPy).
    lookup: dict = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lookup", _lookup(self))

    @property
    def float_map(self) -> FloatMap | None:
        """int8's float map (`M_FLOAT_MAP` or `V_FLOAT_MAP`), or None: int4's decade map."""
        if self.bits != 8:
            return None
        return M_FLOAT_MAP if self.signed else V_FLOAT_MAP

    @property
    def magnitude_count(self) -> int:
        """Nonzero magnitudes: `2**(bits-1) - 1` signed (beside ± and 0), `2**bits` unsigned."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits

    @property
    def decade_counts(self) -> tuple[int, ...]:
        """The decade map's (int4's) codes per decade, from (0.1, 1] down: each half the one above.

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
        if self.float_map is None:
            return _magnitudes(self.decade_counts)
        k = np.arange(self.magnitude_count, 0, -1, dtype=np.int32) - (0 if self.signed else 1)
        return _float_map_bits(k, self, np).view(np.float32).astype(np.float64)

    @property
    def table(self) -> np.ndarray:
        """Every code's value, ascending (float32): the index is the code."""
        return self.lookup["table"]

    def stored_bytes(self, size: int) -> tuple[int, int]:
        """`(code bytes, scale count)` of a moment of `size` values."""
        blocks = math.ceil(size / self.block_size)
        return math.ceil(size * self.bits / 8), blocks

    def storage_bytes(self, size: int) -> int:
        """The bytes of a moment of `size` values in one buffer (`pack`): scales, then codes."""
        code_bytes, blocks = self.stored_bytes(size)
        return 4 * blocks + code_bytes


@functools.cache
def formats(moment_dtype: str) -> tuple[Format, Format]:
    """`(format of m, format of v and v̂)` for `moment_dtype` "int8" or "int4" (built once)."""
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


def storage(
    moment_dtype: str | None, variable: Any, quantize_embeddings: bool = False
) -> str | None:
    """How the moments of `variable` are stored under `moment_dtype`.

    Args:
        moment_dtype: The optimizer's `moment_dtype`.
        variable: A model variable.
        quantize_embeddings: Quantize an embedding table's moments too (a
            variable named `EMBEDDINGS_NAME`).

    Returns:
        "int8" or "int4" for a variable of at least `MIN_QUANTIZED_SIZE`
        values under a quantized `moment_dtype` (an embedding table only
        with `quantize_embeddings`); for another, float32 (float64 for a
        float64 variable); else `moment_dtype` itself (None: the
        variable's dtype).
    """
    if not is_quantized(moment_dtype):
        return moment_dtype
    embedding = getattr(variable, "name", None) == EMBEDDINGS_NAME
    if math.prod(variable.shape) >= MIN_QUANTIZED_SIZE and (quantize_embeddings or not embedding):
        return moment_dtype
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return "float64" if dtype == "float64" else "float32"


def _magnitudes(counts: tuple[int, ...]) -> np.ndarray:
    values = []
    for k, count in enumerate(counts):
        low = 10.0 ** (-k - 1)
        values += [low * (1 + 9 * j / count) for j in range(count, 0, -1)]
    return np.array(values)


def _float_map_parameters(fmt: Format) -> tuple[int, int, int, int, int, int]:
    """`FloatMap.parameters` of int8's `fmt`."""
    largest = fmt.magnitude_count if fmt.signed else fmt.magnitude_count - 1
    return fmt.float_map.parameters(largest)


def _float_map_bits(k: Any, fmt: Format, xp: Any = ops) -> Any:
    """The float32 bit patterns (int32) of magnitude indices `k` (at least 1 signed, 0 unsigned).

    `xp` is `keras.ops` or NumPy.
    """
    fine_shift, fine_base, coarse_shift, coarse_base, _, split_index = _float_map_parameters(fmt)
    if fine_shift == coarse_shift:  # one grid (m's): one formula
        return xp.left_shift(xp.add(k, fine_base), fine_shift)
    return xp.where(
        xp.greater_equal(k, split_index),
        xp.left_shift(xp.add(k, fine_base), fine_shift),
        xp.left_shift(xp.add(k, coarse_base), coarse_shift),
    )


def _lookup(fmt: Format) -> dict[str, np.ndarray]:
    """The code table and the arrays `nearest_codes` and the kernels look up in.

    Both maps: "table", "zero" (the code of 0; -1 unsigned) and
    "magnitude_mid", the midpoints between consecutive magnitudes
    (ascending, with 0 first for a signed map; float32, as `encode`
    compares with; +inf after the last), which int4 searches directly. Then
    "lut": the decade map's packed table (`_kernel_lookup`), with
    "lut_shift" and "lut_base"; for the float map, whose kernels compute
    the code, its six `FloatMap.parameters` (and 0, 0).
    """
    magnitudes = fmt.magnitudes
    if fmt.signed:
        table = np.concatenate([-magnitudes, [0.0], magnitudes[::-1]])
    else:
        table = magnitudes[::-1]
    zero = len(magnitudes) if fmt.signed else -1
    ascending = table[max(zero, 0) :]
    midpoints = ((ascending[:-1] + ascending[1:]) / 2).astype(np.float32)
    if fmt.float_map is None:
        lut, shift, base = _kernel_lookup(fmt, midpoints)
    else:
        lut, shift, base = np.array(_float_map_parameters(fmt), np.int32), 0, 0
    return {
        "table": table.astype(np.float32),
        "zero": zero,
        "magnitude_mid": np.append(midpoints, np.float32(np.inf)).astype(np.float32),
        "lut": lut,
        "lut_shift": shift,
        "lut_base": base,
    }


#: The decade map's lookup cells: the top 7 mantissa bits of a float32
#: magnitude and its exponent, from 2**-32 (all smaller magnitudes share
#: cell 0) to 1 (a 16 KB table; `_kernel_lookup` checks that no cell holds
#: two midpoints).
_CELL_BITS = 7
_CELL_SHIFT = 23 - _CELL_BITS
_CELL_BASE = (127 - 32) << _CELL_BITS


def _kernel_lookup(fmt: Format, midpoints: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The decade map's packed lookup table, its shift and its base.

    A magnitude's cell is its float32 bit pattern shifted right by
    `_CELL_SHIFT`: its exponent and top mantissa bits. For each cell the
    table holds, in the low 8 bits, the number of `midpoints` (ascending,
    float32) below the cell's low end: the nearest magnitude there; and
    above them the low `_CELL_SHIFT` bits of the midpoint inside the cell,
    or all ones if there is none. A value's nearest magnitude is the first
    number, plus one if its own low bits are above the second: midpoint
    and value share the cell's top bits, so comparing the rest compares the
    floats. So no cell may hold two midpoints, and the first and last cells
    (where smaller and larger magnitudes are clamped) none; both are
    checked here.
    """
    cells = np.arange(((127 << _CELL_BITS) - _CELL_BASE) + 1, dtype=np.uint32)
    low = ((cells + _CELL_BASE) << _CELL_SHIFT).view(np.float32)
    high = ((cells + 1 + _CELL_BASE) << _CELL_SHIFT).view(np.float32)
    below = np.searchsorted(midpoints, low, side="left")
    inside = np.searchsorted(midpoints, high, side="left") - below
    if inside.max() > 1 or inside[0] or inside[-1]:
        raise AssertionError(f"{fmt}: a lookup cell holds two midpoints, or an end cell one")
    if len(midpoints) + 1 > 256:
        raise AssertionError(f"{fmt}: more than 256 magnitudes do not fit the packed table")
    none = (1 << _CELL_SHIFT) - 1
    low_bits = midpoints.view(np.uint32)[np.minimum(below, len(midpoints) - 1)] & none
    threshold = np.where(inside == 1, low_bits, none).astype(np.int64)
    return (below | threshold << 8).astype(np.int32), _CELL_SHIFT, _CELL_BASE


def nearest_codes(normalized: Any, fmt: Format) -> Any:
    """The code nearest to each value of `normalized` (float32, in [-1, 1]), as int32.

    As the C++ kernels encode. Float map (int8): the magnitude's float32
    bits, rounded to its grid's mantissa bits (`FloatMap`) and offset, are
    its index; a signed magnitude at most half the smallest is 0. Decade
    map (int4): the cell of the magnitude's bits in the packed lookup table
    (`_kernel_lookup`) gives the nearest magnitude at the cell's low end
    and the low bits of the one midpoint inside the cell; one integer
    comparison settles the rest. Either way, a value exactly at a midpoint gets the smaller
    magnitude and NaN the largest.
    """
    lookup = fmt.lookup
    bits = ops.bitwise_and(ops.view(normalized, "int32"), 0x7FFFFFFF)  # |x|, NaN included
    if fmt.float_map is None:
        shift, base = lookup["lut_shift"], lookup["lut_base"]
        cell = ops.clip(ops.subtract(ops.right_shift(bits, shift), base), 0, lookup["lut"].size - 1)
        entry = ops.take(ops.convert_to_tensor(lookup["lut"]), cell)
        above = ops.greater(ops.bitwise_and(bits, (1 << shift) - 1), ops.right_shift(entry, 8))
        k = ops.add(ops.bitwise_and(entry, 0xFF), ops.cast(above, "int32"))
    else:
        fine_shift, fine_base, coarse_shift, coarse_base, split_bits, _ = lookup["lut"].tolist()
        finite = ops.minimum(bits, 0x7F800000)  # NaN as inf: no int32 overflow below

        def index(shift: int, base: int) -> Any:  # a tie rounds down
            rounded = ops.add(finite, (1 << (shift - 1)) - 1)
            return ops.subtract(ops.right_shift(rounded, shift), base)

        k = index(fine_shift, fine_base)
        if coarse_shift != fine_shift:  # two grids (v's)
            k = ops.where(ops.greater_equal(bits, split_bits), k, index(coarse_shift, coarse_base))
        if fmt.signed:
            half_smallest = int(np.float32(fmt.magnitudes[-1] / 2).view(np.int32))
            k = ops.where(ops.greater(bits, half_smallest), ops.clip(k, 1, fmt.magnitude_count), 0)
        else:
            k = ops.clip(k, 0, fmt.magnitude_count - 1)
    if not fmt.signed:
        return k
    return ops.add(ops.where(ops.less(normalized, 0.0), ops.negative(k), k), lookup["zero"])


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
    inverse = ops.divide(ops.ones_like(safe), safe)  # one division per block, as the kernels
    codes = nearest_codes(ops.multiply(blocks, ops.expand_dims(inverse, 1)), fmt)
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
    if fmt.float_map is None:
        values = ops.take(ops.convert_to_tensor(fmt.table), indices)
    else:  # the float map's values from their bits, as the kernels decode
        if fmt.signed:
            k = ops.subtract(indices, fmt.lookup["zero"])
            magnitude = ops.abs(k)
            bits = ops.where(ops.equal(magnitude, 0), 0, _float_map_bits(magnitude, fmt))
            bits = ops.bitwise_or(bits, ops.where(ops.less(k, 0), -(2**31), 0))
        else:
            bits = _float_map_bits(indices, fmt)
        values = ops.view(ops.cast(bits, "int32"), "float32")
    if values.shape[0] != size:  # int4 of an odd size: one nibble of padding
        values = values[:size]
    blocks = _blocks(values, size, fmt.block_size)
    flat = ops.reshape(ops.multiply(blocks, ops.expand_dims(scales, 1)), (-1,))
    return ops.reshape(flat[:size], shape)


def pack(codes: Any, scales: Any) -> Any:
    """One moment's `(codes, scales)` as the one uint8 buffer a moment is stored in.

    The scales come first, as their float32 bytes (in the machine's order,
    little-endian wherever Keras runs), so that they start where the
    buffer does, aligned; the codes follow. `unpack` is the inverse.
    """
    return ops.concatenate([ops.reshape(ops.view(scales, "uint8"), (-1,)), codes])


def unpack(storage: Any, size: int, fmt: Format) -> tuple[Any, Any]:
    """The `(codes, scales)` of a moment of `size` values stored in `storage` (`pack`)."""
    _, blocks = fmt.stored_bytes(size)
    return storage[4 * blocks :], ops.view(storage[: 4 * blocks], "float32")


class QuantizedMoment:
    """One quantized moment of one variable: an optimizer variable and a format.

    It stands where a moment variable would in the optimizer's slot lists:
    `value` reads it (decoded, float32) and `assign` writes it (encoded).
    The variable holds the scales and the codes in one uint8 buffer
    (`pack`), so that a moment is one buffer, as a float moment is: the
    kernels and the programs that step it take as many arguments.

    Attributes:
        variable: The uint8 variable of `fmt.storage_bytes(size)` bytes.
        shape: The shape of the moment (its model variable's).
        fmt: The format.
    """

    dtype = "float32"

    def __init__(self, variable: keras.Variable, shape: tuple, fmt: Format):
        self.variable = variable
        self.shape = tuple(shape)
        self.fmt = fmt

    @property
    def size(self) -> int:
        """The number of values of the moment."""
        return math.prod(self.shape)

    def stored(self) -> tuple[Any, Any]:
        """The stored `(codes, scales)`."""
        return unpack(self.variable.value, self.size, self.fmt)

    @property
    def value(self) -> Any:
        """The moment, decoded to float32."""
        return decode(*self.stored(), self.shape, self.fmt)

    def assign(self, value: Any) -> None:
        """Store `value` (of `shape`), encoded."""
        self.variable.assign(pack(*encode(value, self.fmt)))

    def numpy(self) -> np.ndarray:
        """The moment, decoded, as a NumPy array."""
        return np.asarray(ops.convert_to_numpy(self.value))

    def __repr__(self) -> str:
        return (
            f"<QuantizedMoment {self.variable.path} shape={self.shape} "
            f"bits={self.fmt.bits} block={self.fmt.block_size}>"
        )
