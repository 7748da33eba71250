// The Adam step on block-wise quantized moments (keras_adam/quantization.py),
// one pass per block: decode m, v (and v_hat), step in float32, encode.
//
// The math is keras_adam/update_rule.py's adam_step, operation for
// operation (built with -ffp-contract=off), for Keras's "hat" epsilon and
// the paper's, decoupled and L2 weight decay, maximize and AMSGrad:
//
//   g   <- -g (maximize);  g <- g - var * (-lambda) (L2)
//   m   <- m + (g - m) * one_minus_beta1
//   v   <- v + (g * g - v) * one_minus_beta2
//   vh  <- max(vh, v) (AMSGrad; the denominator uses vh)
//   var <- var - var * lambda * lr (decoupled decay)
//   var <- var - (m * alpha) / (sqrt(v) + epsilon)                    (hat)
//   var <- var - alpha * (m / (sqrt(v) / bias_correction_2_sqrt + eps)) (paper)
//
// Encoding takes each value's nearest code, as quantization.encode: the
// value is multiplied by the inverse of its block's absmax. int8's float map
// rounds the float32 bits of its magnitude to its grid's mantissa bits (3
// for m; for v 4 near the block's absmax and 3 below), and the rounded
// bits, shifted and offset, are its magnitude's index. For int4's
// decade map, a lookup table indexed by the top bits of the magnitude's
// float32 representation gives the nearest code to the low end of its cell
// and the low bits of the one midpoint inside the cell, if any, and one
// integer comparison settles the rest (Python builds the table so that no
// cell holds more than that one midpoint).
//
// The loops here are portable C++ that compilers vectorize; on x86-64 with
// AVX-512, quantized_adam_avx512.h runs the same operations by hand (its
// comment says why). No TensorFlow here: quantized_adam_c.cc exposes the
// step to ctypes (the torch engine) and quantized_adam.cc as a TF op.

#ifndef KERAS_ADAM_KERNELS_QUANTIZED_ADAM_H_
#define KERAS_ADAM_KERNELS_QUANTIZED_ADAM_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

// Callers compile the step for several instruction sets, picked at load time
// (as adam_step.h's loop), flattened so that each clone holds the whole step.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERAS_ADAM_QUANTIZED_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#else
#define KERAS_ADAM_QUANTIZED_CLONES
#endif

namespace keras_adam {

// How one moment is quantized (quantization.Format and its lookup arrays).
// int8 has a float map (its `lut` holds the map's six parameters, FloatMap),
// int4 the decade map. An aggregate: the TensorFlow ops and the XLA calls
// brace-initialize it in the order of its fields, which quantized.py's
// ctypes `_Format` mirrors.
struct QuantizedFormat {
  int32_t bits;              // 8 or 4 (two codes per byte, low nibble first)
  int32_t block;             // values per scale (<= 256)
  int32_t zero;              // signed maps: the code of 0; unsigned: -1
  const float* table;        // code -> value in [-1, 1], ascending
  const float* mid;          // decade map: magnitude index k -> midpoint to k + 1 (+inf last)
  // Decade map: cell -> (low bits of the midpoint inside the cell, all ones
  // if none) << 8 | the magnitude index nearest to the cell's low end.
  const int32_t* lut;
  int32_t lut_size;
  // Decade map: cell = (bits of |y| >> lut_shift) - lut_base.
  int32_t lut_shift;
  int32_t lut_base;
};

// One quantized moment's codes and block scales.
struct QuantizedMomentData {
  uint8_t* codes;
  float* scales;
};

// A moment of n values is stored in one uint8 buffer (quantization.pack):
// the float32 scale of each of its blocks first (so they are aligned as the
// buffer is), then its codes.
namespace quantized_storage {

inline int64_t Blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }
inline int64_t CodeBytes(int64_t n, int bits) { return bits == 8 ? n : (n + 1) / 2; }
inline int64_t Bytes(int64_t n, int bits, int64_t block) {
  return static_cast<int64_t>(sizeof(float)) * Blocks(n, block) + CodeBytes(n, bits);
}

// The codes and scales inside `storage` (null: both null).
inline QuantizedMomentData Parts(uint8_t* storage, int64_t n, int64_t block) {
  if (storage == nullptr) return {nullptr, nullptr};
  return {storage + sizeof(float) * Blocks(n, block), reinterpret_cast<float*>(storage)};
}

// Copies the scales and codes of blocks [begin, end) from `from` into `to`.
inline void CopyBlocks(uint8_t* to, const uint8_t* from, int64_t n, int bits, int64_t block,
                       int64_t begin, int64_t end) {
  const int64_t first = begin * block, last = std::min(end * block, n);
  // int4: blocks start at even values, so a block's codes start a byte.
  const int64_t code_first = bits == 8 ? first : first / 2;
  const int64_t code_last = bits == 8 ? last : (last + 1) / 2;
  const int64_t codes = sizeof(float) * Blocks(n, block);
  std::memcpy(to + sizeof(float) * begin, from + sizeof(float) * begin,
              sizeof(float) * (end - begin));
  std::memcpy(to + codes + code_first, from + codes + code_first, code_last - code_first);
}

}  // namespace quantized_storage

struct QuantizedScalars {
  float alpha, one_minus_beta1, one_minus_beta2, epsilon;
  float weight_decay, learning_rate, bias_correction_2_sqrt;
  int32_t maximize, l2, decoupled, amsgrad, paper;

  // Sets the floats from the 7 values the TensorFlow op and the XLA call
  // receive (backends/engine.py's quantized_kernel_scalars, in its order).
  void Read(const float* values) {
    alpha = values[0];
    one_minus_beta1 = values[1];
    one_minus_beta2 = values[2];
    epsilon = values[3];
    weight_decay = values[4];
    learning_rate = values[5];
    bias_correction_2_sqrt = values[6];
  }

  // Sets the flags from the bits the XLA calls receive (quantized.FLAG_BITS).
  void SetFlags(int32_t bits) {
    maximize = (bits & 1) != 0;
    l2 = (bits & 2) != 0;
    decoupled = (bits & 4) != 0;
    amsgrad = (bits & 8) != 0;
    paper = (bits & 16) != 0;
  }
};

namespace quantized {

// Set (tests, through quantized_adam_c.cc) to run the portable loops even
// where a faster path exists.
inline std::atomic<bool>& PortableOnly() {
  static std::atomic<bool> portable{false};
  return portable;
}

template <int BITS>
inline int Code(const uint8_t* codes, int64_t i) {
  if constexpr (BITS == 8) {
    return codes[i];
  } else {
    return (codes[i >> 1] >> ((i & 1) * 4)) & 15;
  }
}

// The float map's magnitudes: 127 beside 0 (signed), 256 (unsigned).
template <bool SIGNED>
constexpr int kFloatMagnitudes = SIGNED ? 127 : 256;

// int8's float map (quantization.FloatMap), from its format's `lut`: a fine
// grid from `split_bits` (the bits of 2^-fine_binades) up, a coarse one
// below. Magnitude index k has the bits (k + fine_base) << fine_shift from
// `split_index` up, else (k + coarse_base) << coarse_shift.
struct FloatMap {
  // The length of an int8 format's `lut`.
  static constexpr int kParameters = 6;

  // Whether a `lut` of `size` values fits a format of `bits`: int8's holds
  // the six parameters, int4's at least one cell.
  static bool LutFits(int bits, int64_t size) {
    return bits == 8 ? size == kParameters : size >= 1;
  }

  int fine_shift = 0, fine_base = 0, coarse_shift = 0, coarse_base = 0;
  uint32_t split_bits = 0;
  int split_index = 0;

  explicit FloatMap(const QuantizedFormat& f) {
    if (f.bits != 8) return;  // int4: the decade map
    fine_shift = f.lut[0];
    fine_base = f.lut[1];
    coarse_shift = f.lut[2];
    coarse_base = f.lut[3];
    split_bits = static_cast<uint32_t>(f.lut[4]);
    split_index = f.lut[5];
  }

  // The bits of magnitude index k (k >= 0; signed maps call it with k >= 1).
  uint32_t Bits(int k) const {
    return k >= split_index ? static_cast<uint32_t>(k + fine_base) << fine_shift
                            : static_cast<uint32_t>(k + coarse_base) << coarse_shift;
  }
};

// The float map's magnitude index of a magnitude's bits `u`: rounded to its
// grid's mantissa bits (a tie down; NaN, above every finite value, to the
// largest), clamped to the map; signed, 0 for at most half the smallest
// magnitude.
template <bool SIGNED>
inline int FloatMapIndex(uint32_t u, const FloatMap& map) {
  const bool fine = u >= map.split_bits;
  const int shift = fine ? map.fine_shift : map.coarse_shift;
  const int base = fine ? map.fine_base : map.coarse_base;
  int k = static_cast<int>((u + ((1u << (shift - 1)) - 1)) >> shift) - base;
  if constexpr (SIGNED) {
    const uint32_t half_smallest = map.Bits(1) - (1u << 23);
    k = std::min(std::max(k, 1), kFloatMagnitudes<true>);
    return u > half_smallest ? k : 0;
  } else {
    return std::min(std::max(k, 0), kFloatMagnitudes<false> - 1);
  }
}

// The nearest code of y = value * (1 / absmax) (|y| <= 1). Branch-free, so
// that the encoding loops vectorize (the decade map: a gather from `lut`).
template <int BITS, bool SIGNED>
inline int Encode(float y, const QuantizedFormat& f, const FloatMap& map) {
  const float a = std::fabs(y);
  const uint32_t u = __builtin_bit_cast(uint32_t, a);
  int k;
  if constexpr (BITS == 8) {
    k = FloatMapIndex<SIGNED>(u, map);
  } else {
    int cell = static_cast<int>(u >> f.lut_shift) - f.lut_base;
    cell = std::min(std::max(cell, 0), f.lut_size - 1);
    const uint32_t entry = static_cast<uint32_t>(f.lut[cell]);
    k = static_cast<int>(entry & 0xffu);
    k += (u & ((1u << f.lut_shift) - 1)) > (entry >> 8);
  }
  if constexpr (SIGNED) {
    return f.zero + (y < 0 ? -k : k);
  } else {
    return k;
  }
}

// The largest |x| of `count` values (NaN wins, as in keras.ops.max), compared
// as integers: for non-negative floats the bit patterns sort as the values.
inline float AbsMax(const float* x, int64_t count) {
  uint32_t top = 0;
  for (int64_t j = 0; j < count; ++j) {
    const uint32_t u = __builtin_bit_cast(uint32_t, x[j]) & 0x7fffffffu;
    top = u > top ? u : top;
  }
  return __builtin_bit_cast(float, top);
}

// The float map's value of `code` (FloatMapIndex's inverse): code 127 + k
// is ±magnitude k (0 for k = 0) signed, code k magnitude k unsigned.
template <bool SIGNED>
inline float FloatMapValue(int code, const FloatMap& map) {
  if constexpr (SIGNED) {
    const int k = code - kFloatMagnitudes<true>;
    const int a = k < 0 ? -k : k;
    const uint32_t bits = a == 0 ? 0u : map.Bits(a);
    return __builtin_bit_cast(float, bits | (k < 0 ? 0x80000000u : 0u));
  } else {
    return __builtin_bit_cast(float, map.Bits(code));
  }
}

// Decodes codes [begin, begin + count) with their block's scale.
template <int BITS, bool SIGNED>
inline void Load(float* out, const uint8_t* codes, float scale, int64_t begin, int64_t count,
                 const QuantizedFormat& f) {
  const FloatMap map(f);
  for (int64_t j = 0; j < count; ++j) {
    const int code = Code<BITS>(codes, begin + j);
    if constexpr (BITS == 8) {
      out[j] = FloatMapValue<SIGNED>(code, map) * scale;
    } else {
      out[j] = f.table[code] * scale;
    }
  }
}

// Encodes `values` with their block's absmax into codes [begin, begin + count).
template <int BITS, bool SIGNED>
inline void Store(uint8_t* __restrict__ codes, const float* __restrict__ values, float absmax,
                  int64_t begin, int64_t count, const QuantizedFormat& format) {
  // A copy: stores through `codes` (bytes) could alias the caller's struct.
  const QuantizedFormat f = format;
  const FloatMap map(f);
  const float inverse = 1.0f / (absmax > 0 ? absmax : 1.0f);
  // Codes first as 32-bit integers (a loop of one element width, which
  // vectorizes, gathers included), then narrowed to bytes.
  alignas(64) int32_t code[258];
  for (int64_t j = 0; j < count; ++j) code[j] = Encode<BITS, SIGNED>(values[j] * inverse, f, map);
  if constexpr (BITS == 8) {
    for (int64_t j = 0; j < count; ++j) codes[begin + j] = static_cast<uint8_t>(code[j]);
  } else {
    // Blocks start at even positions; an odd tail pads with the code of 0.
    code[count] = Encode<BITS, SIGNED>(0.0f, f, map);
    uint8_t* __restrict__ out = codes + (begin >> 1);
    const int64_t pairs = (count + 1) / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      out[j] = static_cast<uint8_t>(code[2 * j] | (code[2 * j + 1] << 4));
    }
  }
}

}  // namespace quantized
}  // namespace keras_adam

#include "quantized_adam_avx512.h"

namespace keras_adam {

// The step of the blocks [block_begin, block_end) of one variable of n values.
template <int BITS, bool AMSGRAD, bool PAPER>
inline void QuantizedAdamBlocks(float* __restrict__ var, const float* __restrict__ grad,
                                QuantizedMomentData m, QuantizedMomentData v,
                                QuantizedMomentData v_hat, int64_t n, const QuantizedFormat& fm,
                                const QuantizedFormat& fv, const QuantizedScalars& s,
                                int64_t block_begin, int64_t block_end) {
#ifdef KERAS_ADAM_HAVE_AVX512_PATH
  if (quantized::HasAvx512()) {
    quantized::QuantizedAdamBlocksAvx512<BITS, AMSGRAD, PAPER>(var, grad, m, v, v_hat, n, fm, fv,
                                                              s, block_begin, block_end);
    return;
  }
#endif
  const int64_t block = fm.block;
  const float sign = s.maximize ? -1.0f : 1.0f;
  const float l2 = s.l2 ? -s.weight_decay : 0.0f;
  const float decay = s.decoupled ? s.weight_decay : 0.0f;
  alignas(64) float mb[256], vb[256], hb[256];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * block;
    const int64_t count = std::min(block, n - begin);
    float* __restrict__ p = var + begin;
    const float* __restrict__ g = grad + begin;
    quantized::Load<BITS, true>(mb, m.codes, m.scales[b], begin, count, fm);
    quantized::Load<BITS, false>(vb, v.codes, v.scales[b], begin, count, fv);
    if constexpr (AMSGRAD) {
      quantized::Load<BITS, false>(hb, v_hat.codes, v_hat.scales[b], begin, count, fv);
    }
    for (int64_t j = 0; j < count; ++j) {
      float pj = p[j];
      float gj = g[j] * sign;
      if (s.l2) gj = gj - pj * l2;
      const float mj = mb[j] + (gj - mb[j]) * s.one_minus_beta1;
      const float vj = vb[j] + (gj * gj - vb[j]) * s.one_minus_beta2;
      float denominator_v = vj;
      if constexpr (AMSGRAD) {
        const float hj = (vj > hb[j] || vj != vj) ? vj : hb[j];
        hb[j] = hj;
        denominator_v = hj;
      }
      if (s.decoupled) pj = pj - pj * decay * s.learning_rate;
      if constexpr (PAPER) {
        pj = pj - s.alpha * (mj / (std::sqrt(denominator_v) / s.bias_correction_2_sqrt +
                                   s.epsilon));
      } else {
        pj = pj - (mj * s.alpha) / (std::sqrt(denominator_v) + s.epsilon);
      }
      p[j] = pj;
      mb[j] = mj;
      vb[j] = vj;
    }
    const float m_max = quantized::AbsMax(mb, count);
    const float v_max = quantized::AbsMax(vb, count);
    m.scales[b] = m_max;
    v.scales[b] = v_max;
    quantized::Store<BITS, true>(m.codes, mb, m_max, begin, count, fm);
    quantized::Store<BITS, false>(v.codes, vb, v_max, begin, count, fv);
    if constexpr (AMSGRAD) {
      const float h_max = quantized::AbsMax(hb, count);
      v_hat.scales[b] = h_max;
      quantized::Store<BITS, false>(v_hat.codes, hb, h_max, begin, count, fv);
    }
  }
}

}  // namespace keras_adam

#endif  // KERAS_ADAM_KERNELS_QUANTIZED_ADAM_H_
