// The quantized Adam step (quantized_adam.h) as an XLA custom call for JAX
// (jax.ffi; keras_adam/kernels/quantized_xla.py builds and registers it).
//
// One call steps one variable. Its results alias its inputs (the variable,
// codes and scales; quantized_xla.py passes `input_output_aliases`), so XLA
// hands the call the buffers to update in place, copying first only where
// the inputs are still needed. The scalars come in as a buffer (they may be
// traced values): alpha, 1 - beta1, 1 - beta2, epsilon, lambda, lr and
// sqrt(1 - beta2^t). Without AMSGrad the v_hat buffers are empty.

#include <cstdint>
#include <cstring>

#include "quantized_adam_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using keras_adam::QuantizedFormat;
using keras_adam::QuantizedScalars;

QuantizedFormat Format(int32_t bits, int32_t block, int32_t zero, ffi::Buffer<ffi::F32> table,
                       ffi::Buffer<ffi::F32> mid, ffi::Buffer<ffi::S32> lut, int32_t lut_shift,
                       int32_t lut_base) {
  QuantizedFormat f;
  f.bits = bits;
  f.block = block;
  f.zero = zero;
  f.table = table.typed_data();
  f.mid = mid.typed_data();
  f.lut = lut.typed_data();
  f.lut_size = static_cast<int32_t>(lut.element_count());
  f.lut_shift = lut_shift;
  f.lut_base = lut_base;
  return f;
}

// `out` holds `in`'s bytes (they are one buffer when XLA aliased them).
template <typename In, typename Out>
void Same(const In& in, Out& out) {
  if (out->untyped_data() != in.untyped_data()) {
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  }
}

ffi::Error QuantizedAdam(ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> grad,
                         ffi::Buffer<ffi::U8> m_codes, ffi::Buffer<ffi::F32> m_scales,
                         ffi::Buffer<ffi::U8> v_codes, ffi::Buffer<ffi::F32> v_scales,
                         ffi::Buffer<ffi::U8> vh_codes, ffi::Buffer<ffi::F32> vh_scales,
                         ffi::Buffer<ffi::F32> m_table, ffi::Buffer<ffi::F32> m_mid,
                         ffi::Buffer<ffi::S32> m_lut, ffi::Buffer<ffi::F32> v_table,
                         ffi::Buffer<ffi::F32> v_mid, ffi::Buffer<ffi::S32> v_lut,
                         ffi::Buffer<ffi::F32> scalars, ffi::ResultBuffer<ffi::F32> var_out,
                         ffi::ResultBuffer<ffi::U8> m_codes_out,
                         ffi::ResultBuffer<ffi::F32> m_scales_out,
                         ffi::ResultBuffer<ffi::U8> v_codes_out,
                         ffi::ResultBuffer<ffi::F32> v_scales_out,
                         ffi::ResultBuffer<ffi::U8> vh_codes_out,
                         ffi::ResultBuffer<ffi::F32> vh_scales_out, int32_t bits, int32_t block,
                         int32_t m_zero, int32_t lut_shift, int32_t lut_base, int32_t flags,
                         int32_t threads) {
  if ((bits != 8 && bits != 4) || block <= 0 || block > 256 || block % 2 != 0) {
    return ffi::Error::InvalidArgument("bits must be 8 or 4 and block even, at most 256");
  }
  const int64_t n = static_cast<int64_t>(var.element_count());
  const int64_t blocks = (n + block - 1) / block;
  const int64_t code_bytes = bits == 8 ? n : (n + 1) / 2;
  const bool amsgrad = flags & 8;
  if (static_cast<int64_t>(grad.element_count()) != n ||
      static_cast<int64_t>(m_codes.element_count()) != code_bytes ||
      static_cast<int64_t>(v_codes.element_count()) != code_bytes ||
      static_cast<int64_t>(m_scales.element_count()) != blocks ||
      static_cast<int64_t>(v_scales.element_count()) != blocks ||
      (amsgrad && (static_cast<int64_t>(vh_codes.element_count()) != code_bytes ||
                   static_cast<int64_t>(vh_scales.element_count()) != blocks)) ||
      scalars.element_count() != 7) {
    return ffi::Error::InvalidArgument("the buffers' sizes do not match the variable's");
  }
  Same(var, var_out);
  Same(m_codes, m_codes_out);
  Same(m_scales, m_scales_out);
  Same(v_codes, v_codes_out);
  Same(v_scales, v_scales_out);
  Same(vh_codes, vh_codes_out);
  Same(vh_scales, vh_scales_out);

  QuantizedScalars s{};
  s.Read(scalars.typed_data());
  s.maximize = (flags & 1) != 0;
  s.l2 = (flags & 2) != 0;
  s.decoupled = (flags & 4) != 0;
  s.amsgrad = amsgrad;
  s.paper = (flags & 16) != 0;
  const QuantizedFormat fm =
      Format(bits, block, m_zero, m_table, m_mid, m_lut, lut_shift, lut_base);
  const QuantizedFormat fv = Format(bits, block, -1, v_table, v_mid, v_lut, lut_shift, lut_base);

  float* var_data = var_out->typed_data();
  const float* grad_data = grad.typed_data();
  uint8_t* m_c = m_codes_out->typed_data();
  float* m_s = m_scales_out->typed_data();
  uint8_t* v_c = v_codes_out->typed_data();
  float* v_s = v_scales_out->typed_data();
  uint8_t* vh_c = amsgrad ? vh_codes_out->typed_data() : nullptr;
  float* vh_s = amsgrad ? vh_scales_out->typed_data() : nullptr;
  const keras_adam::quantized_threads::Tensors t{&var_data, &grad_data, &m_c, &m_s, &v_c,
                                                 &v_s,      &vh_c,      &vh_s, &n,  1};
  keras_adam::quantized_threads::Step(t, fm, fv, s, threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasAdamQuantizedAdamXla, QuantizedAdam,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad
                                  .Arg<ffi::Buffer<ffi::U8>>()   // m_codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m_scales
                                  .Arg<ffi::Buffer<ffi::U8>>()   // v_codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_scales
                                  .Arg<ffi::Buffer<ffi::U8>>()   // vh_codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vh_scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m_table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m_mid
                                  .Arg<ffi::Buffer<ffi::S32>>()  // m_lut
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_mid
                                  .Arg<ffi::Buffer<ffi::S32>>()  // v_lut
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scalars
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Ret<ffi::Buffer<ffi::U8>>()   // m_codes
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m_scales
                                  .Ret<ffi::Buffer<ffi::U8>>()   // v_codes
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_scales
                                  .Ret<ffi::Buffer<ffi::U8>>()   // vh_codes
                                  .Ret<ffi::Buffer<ffi::F32>>()  // vh_scales
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("m_zero")
                                  .Attr<int32_t>("lut_shift")
                                  .Attr<int32_t>("lut_base")
                                  .Attr<int32_t>("flags")
                                  .Attr<int32_t>("threads"));
