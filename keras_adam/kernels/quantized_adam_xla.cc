// The quantized Adam step (quantized_adam.h) as an XLA custom call for JAX
// (jax.ffi; keras_adam/kernels/quantized_xla.py builds and registers it).
//
// One call steps several variables of the same hyperparameters, their
// blocks split over threads (quantized_adam_threads.h). Its results alias
// its inputs (each variable, codes and scales; quantized_xla.py passes
// `input_output_aliases`), so XLA hands the call the buffers to update in
// place, copying first only where the inputs are still needed. The scalars
// come in as a buffer (they may be traced values): alpha, 1 - beta1,
// 1 - beta2, epsilon, lambda, lr and sqrt(1 - beta2^t). Without AMSGrad the
// v_hat buffers are empty.

#include <cstdint>
#include <cstring>
#include <vector>

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

// The buffers of one variable: 8 arguments (var, grad, and codes and scales
// of m, v and v_hat) and 7 results (the same but grad).
constexpr size_t kArgs = 8;
constexpr size_t kRets = 7;

// `out` holds `in`'s bytes (they are one buffer when XLA aliased them).
void Same(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  if (out->untyped_data() != in.untyped_data()) {
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  }
}

ffi::Error QuantizedAdam(ffi::Buffer<ffi::F32> m_table, ffi::Buffer<ffi::F32> m_mid,
                         ffi::Buffer<ffi::S32> m_lut, ffi::Buffer<ffi::F32> v_table,
                         ffi::Buffer<ffi::F32> v_mid, ffi::Buffer<ffi::S32> v_lut,
                         ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                         ffi::RemainingRets rets, int32_t bits, int32_t block, int32_t m_zero,
                         int32_t lut_shift, int32_t m_lut_base, int32_t v_lut_base,
                         int32_t flags, int32_t threads) {
  if ((bits != 8 && bits != 4) || block <= 0 || block > 256 || block % 2 != 0) {
    return ffi::Error::InvalidArgument("bits must be 8 or 4 and block even, at most 256");
  }
  for (const ffi::Buffer<ffi::S32>* lut : {&m_lut, &v_lut}) {
    const int64_t size = static_cast<int64_t>(lut->element_count());
    if (!keras_adam::quantized::FloatMap::LutFits(bits, size)) {
      return ffi::Error::InvalidArgument("a lookup has the wrong size: int8 takes 6, int4 at least 1");
    }
  }
  const size_t count = args.size() / kArgs;
  if (args.size() % kArgs != 0 || rets.size() != count * kRets || scalars.element_count() != 7) {
    return ffi::Error::InvalidArgument("expected 8 arguments and 7 results per variable");
  }
  const bool amsgrad = flags & 8;
  std::vector<float*> var(count), m_s(count), v_s(count), vh_s(count);
  std::vector<const float*> grad(count);
  std::vector<uint8_t*> m_c(count), v_c(count), vh_c(count);
  std::vector<int64_t> sizes(count);
  for (size_t k = 0; k < count; ++k) {
    std::vector<ffi::AnyBuffer> in;
    std::vector<ffi::Result<ffi::AnyBuffer>> out;
    for (size_t j = 0; j < kArgs; ++j) {
      auto buffer = args.get<ffi::AnyBuffer>(k * kArgs + j);
      if (buffer.has_error()) return buffer.error();
      in.push_back(*buffer);
    }
    for (size_t j = 0; j < kRets; ++j) {
      auto buffer = rets.get<ffi::AnyBuffer>(k * kRets + j);
      if (buffer.has_error()) return buffer.error();
      out.push_back(*buffer);
    }
    const int64_t n = static_cast<int64_t>(in[0].element_count());
    const int64_t blocks = (n + block - 1) / block;
    const int64_t code_bytes = bits == 8 ? n : (n + 1) / 2;
    const int64_t expected[kArgs] = {n, n, code_bytes, blocks, code_bytes, blocks,
                                     amsgrad ? code_bytes : 0, amsgrad ? blocks : 0};
    const ffi::DataType types[kArgs] = {ffi::F32, ffi::F32, ffi::U8, ffi::F32,
                                        ffi::U8,  ffi::F32, ffi::U8, ffi::F32};
    for (size_t j = 0; j < kArgs; ++j) {
      if (in[j].element_type() != types[j] ||
          (static_cast<int64_t>(in[j].element_count()) != expected[j] && (j < 6 || amsgrad))) {
        return ffi::Error::InvalidArgument("the buffers' types or sizes do not match the variable's");
      }
    }
    // Result r holds argument r (var) or r + 1 (the moments).
    for (size_t r = 0; r < kRets; ++r) Same(in[r == 0 ? 0 : r + 1], out[r]);
    sizes[k] = n;
    var[k] = static_cast<float*>(out[0]->untyped_data());
    grad[k] = static_cast<const float*>(in[1].untyped_data());
    m_c[k] = static_cast<uint8_t*>(out[1]->untyped_data());
    m_s[k] = static_cast<float*>(out[2]->untyped_data());
    v_c[k] = static_cast<uint8_t*>(out[3]->untyped_data());
    v_s[k] = static_cast<float*>(out[4]->untyped_data());
    vh_c[k] = amsgrad ? static_cast<uint8_t*>(out[5]->untyped_data()) : nullptr;
    vh_s[k] = amsgrad ? static_cast<float*>(out[6]->untyped_data()) : nullptr;
  }

  QuantizedScalars s{};
  s.Read(scalars.typed_data());
  s.SetFlags(flags);
  const QuantizedFormat fm =
      Format(bits, block, m_zero, m_table, m_mid, m_lut, lut_shift, m_lut_base);
  const QuantizedFormat fv =
      Format(bits, block, -1, v_table, v_mid, v_lut, lut_shift, v_lut_base);
  const keras_adam::quantized_threads::Tensors t{
      var.data(), grad.data(), m_c.data(),  m_s.data(),   v_c.data(),
      v_s.data(), vh_c.data(), vh_s.data(), sizes.data(), static_cast<int64_t>(count)};
  keras_adam::quantized_threads::Step(t, fm, fv, s, threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasAdamQuantizedAdamXla, QuantizedAdam,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m_table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m_mid
                                  .Arg<ffi::Buffer<ffi::S32>>()  // m_lut
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_mid
                                  .Arg<ffi::Buffer<ffi::S32>>()  // v_lut
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scalars
                                  .RemainingArgs()               // kArgs per variable
                                  .RemainingRets()               // kRets per variable
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("m_zero")
                                  .Attr<int32_t>("lut_shift")
                                  .Attr<int32_t>("m_lut_base")
                                  .Attr<int32_t>("v_lut_base")
                                  .Attr<int32_t>("flags")
                                  .Attr<int32_t>("threads"));
