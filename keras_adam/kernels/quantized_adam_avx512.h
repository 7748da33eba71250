// quantized_adam.h's step, written with AVX-512 intrinsics: the same
// operations in the same order on 16 values at a time, so that it gives the
// portable loop's numbers bit for bit (tests/torch/
// test_quantized_kernel_paths.py compares both; the Keras-level tests
// compare the default path with the NumPy transcription).
//
// Why by hand: int4's step is two table lookups per moment (decode a code,
// encode a value). Compilers tuned for x86-64 in general emulate gathers
// with scalar loads, and the gather instructions themselves are slow on
// these CPUs (on AMD by design, on Intel since the Downfall microcode).
// Here int4 codes decode by one register permute of the 16-value table and
// values encode by a binary search of the midpoints held in a register;
// int8's float maps decode and encode by integer operations on the bits
// (two grids for v, both computed, one picked per lane).
// Codes are stored 64 at a time, narrowed by packs: masked byte loads and
// stores, and the narrowing moves (vpmovdb), are slow on AMD, and took a
// third of the step. The variable and the gradient are prefetched ahead of
// the loop. On 8.4M values (one core of an AMD EPYC) the int8 step takes
// 0.34 ns per value (1.4 with the decade map and its lookups, 0.57 with
// the float map and narrowing moves), torch's fused float32 Adam 0.40, and
// int4 0.53.
//
// Picked at run time (`quantized::HasAvx512`); other machines run the
// portable loop.

#ifndef KERAS_ADAM_KERNELS_QUANTIZED_ADAM_AVX512_H_
#define KERAS_ADAM_KERNELS_QUANTIZED_ADAM_AVX512_H_

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERAS_ADAM_HAVE_AVX512_PATH 1

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#define KERAS_ADAM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace keras_adam {
namespace quantized {

// Whether the CPU has the instructions of this path.
inline bool CpuHasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

// Whether to take this path: the CPU has it and `PortableOnly()` is unset.
inline bool HasAvx512() { return CpuHasAvx512() && !PortableOnly().load(std::memory_order_relaxed); }

// The first min(count, 16) lanes.
KERAS_ADAM_AVX512 inline __mmask16 Lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
}

// 16 codes from position i (a multiple of 16), of which `rest` are the
// block's (lanes past them read as code 0).
template <int BITS>
KERAS_ADAM_AVX512 inline __m512i LoadCodes(const uint8_t* codes, int64_t i, int64_t rest) {
  if constexpr (BITS == 8) {
    if (rest >= 16) {
      return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    }
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(Lanes(rest), codes + i));
  } else {
    // 8 bytes of two codes each (low nibble first), one byte per 64-bit
    // lane; the byte, and the byte shifted by 28, put its low nibble in the
    // lane's low half and its high nibble in its high half.
    const __mmask16 bytes = Lanes((std::min<int64_t>(rest, 16) + 1) / 2);
    const __m128i loaded =
        rest >= 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2))
                   : _mm_maskz_loadu_epi8(bytes, codes + i / 2);
    const __m512i packed = _mm512_cvtepu8_epi64(loaded);
    const __m512i pairs = _mm512_or_si512(packed, _mm512_slli_epi64(packed, 28));
    return _mm512_and_si512(pairs, _mm512_set1_epi32(15));
  }
}

// quantized::FloatMap on 16 lanes: its fields broadcast.
struct FloatMapLanes {
  __m512i fine_base, coarse_base, fine_round, coarse_round, split_bits, split_index;
  __m512i half_smallest;
  __m128i fine_shift, coarse_shift;

  KERAS_ADAM_AVX512 explicit FloatMapLanes(const FloatMap& map) {
    const auto round = [](int shift) { return shift > 0 ? (1 << (shift - 1)) - 1 : 0; };
    fine_base = _mm512_set1_epi32(map.fine_base);
    coarse_base = _mm512_set1_epi32(map.coarse_base);
    fine_round = _mm512_set1_epi32(round(map.fine_shift));  // int4: all 0, unused
    coarse_round = _mm512_set1_epi32(round(map.coarse_shift));
    split_bits = _mm512_set1_epi32(static_cast<int32_t>(map.split_bits));
    split_index = _mm512_set1_epi32(map.split_index);
    half_smallest = _mm512_set1_epi32(static_cast<int32_t>(map.Bits(1) - (1u << 23)));
    fine_shift = _mm_cvtsi32_si128(map.fine_shift);
    coarse_shift = _mm_cvtsi32_si128(map.coarse_shift);
  }

  // FloatMap::Bits of 16 magnitude indices.
  KERAS_ADAM_AVX512 __m512i Bits(__m512i k) const {
    const __m512i fine = _mm512_sll_epi32(_mm512_add_epi32(k, fine_base), fine_shift);
    const __m512i coarse = _mm512_sll_epi32(_mm512_add_epi32(k, coarse_base), coarse_shift);
    return _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(k, split_index), coarse, fine);
  }

  // FloatMapIndex of 16 magnitudes' bits, before clamping.
  KERAS_ADAM_AVX512 __m512i Index(__m512i u) const {
    const __m512i fine =
        _mm512_sub_epi32(_mm512_srl_epi32(_mm512_add_epi32(u, fine_round), fine_shift), fine_base);
    const __m512i coarse = _mm512_sub_epi32(
        _mm512_srl_epi32(_mm512_add_epi32(u, coarse_round), coarse_shift), coarse_base);
    return _mm512_mask_blend_epi32(_mm512_cmpge_epu32_mask(u, split_bits), coarse, fine);
  }
};

// A map in registers, to decode and encode: int4's 16-value table and its
// midpoints; int8's float map.
template <int BITS>
struct Table {
  __m512 part, mid16;
  FloatMapLanes map;
  __m512i zero;

  KERAS_ADAM_AVX512 explicit Table(const QuantizedFormat& f) : map(FloatMap(f)) {
    const bool is_signed = f.zero >= 0;
    const int size = is_signed ? (1 << BITS) - 1 : 1 << BITS;
    // int4: the midpoints (7 signed, 15 unsigned, then +inf).
    const int mids = is_signed ? 8 : 16;
    part = BITS == 4 ? _mm512_maskz_loadu_ps(__mmask16((1u << size) - 1), f.table)
                     : _mm512_setzero_ps();
    mid16 = BITS == 4 ? _mm512_mask_loadu_ps(_mm512_set1_ps(__builtin_inff()),
                                             __mmask16((1u << mids) - 1), f.mid)
                      : _mm512_setzero_ps();
    zero = _mm512_set1_epi32(f.zero);
  }

  // The values of 16 codes (no gathers: on AMD, and on Intel since the
  // Downfall microcode, a permute is several times faster than a gather).
  template <bool SIGNED>
  KERAS_ADAM_AVX512 __m512 Lookup(__m512i code) const {
    if constexpr (BITS == 4) {
      return _mm512_permutexvar_ps(code, part);
    } else if constexpr (!SIGNED) {
      return _mm512_castsi512_ps(map.Bits(code));
    } else {
      // Code 127 + k for magnitude index k: ±magnitude k, 0 for k = 0.
      const __m512i k = _mm512_sub_epi32(code, _mm512_set1_epi32(kFloatMagnitudes<true>));
      const __m512i a = _mm512_abs_epi32(k);
      const __m512i bits = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(a, a), map.Bits(a));
      return _mm512_castsi512_ps(
          _mm512_or_si512(bits, _mm512_and_si512(k, _mm512_set1_epi32(int32_t(0x80000000u)))));
    }
  }

  // The nearest magnitude index of 16 magnitudes `a` of |y| <= 1 (NaN: the
  // largest), as quantized::Encode finds it.
  template <bool SIGNED>
  KERAS_ADAM_AVX512 __m512i NearestMagnitude(__m512 a) const {
    if constexpr (BITS == 4) {
      // A binary search of the midpoints in a register (7 and +inf signed,
      // 15 and +inf unsigned): the number of midpoints below a.
      __m512i k = _mm512_setzero_si512();
      for (int half = SIGNED ? 4 : 8; half >= 1; half /= 2) {
        const __m512 probe =
            _mm512_permutexvar_ps(_mm512_add_epi32(k, _mm512_set1_epi32(half - 1)), mid16);
        const __mmask16 above = _mm512_cmp_ps_mask(a, probe, _CMP_NLE_UQ);
        k = _mm512_mask_add_epi32(k, above, k, _mm512_set1_epi32(half));
      }
      return k;
    } else {
      // quantized::FloatMapIndex on 16 lanes.
      const __m512i u = _mm512_castps_si512(a);
      const __m512i k = map.Index(u);
      if constexpr (SIGNED) {
        const __m512i clamped = _mm512_min_epi32(_mm512_max_epi32(k, _mm512_set1_epi32(1)),
                                                 _mm512_set1_epi32(kFloatMagnitudes<true>));
        return _mm512_maskz_mov_epi32(_mm512_cmpgt_epu32_mask(u, map.half_smallest), clamped);
      } else {
        return _mm512_min_epi32(_mm512_max_epi32(k, _mm512_setzero_si512()),
                                _mm512_set1_epi32(kFloatMagnitudes<false> - 1));
      }
    }
  }

  // quantized::Encode on 16 values y = x * (1 / absmax).
  template <bool SIGNED>
  KERAS_ADAM_AVX512 __m512i Encode(__m512 y) const {
    const __m512 a = _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(0x7fffffff)));
    __m512i k = NearestMagnitude<SIGNED>(a);
    if constexpr (SIGNED) {
      k = _mm512_mask_sub_epi32(k, _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ),
                                _mm512_setzero_si512(), k);
      return _mm512_add_epi32(k, zero);
    } else {
      return k;
    }
  }
};

// Encodes the block's `count` values (lanes past it are 0 in `values`).
template <int BITS, bool SIGNED>
KERAS_ADAM_AVX512 inline void StoreBlock(uint8_t* codes, const float* values, float absmax,
                                         int64_t begin, int64_t count,
                                         const Table<BITS>& table) {
  const __m512 inverse = _mm512_set1_ps(1.0f / (absmax > 0 ? absmax : 1.0f));
  int64_t j = 0;
  // 64 codes at a time: narrowed by two saturating packs (every code fits
  // a byte) and put back in order by one permute (the packs work within
  // each 128-bit lane), then stored whole.
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (; j + 64 <= count; j += 64) {
    __m512i c[4];
    for (int q = 0; q < 4; ++q) {
      const __m512 y = _mm512_mul_ps(_mm512_load_ps(values + j + 16 * q), inverse);
      c[q] = table.template Encode<SIGNED>(y);
    }
    const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]),
                                               _mm512_packus_epi32(c[2], c[3]));
    const __m512i bytes = _mm512_permutexvar_epi32(order, packed);
    if constexpr (BITS == 8) {
      _mm512_storeu_si512(codes + begin + j, bytes);
    } else {
      // Each 16-bit word holds two codes (even, odd); even | odd << 4 into
      // its low byte, then the words narrowed to bytes.
      const __m512i words =
          _mm512_or_si512(_mm512_and_si512(bytes, _mm512_set1_epi16(0x0f)),
                          _mm512_and_si512(_mm512_srli_epi16(bytes, 4), _mm512_set1_epi16(0xf0)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + (begin + j) / 2),
                          _mm512_cvtepi16_epi8(words));
    }
  }
  // The rest of a short block, 16 at a time.
  for (; j < count; j += 16) {
    const __mmask16 lanes = Lanes(count - j);
    const __m512 y = _mm512_mul_ps(_mm512_load_ps(values + j), inverse);
    const __m512i code = table.template Encode<SIGNED>(y);
    if constexpr (BITS == 8) {
      _mm_mask_storeu_epi8(codes + begin + j, lanes, _mm512_cvtepi32_epi8(code));
    } else {
      // Lanes 2k and 2k + 1 into byte k; an odd last lane pairs with the
      // code of 0 (values past `count` are 0).
      const __m512i pairs = _mm512_or_si512(code, _mm512_srli_epi64(code, 28));
      const int64_t rest = std::min<int64_t>(count - j, 16);
      const __mmask8 bytes = __mmask8((1u << ((rest + 1) / 2)) - 1);
      _mm_mask_storeu_epi8(codes + (begin + j) / 2, bytes, _mm512_cvtepi64_epi8(pairs));
    }
  }
}

KERAS_ADAM_AVX512 inline float AbsMaxLanes(__m512i top) {
  return __builtin_bit_cast(float, _mm512_reduce_max_epu32(top));
}

// QuantizedAdamBlocks (quantized_adam.h) on AVX-512.
template <int BITS, bool AMSGRAD, bool PAPER>
KERAS_ADAM_AVX512 void QuantizedAdamBlocksAvx512(
    float* __restrict__ var, const float* __restrict__ grad, QuantizedMomentData m,
    QuantizedMomentData v, QuantizedMomentData v_hat, int64_t n, const QuantizedFormat& fm,
    const QuantizedFormat& fv, const QuantizedScalars& s, int64_t block_begin,
    int64_t block_end) {
  const int64_t block = fm.block;
  const __m512 sign = _mm512_set1_ps(s.maximize ? -1.0f : 1.0f);
  const __m512 l2 = _mm512_set1_ps(s.l2 ? -s.weight_decay : 0.0f);
  const __m512 decay = _mm512_set1_ps(s.decoupled ? s.weight_decay : 0.0f);
  const __m512 lr = _mm512_set1_ps(s.learning_rate);
  const __m512 b1 = _mm512_set1_ps(s.one_minus_beta1);
  const __m512 b2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 alpha = _mm512_set1_ps(s.alpha);
  const __m512 eps = _mm512_set1_ps(s.epsilon);
  const __m512 bc2 = _mm512_set1_ps(s.bias_correction_2_sqrt);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  const Table<BITS> m_table(fm), v_table(fv);
  // Values ahead to prefetch the variable and gradient from: the step does
  // too little per byte for the hardware prefetcher alone to keep up.
  constexpr int64_t kAhead = 2048;
  alignas(64) float mb[256], vb[256], hb[256];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * block;
    const int64_t count = std::min(block, n - begin);
    const __m512 m_scale = _mm512_set1_ps(m.scales[b]);
    const __m512 v_scale = _mm512_set1_ps(v.scales[b]);
    const __m512 h_scale = _mm512_set1_ps(AMSGRAD ? v_hat.scales[b] : 0.0f);
    __m512i m_top = _mm512_setzero_si512(), v_top = m_top, h_top = m_top;
    for (int64_t j = 0; j < count; j += 16) {
      const __mmask16 lanes = Lanes(count - j);
      const int64_t i = begin + j;
      _mm_prefetch(reinterpret_cast<const char*>(var + i + kAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(grad + i + kAhead), _MM_HINT_T0);
      const __m512 mj0 = _mm512_mul_ps(m_table.template Lookup<true>(LoadCodes<BITS>(m.codes, i, count - j)), m_scale);
      const __m512 vj0 = _mm512_mul_ps(v_table.template Lookup<false>(LoadCodes<BITS>(v.codes, i, count - j)), v_scale);
      const bool full = count - j >= 16;
      __m512 pj = full ? _mm512_loadu_ps(var + i) : _mm512_maskz_loadu_ps(lanes, var + i);
      __m512 gj = full ? _mm512_loadu_ps(grad + i) : _mm512_maskz_loadu_ps(lanes, grad + i);
      gj = _mm512_mul_ps(gj, sign);
      if (s.l2) gj = _mm512_sub_ps(gj, _mm512_mul_ps(pj, l2));
      __m512 mj = _mm512_add_ps(mj0, _mm512_mul_ps(_mm512_sub_ps(gj, mj0), b1));
      __m512 vj = _mm512_add_ps(vj0, _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(gj, gj), vj0), b2));
      __m512 denominator_v = vj;
      if constexpr (AMSGRAD) {
        const __m512 hj0 =
            _mm512_mul_ps(v_table.template Lookup<false>(LoadCodes<BITS>(v_hat.codes, i, count - j)), h_scale);
        const __mmask16 take = _mm512_cmp_ps_mask(vj, hj0, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(vj, vj, _CMP_UNORD_Q);
        __m512 hj = _mm512_mask_blend_ps(take, hj0, vj);
        hj = _mm512_maskz_mov_ps(lanes, hj);
        _mm512_store_ps(hb + j, hj);
        h_top = _mm512_max_epu32(h_top, _mm512_and_si512(_mm512_castps_si512(hj), magnitude));
        denominator_v = hj;
      }
      if (s.decoupled) pj = _mm512_sub_ps(pj, _mm512_mul_ps(_mm512_mul_ps(pj, decay), lr));
      const __m512 root = _mm512_sqrt_ps(denominator_v);
      if constexpr (PAPER) {
        pj = _mm512_sub_ps(
            pj, _mm512_mul_ps(alpha, _mm512_div_ps(mj, _mm512_add_ps(_mm512_div_ps(root, bc2), eps))));
      } else {
        pj = _mm512_sub_ps(pj, _mm512_div_ps(_mm512_mul_ps(mj, alpha), _mm512_add_ps(root, eps)));
      }
      if (full) {
        _mm512_storeu_ps(var + i, pj);
      } else {
        _mm512_mask_storeu_ps(var + i, lanes, pj);
      }
      mj = _mm512_maskz_mov_ps(lanes, mj);
      vj = _mm512_maskz_mov_ps(lanes, vj);
      _mm512_store_ps(mb + j, mj);
      _mm512_store_ps(vb + j, vj);
      m_top = _mm512_max_epu32(m_top, _mm512_and_si512(_mm512_castps_si512(mj), magnitude));
      v_top = _mm512_max_epu32(v_top, _mm512_and_si512(_mm512_castps_si512(vj), magnitude));
    }
    const float m_max = AbsMaxLanes(m_top);
    const float v_max = AbsMaxLanes(v_top);
    m.scales[b] = m_max;
    v.scales[b] = v_max;
    StoreBlock<BITS, true>(m.codes, mb, m_max, begin, count, m_table);
    StoreBlock<BITS, false>(v.codes, vb, v_max, begin, count, v_table);
    if constexpr (AMSGRAD) {
      const float h_max = AbsMaxLanes(h_top);
      v_hat.scales[b] = h_max;
      StoreBlock<BITS, false>(v_hat.codes, hb, h_max, begin, count, v_table);
    }
  }
}

}  // namespace quantized
}  // namespace keras_adam

#endif  // x86-64 GCC
#endif  // KERAS_ADAM_KERNELS_QUANTIZED_ADAM_AVX512_H_
