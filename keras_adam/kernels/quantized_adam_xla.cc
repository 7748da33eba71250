// The quantized Adam step (quantized_adam.h) as an XLA custom call for JAX
// (jax.ffi; keras_adam/kernels/quantized_xla.py builds and registers it).
//
// One call steps several variables of the same hyperparameters, their
// blocks split over threads (quantized_adam_threads.h). Its results alias
// its inputs (each variable, codes and scales; quantized_xla.py passes
// `input_output_aliases`), so XLA hands the call the buffers to update in
// place, copying first only where the inputs are still needed. The scalars
// come in as a buffer (they may be traced values): alpha, 1 - beta1,
// 1 - beta2, epsilon, lambda, lr and sqrt(1 - beta2^t). Each moment is one
// uint8 buffer, its scales then its codes (quantized_storage). Without
// AMSGrad the v_hat buffer is empty.

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
  return {bits,
          block,
          zero,
          table.typed_data(),
          mid.typed_data(),
          lut.typed_data(),
          static_cast<int32_t>(lut.element_count()),
          lut_shift,
          lut_base};
}

// The buffers of one variable: 5 arguments (var, grad, m, v and v_hat) and 4
// results (the same but grad).
constexpr size_t kArgs = 5;
constexpr size_t kRets = 4;

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
    return ffi::Error::InvalidArgument("expected 5 arguments and 4 results per variable");
  }
  const bool amsgrad = flags & 8;
  std::vector<float*> var(count);
  std::vector<const float*> grad(count);
  std::vector<uint8_t*> m(count), v(count), vh(count);
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
    const int64_t bytes = keras_adam::quantized_storage::Bytes(n, bits, block);
    const int64_t expected[kArgs] = {n, n, bytes, bytes, amsgrad ? bytes : 0};
    const ffi::DataType types[kArgs] = {ffi::F32, ffi::F32, ffi::U8, ffi::U8, ffi::U8};
    for (size_t j = 0; j < kArgs; ++j) {
      if (in[j].element_type() != types[j] ||
          static_cast<int64_t>(in[j].element_count()) != expected[j]) {
        return ffi::Error::InvalidArgument("the buffers' types or sizes do not match the variable's");
      }
    }
    // Result r holds argument r (var) or r + 1 (the moments).
    for (size_t r = 0; r < kRets; ++r) Same(in[r == 0 ? 0 : r + 1], out[r]);
    sizes[k] = n;
    var[k] = static_cast<float*>(out[0]->untyped_data());
    grad[k] = static_cast<const float*>(in[1].untyped_data());
    m[k] = static_cast<uint8_t*>(out[1]->untyped_data());
    v[k] = static_cast<uint8_t*>(out[2]->untyped_data());
    vh[k] = amsgrad ? static_cast<uint8_t*>(out[3]->untyped_data()) : nullptr;
  }

  QuantizedScalars s{};
  s.Read(scalars.typed_data());
  s.SetFlags(flags);
  const QuantizedFormat fm =
      Format(bits, block, m_zero, m_table, m_mid, m_lut, lut_shift, m_lut_base);
  const QuantizedFormat fv =
      Format(bits, block, -1, v_table, v_mid, v_lut, lut_shift, v_lut_base);
  const keras_adam::quantized_threads::Tensors t{
      var.data(), grad.data(), m.data(), v.data(), vh.data(), sizes.data(),
      static_cast<int64_t>(count)};
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
