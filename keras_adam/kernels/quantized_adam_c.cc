// The quantized Adam step (quantized_adam.h) behind a C interface, for
// ctypes (keras_adam/kernels/quantized.py, used by the torch engine). No
// TensorFlow: this library builds and loads without it.
//
// One call steps several variables. Their blocks are numbered one after
// the other and split into contiguous ranges over `threads` threads (the
// calling thread takes the first range), so that large and small
// variables share the work evenly.

#include <cstdint>
#include <thread>
#include <vector>

#include "quantized_adam.h"

namespace {

using keras_adam::QuantizedFormat;
using keras_adam::QuantizedMomentData;
using keras_adam::QuantizedScalars;

struct Tensors {
  float* const* var;
  const float* const* grad;
  uint8_t* const* m_codes;
  float* const* m_scales;
  uint8_t* const* v_codes;
  float* const* v_scales;
  uint8_t* const* vh_codes;  // null without AMSGrad
  float* const* vh_scales;
  const int64_t* sizes;
  int64_t count;
};

int64_t Blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

template <int BITS>
void DispatchFlags(float* var, const float* grad, QuantizedMomentData m, QuantizedMomentData v,
                   QuantizedMomentData vh, int64_t n, const QuantizedFormat& fm,
                   const QuantizedFormat& fv, const QuantizedScalars& s, int64_t begin,
                   int64_t end) {
  if (s.amsgrad) {
    if (s.paper) {
      keras_adam::QuantizedAdamBlocks<BITS, true, true>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
    } else {
      keras_adam::QuantizedAdamBlocks<BITS, true, false>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
    }
  } else if (s.paper) {
    keras_adam::QuantizedAdamBlocks<BITS, false, true>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
  } else {
    keras_adam::QuantizedAdamBlocks<BITS, false, false>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
  }
}

void Dispatch(float* var, const float* grad, QuantizedMomentData m, QuantizedMomentData v,
              QuantizedMomentData vh, int64_t n, const QuantizedFormat& fm,
              const QuantizedFormat& fv, const QuantizedScalars& s, int64_t begin, int64_t end) {
  if (fm.bits == 8) {
    DispatchFlags<8>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
  } else {
    DispatchFlags<4>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
  }
}

// Blocks [first, last) of the numbering over all tensors.
KERAS_ADAM_QUANTIZED_CLONES void Range(const Tensors& t, const QuantizedFormat& fm,
                             const QuantizedFormat& fv, const QuantizedScalars& s,
                             int64_t first, int64_t last) {
  int64_t offset = 0;
  for (int64_t k = 0; k < t.count && offset < last; ++k) {
    const int64_t blocks = Blocks(t.sizes[k], fm.block);
    const int64_t begin = std::max(first - offset, int64_t{0});
    const int64_t end = std::min(last - offset, blocks);
    if (begin < end) {
      QuantizedMomentData m{t.m_codes[k], t.m_scales[k]};
      QuantizedMomentData v{t.v_codes[k], t.v_scales[k]};
      QuantizedMomentData vh{s.amsgrad ? t.vh_codes[k] : nullptr,
                             s.amsgrad ? t.vh_scales[k] : nullptr};
      Dispatch(t.var[k], t.grad[k], m, v, vh, t.sizes[k], fm, fv, s, begin, end);
    }
    offset += blocks;
  }
}

}  // namespace

extern "C" {

// The ABI version; quantized.py checks it before any call.
int32_t keras_adam_quantized_abi() { return 1; }

// One step of `count` float32 variables with quantized moments. Returns 0.
int32_t keras_adam_quantized_adam(float* const* var, const float* const* grad,
                                  uint8_t* const* m_codes, float* const* m_scales,
                                  uint8_t* const* v_codes, float* const* v_scales,
                                  uint8_t* const* vh_codes, float* const* vh_scales,
                                  const int64_t* sizes, int64_t count,
                                  const QuantizedFormat* fm, const QuantizedFormat* fv,
                                  const QuantizedScalars* s, int32_t threads) {
  const Tensors t{var, grad, m_codes, m_scales, v_codes, v_scales, vh_codes, vh_scales, sizes,
                  count};
  int64_t total = 0;
  for (int64_t k = 0; k < count; ++k) total += Blocks(sizes[k], fm->block);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, total));
  std::vector<std::thread> workers;
  for (int64_t p = 1; p < parts; ++p) {
    workers.emplace_back([&, p] { Range(t, *fm, *fv, *s, total * p / parts, total * (p + 1) / parts); });
  }
  Range(t, *fm, *fv, *s, 0, total / parts);
  for (auto& worker : workers) worker.join();
  return 0;
}

}  // extern "C"
