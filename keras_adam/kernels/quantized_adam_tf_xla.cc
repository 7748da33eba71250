// The quantized Adam step (quantized_adam.h) as an XLA custom call for
// TensorFlow's XLA: `tf.function(jit_compile=True)`, where TensorFlow ops
// without an XLA kernel, ours included, cannot run
// (keras_adam/kernels/quantized_tf_xla.py builds this library and emits
// the call with XlaCustomCallV2).
//
// XlaCustomCallV2 calls a target of XLA's "status returning, unified" API,
// found by name in XLA's registry of custom-call targets, where
// `keras_adam_quantized_tf_xla_register` puts it (the registry lives in
// TensorFlow's libtensorflow_cc, which the library links against). That
// API passes raw pointers only: the sizes come in the call's opaque
// string, and the results do not alias the operands, so the call steps out
// of place: each piece of blocks is copied from the operands into the
// results just before it is stepped there, while it is in cache
// (quantized_threads::Sources).
// It cannot report an error (XLA does not export the status setter):
// quantized_tf_xla.py checks every shape when it builds the call.
//
// Operands: the tables of m and v (table, midpoints, lut each), the 7
// scalars, then 5 per variable (var, grad, m, v and v_hat; each moment one
// uint8 buffer, its scales then its codes, v_hat's empty without AMSGrad).
// Results: 4 per variable (the same but grad). Opaque: "bits block m_zero lut_shift m_lut_base
// v_lut_base flags threads m_lut_size v_lut_size count n_0 ... n_{count-1}".

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "quantized_adam_threads.h"
#include "xla/service/custom_call_target_registry.h"

struct XlaCustomCallStatus_;

namespace {

using keras_adam::QuantizedFormat;
using keras_adam::QuantizedScalars;

constexpr size_t kFixed = 7;  // the tables of m and v, and the scalars
constexpr size_t kArgs = 5;   // per variable
constexpr size_t kRets = 4;

struct Config {
  int bits = 0, block = 0, m_zero = 0, lut_shift = 0, m_lut_base = 0, v_lut_base = 0;
  int flags = 0, threads = 1, m_lut_size = 0, v_lut_size = 0;
  std::vector<int64_t> sizes;

  bool Parse(const char* opaque, size_t length) {
    std::istringstream in(std::string(opaque, length));
    int64_t count = -1;
    in >> bits >> block >> m_zero >> lut_shift >> m_lut_base >> v_lut_base >> flags >> threads >>
        m_lut_size >> v_lut_size >> count;
    if (!in || count < 0 || (bits != 8 && bits != 4) || block <= 0 || block > 256) return false;
    sizes.resize(count);
    for (auto& n : sizes) in >> n;
    return static_cast<bool>(in);
  }
};

QuantizedFormat Format(const Config& c, const void* const* tables, bool m) {
  return {c.bits,
          c.block,
          m ? c.m_zero : -1,
          static_cast<const float*>(tables[0]),
          static_cast<const float*>(tables[1]),
          static_cast<const int32_t*>(tables[2]),
          m ? c.m_lut_size : c.v_lut_size,
          c.lut_shift,
          m ? c.m_lut_base : c.v_lut_base};
}

}  // namespace

extern "C" void KerasAdamQuantizedAdamTfXla(void* out, const void** in, const char* opaque,
                                            size_t opaque_len, XlaCustomCallStatus_* /*status*/) {
  Config c;
  if (!c.Parse(opaque, opaque_len)) return;  // quantized_tf_xla.py builds the string
  void** results = static_cast<void**>(out);
  const size_t count = c.sizes.size();
  QuantizedScalars s{};
  s.Read(static_cast<const float*>(in[6]));
  s.SetFlags(c.flags);
  std::vector<float*> var(count);
  std::vector<const float*> grad(count), from_var(count);
  std::vector<uint8_t*> m(count), v(count), vh(count);
  std::vector<const uint8_t*> from_m(count), from_v(count), from_vh(count);
  for (size_t k = 0; k < count; ++k) {
    // Result j is operand j (var) or j + 1 (the moments, after grad), stepped.
    const void* const* a = in + kFixed + k * kArgs;
    void* const* r = results + k * kRets;
    from_var[k] = static_cast<const float*>(a[0]);
    grad[k] = static_cast<const float*>(a[1]);
    from_m[k] = static_cast<const uint8_t*>(a[2]);
    from_v[k] = static_cast<const uint8_t*>(a[3]);
    from_vh[k] = s.amsgrad ? static_cast<const uint8_t*>(a[4]) : nullptr;
    var[k] = static_cast<float*>(r[0]);
    m[k] = static_cast<uint8_t*>(r[1]);
    v[k] = static_cast<uint8_t*>(r[2]);
    vh[k] = s.amsgrad ? static_cast<uint8_t*>(r[3]) : nullptr;
  }
  const QuantizedFormat fm = Format(c, in, true);
  const QuantizedFormat fv = Format(c, in + 3, false);
  const keras_adam::quantized_threads::Tensors t{
      var.data(), grad.data(), m.data(), v.data(), vh.data(), c.sizes.data(),
      static_cast<int64_t>(count)};
  const keras_adam::quantized_threads::Sources from{from_var.data(), from_m.data(),
                                                    from_v.data(), from_vh.data()};
  keras_adam::quantized_threads::Step(t, fm, fv, s, c.threads, &from);
}

// Registers the target with TensorFlow's XLA, unless a target of its name
// is registered already: by this library loaded from another path (tests
// build into several caches), where registering again would abort (XLA
// refuses a name at a second address). Returns 1 if it registered, else 0.
extern "C" int keras_adam_quantized_tf_xla_register() {
  static const std::string kTarget = "keras_adam_quantized_adam", kPlatform = "Host";
  xla::CustomCallTargetRegistry* registry = xla::CustomCallTargetRegistry::Global();
  if (registry->Lookup(kTarget, kPlatform) != nullptr) return 0;
  registry->Register(kTarget, reinterpret_cast<void*>(&KerasAdamQuantizedAdamTfXla), kPlatform);
  return 1;
}
