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
#include <cstring>
#include <thread>
#include <vector>

#include "quantized_adam.h"

namespace keras_adam {
namespace quantized_threads {

using keras_adam::QuantizedFormat;
using keras_adam::QuantizedMomentData;
using keras_adam::QuantizedScalars;

// Each moment is one buffer: its scales, then its codes (quantized_storage).
struct Tensors {
  float* const* var;
  const float* const* grad;
  uint8_t* const* m;
  uint8_t* const* v;
  uint8_t* const* vh;  // null without AMSGrad
  const int64_t* sizes;
  int64_t count;
};

// What an out-of-place call reads (TensorFlow's XLA custom call, whose
// results do not alias its operands): each piece of blocks is copied from
// here into the `Tensors` just before it is stepped, while it stays in
// cache, rather than all of them first.
struct Sources {
  const float* const* var;
  const uint8_t* const* m;
  const uint8_t* const* v;
  const uint8_t* const* vh;  // null without AMSGrad
};

using quantized_storage::Blocks;

// Copies blocks [begin, end) of variable k (n values) from `from` into `t`.
inline void CopyBlocks(const Tensors& t, const Sources& from, int64_t k, int64_t n, int bits,
                       int64_t block, int64_t begin, int64_t end) {
  const int64_t first = begin * block, last = std::min(end * block, n);
  std::memcpy(t.var[k] + first, from.var[k] + first, (last - first) * sizeof(float));
  quantized_storage::CopyBlocks(t.m[k], from.m[k], n, bits, block, begin, end);
  quantized_storage::CopyBlocks(t.v[k], from.v[k], n, bits, block, begin, end);
  if (t.vh != nullptr && t.vh[k] != nullptr) {
    quantized_storage::CopyBlocks(t.vh[k], from.vh[k], n, bits, block, begin, end);
  }
}

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

// Blocks [first, last) of the numbering over all tensors (out of place,
// from `from`, if it is not null: a piece of kPiece blocks at a time).
KERAS_ADAM_QUANTIZED_CLONES static void Range(const Tensors& t, const QuantizedFormat& fm,
                             const QuantizedFormat& fv, const QuantizedScalars& s,
                             int64_t first, int64_t last, const Sources* from) {
  constexpr int64_t kPiece = 32;  // 8 192 values (int8): 32 KB of variable
  int64_t offset = 0;
  for (int64_t k = 0; k < t.count && offset < last; ++k) {
    const int64_t blocks = Blocks(t.sizes[k], fm.block);
    const int64_t begin = std::max(first - offset, int64_t{0});
    const int64_t end = std::min(last - offset, blocks);
    if (begin < end) {
      const int64_t n = t.sizes[k];
      const QuantizedMomentData m = quantized_storage::Parts(t.m[k], n, fm.block);
      const QuantizedMomentData v = quantized_storage::Parts(t.v[k], n, fm.block);
      const QuantizedMomentData vh =
          quantized_storage::Parts(s.amsgrad ? t.vh[k] : nullptr, n, fm.block);
      if (from == nullptr) {
        Dispatch(t.var[k], t.grad[k], m, v, vh, n, fm, fv, s, begin, end);
      } else {
        for (int64_t piece = begin; piece < end; piece += kPiece) {
          const int64_t piece_end = std::min(piece + kPiece, end);
          CopyBlocks(t, *from, k, n, fm.bits, fm.block, piece, piece_end);
          Dispatch(t.var[k], t.grad[k], m, v, vh, n, fm, fv, s, piece, piece_end);
        }
      }
    }
    offset += blocks;
  }
}

// One step of the `t.count` variables of `t`, over at most `threads` threads;
// out of place from `from` if it is not null.
inline void Step(const Tensors& t, const QuantizedFormat& fm, const QuantizedFormat& fv,
                 const QuantizedScalars& s, int64_t threads, const Sources* from = nullptr) {
  int64_t total = 0;
  for (int64_t k = 0; k < t.count; ++k) total += Blocks(t.sizes[k], fm.block);
  // A thread costs tens of microseconds to start: each takes at least
  // kMinBlocks blocks (about 100 microseconds of work).
  constexpr int64_t kMinBlocks = 512;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, total / kMinBlocks));
  std::vector<std::thread> workers;
  for (int64_t p = 1; p < parts; ++p) {
    workers.emplace_back(
        [&, p] { Range(t, fm, fv, s, total * p / parts, total * (p + 1) / parts, from); });
  }
  Range(t, fm, fv, s, 0, total / parts, from);
  for (auto& worker : workers) worker.join();
}

}  // namespace quantized_threads
}  // namespace keras_adam

#endif  // KERAS_ADAM_KERNELS_QUANTIZED_ADAM_THREADS_H_
