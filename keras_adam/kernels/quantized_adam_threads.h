// Several variables' quantized Adam steps in one call, their blocks split
// over threads: the driver shared by the ctypes library (quantized_adam_c.cc,
// torch) and the XLA custom call (quantized_adam_xla.cc, JAX).
//
// The blocks of all variables are numbered one after the other and split
// into contiguous ranges, one per thread (the calling thread takes the
// first), so that large and small variables share the work evenly.

#ifndef KERAS_ADAM_KERNELS_QUANTIZED_ADAM_THREADS_H_
#define KERAS_ADAM_KERNELS_QUANTIZED_ADAM_THREADS_H_

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "quantized_adam.h"

namespace keras_adam {
namespace quantized_threads {

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

inline int64_t Blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

template <int BITS>
inline void DispatchFlags(float* var, const float* grad, QuantizedMomentData m, QuantizedMomentData v,
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

inline void Dispatch(float* var, const float* grad, QuantizedMomentData m, QuantizedMomentData v,
              QuantizedMomentData vh, int64_t n, const QuantizedFormat& fm,
              const QuantizedFormat& fv, const QuantizedScalars& s, int64_t begin, int64_t end) {
  if (fm.bits == 8) {
    DispatchFlags<8>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
  } else {
    DispatchFlags<4>(var, grad, m, v, vh, n, fm, fv, s, begin, end);
  }
}

// Blocks [first, last) of the numbering over all tensors.
KERAS_ADAM_QUANTIZED_CLONES static void Range(const Tensors& t, const QuantizedFormat& fm,
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

// One step of the `t.count` variables of `t`, over at most `threads` threads.
inline void Step(const Tensors& t, const QuantizedFormat& fm, const QuantizedFormat& fv,
                 const QuantizedScalars& s, int64_t threads) {
  int64_t total = 0;
  for (int64_t k = 0; k < t.count; ++k) total += Blocks(t.sizes[k], fm.block);
  // A thread costs tens of microseconds to start: each takes at least
  // kMinBlocks blocks (about 100 microseconds of work).
  constexpr int64_t kMinBlocks = 512;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, total / kMinBlocks));
  std::vector<std::thread> workers;
  for (int64_t p = 1; p < parts; ++p) {
    workers.emplace_back([&, p] { Range(t, fm, fv, s, total * p / parts, total * (p + 1) / parts); });
  }
  Range(t, fm, fv, s, 0, total / parts);
  for (auto& worker : workers) worker.join();
}

}  // namespace quantized_threads
}  // namespace keras_adam

#endif  // KERAS_ADAM_KERNELS_QUANTIZED_ADAM_THREADS_H_
