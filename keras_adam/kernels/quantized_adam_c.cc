// The quantized Adam step (quantized_adam.h) behind a C interface, for
// ctypes (keras_adam/kernels/quantized.py, used by the torch engine). No
// TensorFlow: this library builds and loads without it. One call steps
// several variables, split over threads (quantized_adam_threads.h).

#include <cstdint>

#include "quantized_adam_threads.h"

using keras_adam::QuantizedFormat;
using keras_adam::QuantizedScalars;

extern "C" {

// The ABI version; quantized.py checks it before any call.
int32_t keras_adam_quantized_abi() { return 4; }

// Nonzero: run the portable loops even where a faster path exists (tests
// compare both). Returns whether the faster path exists on this machine.
int32_t keras_adam_quantized_portable_only(int32_t portable) {
  keras_adam::quantized::PortableOnly().store(portable != 0);
#ifdef KERAS_ADAM_HAVE_AVX512_PATH
  return keras_adam::quantized::CpuHasAvx512();
#else
  return 0;
#endif
}

// One step of `count` float32 variables with quantized moments, each moment
// one buffer (quantized_storage: scales, then codes; `vh` null without
// AMSGrad). Returns 0.
int32_t keras_adam_quantized_adam(float* const* var, const float* const* grad, uint8_t* const* m,
                                  uint8_t* const* v, uint8_t* const* vh, const int64_t* sizes,
                                  int64_t count, const QuantizedFormat* fm,
                                  const QuantizedFormat* fv, const QuantizedScalars* s,
                                  int32_t threads) {
  const keras_adam::quantized_threads::Tensors t{var, grad, m, v, vh, sizes, count};
  keras_adam::quantized_threads::Step(t, *fm, *fv, *s, threads);
  return 0;
}

}  // extern "C"
