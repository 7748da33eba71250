// Adam on block-wise quantized moments as TensorFlow CPU ops: one pass per
// block (quantized_adam.h: decode, float32 Adam, encode), on the device's
// intra-op thread pool. Two ops:
//
// KerasAdamMultiTensorQuantizedAdam updates the resource variables of N
// model variables (each variable, and its moments' codes and scales) in
// one call, in place, with the resource semantics of TensorFlow's training
// ops (resource_variables.h): every variable's mutex held for the whole
// update, locked in address order; a buffer shared with a pending read is
// copied first and the copy updated.
//
// KerasAdamQuantizedAdam is functional, for one variable (tf.distribute
// steps each variable's components on their own): it reads the variable's
// value, its gradient and the moments' codes and scales, and returns their
// new values, which the caller assigns (keras_adam/backends/tensorflow.py).
// Each output reuses its input's buffer where TensorFlow allows it, else is
// a copy made block by block, just before the block is stepped.
//
// The code tables come in as inputs (keras_adam/quantization.py builds
// them), as do the scalars: alpha, 1 - beta1, 1 - beta2, epsilon, lambda,
// lr and sqrt(1 - beta2^t).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/threadpool.h"

#include "quantized_adam_threads.h"
#include "resource_variables.h"

namespace keras_adam {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
namespace errors = ::tensorflow::errors;

namespace {

enum Input {
  kVar = 0, kGrad, kMCodes, kMScales, kVCodes, kVScales, kVhCodes, kVhScales,
  kMTable, kMMid, kMLut, kVTable, kVMid, kVLut, kScalars, kNumInputs
};

// Each combination in its own function, cloned (KERAS_ADAM_QUANTIZED_CLONES).
#define KERAS_ADAM_QUANTIZED_BLOCKS(NAME, BITS, AMSGRAD, PAPER)                                \
  KERAS_ADAM_QUANTIZED_CLONES void NAME(                                                      \
      float* var, const float* grad, QuantizedMomentData m, QuantizedMomentData v,            \
      QuantizedMomentData vh, int64_t n, const QuantizedFormat& fm, const QuantizedFormat& fv, \
      const QuantizedScalars& s, int64_t begin, int64_t end) {                                \
    QuantizedAdamBlocks<BITS, AMSGRAD, PAPER>(var, grad, m, v, vh, n, fm, fv, s, begin, end); \
  }

KERAS_ADAM_QUANTIZED_BLOCKS(Blocks8, 8, false, false)
KERAS_ADAM_QUANTIZED_BLOCKS(Blocks8Paper, 8, false, true)
KERAS_ADAM_QUANTIZED_BLOCKS(Blocks8Amsgrad, 8, true, false)
KERAS_ADAM_QUANTIZED_BLOCKS(Blocks8AmsgradPaper, 8, true, true)
KERAS_ADAM_QUANTIZED_BLOCKS(Blocks4, 4, false, false)
KERAS_ADAM_QUANTIZED_BLOCKS(Blocks4Paper, 4, false, true)
KERAS_ADAM_QUANTIZED_BLOCKS(Blocks4Amsgrad, 4, true, false)
KERAS_ADAM_QUANTIZED_BLOCKS(Blocks4AmsgradPaper, 4, true, true)

using BlocksFunction = void (*)(float*, const float*, QuantizedMomentData, QuantizedMomentData,
                                QuantizedMomentData, int64_t, const QuantizedFormat&,
                                const QuantizedFormat&, const QuantizedScalars&, int64_t,
                                int64_t);

BlocksFunction Pick(int bits, bool amsgrad, bool paper) {
  if (bits == 8) {
    if (amsgrad) return paper ? &Blocks8AmsgradPaper : &Blocks8Amsgrad;
    return paper ? &Blocks8Paper : &Blocks8;
  }
  if (amsgrad) return paper ? &Blocks4AmsgradPaper : &Blocks4Amsgrad;
  return paper ? &Blocks4Paper : &Blocks4;
}

}  // namespace

// The attributes both ops take: the formats' and the flags.
struct FormatAttrs {
  int bits, block, m_zero, lut_shift, m_lut_base, v_lut_base;
  QuantizedScalars flags{};

  absl::Status Read(OpKernelConstruction* context) {
    TF_RETURN_IF_ERROR(context->GetAttr("bits", &bits));
    TF_RETURN_IF_ERROR(context->GetAttr("block", &block));
    TF_RETURN_IF_ERROR(context->GetAttr("m_zero", &m_zero));
    TF_RETURN_IF_ERROR(context->GetAttr("lut_shift", &lut_shift));
    TF_RETURN_IF_ERROR(context->GetAttr("m_lut_base", &m_lut_base));
    TF_RETURN_IF_ERROR(context->GetAttr("v_lut_base", &v_lut_base));
    int32_t* const targets[5] = {&flags.maximize, &flags.l2, &flags.decoupled, &flags.amsgrad,
                                 &flags.paper};
    const char* const names[5] = {"maximize", "l2", "decoupled", "amsgrad", "paper"};
    for (int k = 0; k < 5; ++k) {
      bool flag;
      TF_RETURN_IF_ERROR(context->GetAttr(names[k], &flag));
      *targets[k] = flag;
    }
    if (!((bits == 8 || bits == 4) && block > 0 && block <= 256 && block % 2 == 0)) {
      return errors::InvalidArgument("bits must be 8 or 4 and block even, at most 256");
    }
    return absl::OkStatus();
  }

  // Whether the lookups of m and v (inputs `table` + 2 and + 5) fit the
  // maps: int8's hold its float maps' parameters (FloatMap reads them).
  absl::Status CheckLuts(OpKernelContext* context, int table) const {
    for (int lut : {table + 2, table + 5}) {
      const int64_t size = context->input(lut).NumElements();
      if (!quantized::FloatMap::LutFits(bits, size)) {
        return errors::InvalidArgument("input ", lut, " (a lookup) has ", size,
                                       " values; int8 takes 6, int4 at least 1");
      }
    }
    return absl::OkStatus();
  }

  // The format of m (or of v) whose table, midpoints and lookup are the
  // inputs from `table` on.
  QuantizedFormat Format(OpKernelContext* context, int table, bool m) const {
    QuantizedFormat f;
    f.bits = bits;
    f.block = block;
    f.zero = m ? m_zero : -1;
    f.table = context->input(table).flat<float>().data();
    f.mid = context->input(table + 1).flat<float>().data();
    const Tensor& lut = context->input(table + 2);
    f.lut = lut.flat<int32_t>().data();
    f.lut_size = static_cast<int32_t>(lut.NumElements());
    f.lut_shift = lut_shift;
    f.lut_base = m ? m_lut_base : v_lut_base;
    return f;
  }
};

class QuantizedAdamOp : public OpKernel {
 public:
  explicit QuantizedAdamOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, attrs_.Read(context));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& var = context->input(kVar);
    const Tensor& grad = context->input(kGrad);
    const int64_t n = var.NumElements();
    const int64_t blocks = (n + attrs_.block - 1) / attrs_.block;
    const int64_t code_bytes = attrs_.bits == 8 ? n : (n + 1) / 2;
    OP_REQUIRES(context, grad.shape() == var.shape(),
                errors::InvalidArgument("grad has shape ", grad.shape().DebugString(),
                                        " but var has ", var.shape().DebugString()));
    const int moments = attrs_.flags.amsgrad ? 3 : 2;
    for (int k = 0; k < moments; ++k) {
      const Tensor& codes = context->input(kMCodes + 2 * k);
      const Tensor& scales = context->input(kMScales + 2 * k);
      OP_REQUIRES(context, codes.NumElements() == code_bytes && scales.NumElements() == blocks,
                  errors::InvalidArgument("moment ", k, " has ", codes.NumElements(),
                                          " code bytes and ", scales.NumElements(),
                                          " scales; expected ", code_bytes, " and ", blocks));
    }
    const Tensor& scalars = context->input(kScalars);
    OP_REQUIRES(context, scalars.NumElements() == 7,
                errors::InvalidArgument("scalars must hold 7 values"));

    // Outputs, forwarded from their inputs where TensorFlow allows.
    Tensor* out[7] = {nullptr};
    const int sources[7] = {kVar, kMCodes, kMScales, kVCodes, kVScales, kVhCodes, kVhScales};
    bool forwarded[7];
    for (int k = 0; k < 7; ++k) {
      const Tensor& input = context->input(sources[k]);
      int forwarded_from = -1;
      OP_REQUIRES_OK(context, context->forward_input_or_allocate_output(
                                  {sources[k]}, k, input.shape(), &out[k], &forwarded_from));
      forwarded[k] = forwarded_from == sources[k];
    }

    QuantizedScalars s = attrs_.flags;
    s.Read(scalars.flat<float>().data());
    OP_REQUIRES_OK(context, attrs_.CheckLuts(context, kMTable));
    const QuantizedFormat fm = attrs_.Format(context, kMTable, true);
    const QuantizedFormat fv = attrs_.Format(context, kVTable, false);
    const BlocksFunction step = Pick(attrs_.bits, s.amsgrad, s.paper);
    const int bits = attrs_.bits;
    const int64_t block = attrs_.block;

    auto work = [&](int64_t begin, int64_t end) {
      // Copy this range's inputs where the outputs are not their buffers.
      const int64_t first = begin * block, last = std::min(end * block, n);
      const int64_t byte_first = bits == 8 ? first : first / 2;
      const int64_t byte_last = bits == 8 ? last : (last + 1) / 2;
      for (int k = 0; k < 7; ++k) {
        if (forwarded[k] || (k >= 5 && !s.amsgrad)) continue;
        const Tensor& input = context->input(sources[k]);
        const bool codes = k == 1 || k == 3 || k == 5;
        const bool value = k == 0;
        const int64_t lo = value ? first : codes ? byte_first : begin;
        const int64_t hi = value ? last : codes ? byte_last : end;
        const size_t size = codes ? 1 : sizeof(float);
        std::memcpy(static_cast<char*>(out[k]->data()) + lo * size,
                    static_cast<const char*>(input.data()) + lo * size, (hi - lo) * size);
      }
      QuantizedMomentData m{static_cast<uint8_t*>(out[1]->data()),
                            static_cast<float*>(out[2]->data())};
      QuantizedMomentData v{static_cast<uint8_t*>(out[3]->data()),
                            static_cast<float*>(out[4]->data())};
      QuantizedMomentData vh{s.amsgrad ? static_cast<uint8_t*>(out[5]->data()) : nullptr,
                             s.amsgrad ? static_cast<float*>(out[6]->data()) : nullptr};
      step(static_cast<float*>(out[0]->data()), grad.flat<float>().data(), m, v, vh, n, fm, fv,
           s, begin, end);
    };
    if (blocks == 0) return;
    // Cycles per block: about 60 per value (decode, step, encode of 2 or 3 moments).
    auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(blocks, 60 * attrs_.block, work);
  }

 private:
  FormatAttrs attrs_;
};

class MultiTensorQuantizedAdamOp : public OpKernel {
 public:
  explicit MultiTensorQuantizedAdamOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("N", &n_));
    OP_REQUIRES_OK(context, context->GetAttr("M", &hat_count_));
    OP_REQUIRES_OK(context, attrs_.Read(context));
    OP_REQUIRES(context, hat_count_ == (attrs_.flags.amsgrad ? n_ : 0),
                errors::InvalidArgument("M must be N with amsgrad, else 0"));
  }

  void Compute(OpKernelContext* context) override {
    const int n = n_;
    const int moments = attrs_.flags.amsgrad ? 3 : 2;
    // Resources: var[0..n), then codes and scales of each moment, n each.
    const int resources = (1 + 2 * moments) * n;
    const int grad_input = resources;
    const int table_input = grad_input + n;
    const Tensor& scalars = context->input(table_input + 6);
    OP_REQUIRES(context, scalars.NumElements() == 7,
                errors::InvalidArgument("scalars must hold 7 values"));

    std::vector<tensorflow::core::RefCountPtr<tensorflow::Var>> vars;
    std::vector<tensorflow::mutex_lock> locks;
    OP_REQUIRES_OK(context, LockResourceInputs(context, resources, &vars, &locks));

    // Validate before touching anything. Resource r of variable i is
    // vars[r * n + i]: r = 0 the variable, then codes and scales per moment.
    const int64_t block = attrs_.block;
    for (int i = 0; i < n; ++i) {
      const Tensor& grad = context->input(grad_input + i);
      const int64_t size = grad.NumElements();
      const int64_t blocks = (size + block - 1) / block;
      const int64_t code_bytes = attrs_.bits == 8 ? size : (size + 1) / 2;
      for (int r = 0; r < 1 + 2 * moments; ++r) {
        tensorflow::Var* var = vars[r * n + i].get();
        OP_REQUIRES(context, var->is_initialized && var->tensor()->IsInitialized(),
                    errors::FailedPrecondition("resource ", r, " of variable ", i,
                                               " is uninitialized"));
        const Tensor* t = var->tensor();
        const bool codes = r > 0 && r % 2 == 1;
        const tensorflow::DataType dtype = codes ? tensorflow::DT_UINT8 : tensorflow::DT_FLOAT;
        const int64_t expected = r == 0 ? size : codes ? code_bytes : blocks;
        OP_REQUIRES(context, t->dtype() == dtype && t->NumElements() == expected &&
                                 (r != 0 || t->shape() == grad.shape()),
                    errors::InvalidArgument(
                        "resource ", r, " of variable ", i, " has dtype ",
                        tensorflow::DataTypeString(t->dtype()), " and shape ",
                        t->shape().DebugString(), "; expected ", tensorflow::DataTypeString(dtype),
                        " of ", expected, " values for a gradient of shape ",
                        grad.shape().DebugString()));
      }
    }
    // Copy-on-write where a buffer is shared (as PrepareToUpdateVariable):
    // the copy holds the old values and is updated in place.
    for (int j = 0; j < resources; ++j) {
      tensorflow::Var* var = vars[j].get();
      if (var->copy_on_read_mode.load() || !var->tensor()->RefCountIsOne()) {
        Tensor fresh;
        tsl::AllocatorAttributes attr;
        attr.set_gpu_compatible(true);
        attr.set_nic_compatible(true);
        OP_REQUIRES_OK(context, context->allocate_temp(var->tensor()->dtype(),
                                                       var->tensor()->shape(), &fresh, attr));
        std::memcpy(fresh.data(), var->tensor()->data(), fresh.TotalBytes());
        *var->tensor() = fresh;
      }
    }

    std::vector<float*> var(n), m_s(n), v_s(n), vh_s(n);
    std::vector<const float*> grad(n);
    std::vector<uint8_t*> m_c(n), v_c(n), vh_c(n);
    std::vector<int64_t> sizes(n);
    auto data = [&](int r, int i) { return vars[r * n + i]->tensor()->data(); };
    for (int i = 0; i < n; ++i) {
      sizes[i] = context->input(grad_input + i).NumElements();
      grad[i] = context->input(grad_input + i).flat<float>().data();
      var[i] = static_cast<float*>(data(0, i));
      m_c[i] = static_cast<uint8_t*>(data(1, i));
      m_s[i] = static_cast<float*>(data(2, i));
      v_c[i] = static_cast<uint8_t*>(data(3, i));
      v_s[i] = static_cast<float*>(data(4, i));
      vh_c[i] = attrs_.flags.amsgrad ? static_cast<uint8_t*>(data(5, i)) : nullptr;
      vh_s[i] = attrs_.flags.amsgrad ? static_cast<float*>(data(6, i)) : nullptr;
    }
    QuantizedScalars s = attrs_.flags;
    s.Read(scalars.flat<float>().data());
    OP_REQUIRES_OK(context, attrs_.CheckLuts(context, table_input));
    const QuantizedFormat fm = attrs_.Format(context, table_input, true);
    const QuantizedFormat fv = attrs_.Format(context, table_input + 3, false);
    const quantized_threads::Tensors t{var.data(), grad.data(), m_c.data(),  m_s.data(),
                                       v_c.data(), v_s.data(),  vh_c.data(), vh_s.data(),
                                       sizes.data(), n};
    int64_t total = 0;
    for (int i = 0; i < n; ++i) total += quantized_threads::Blocks(sizes[i], block);
    if (total == 0) return;
    // Cycles per block: about 60 per value (decode, step, encode of 2 or 3 moments).
    auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(total, 60 * block, [&](int64_t begin, int64_t end) {
      quantized_threads::Range(t, fm, fv, s, begin, end, nullptr);
    });
  }

 private:
  int n_, hat_count_;
  FormatAttrs attrs_;
};

}  // namespace keras_adam

namespace tensorflow {

// The inputs and attributes both ops share (FormatAttrs reads the attributes).
#define KERAS_ADAM_QUANTIZED_TABLE_INPUTS                                              \
  .Input("m_table: float").Input("m_mid: float").Input("m_lut: int32")                \
      .Input("v_table: float").Input("v_mid: float").Input("v_lut: int32")            \
      .Input("scalars: float")
#define KERAS_ADAM_QUANTIZED_FORMAT_ATTRS                                              \
  .Attr("bits: int").Attr("block: int").Attr("m_zero: int").Attr("lut_shift: int")    \
      .Attr("m_lut_base: int").Attr("v_lut_base: int").Attr("maximize: bool")         \
      .Attr("l2: bool").Attr("decoupled: bool").Attr("amsgrad: bool").Attr("paper: bool")

REGISTER_OP("KerasAdamQuantizedAdam")
    .Input("var: float")
    .Input("grad: float")
    .Input("m_codes: uint8")
    .Input("m_scales: float")
    .Input("v_codes: uint8")
    .Input("v_scales: float")
    .Input("v_hat_codes: uint8")
    .Input("v_hat_scales: float")
    KERAS_ADAM_QUANTIZED_TABLE_INPUTS
    .Output("var_out: float")
    .Output("m_codes_out: uint8")
    .Output("m_scales_out: float")
    .Output("v_codes_out: uint8")
    .Output("v_scales_out: float")
    .Output("v_hat_codes_out: uint8")
    .Output("v_hat_scales_out: float")
    KERAS_ADAM_QUANTIZED_FORMAT_ATTRS
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      const int sources[7] = {0, 2, 3, 4, 5, 6, 7};
      for (int k = 0; k < 7; ++k) c->set_output(k, c->input(sources[k]));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Adam on block-wise quantized moments (keras_adam/quantization.py): decode
m and v (and v_hat with amsgrad; else empty inputs), step in float32,
encode; returns the new variable, codes and scales. scalars holds alpha,
1 - beta1, 1 - beta2, epsilon, lambda, lr and sqrt(1 - beta2^t).
)doc");

REGISTER_KERNEL_BUILDER(Name("KerasAdamQuantizedAdam").Device(DEVICE_CPU),
                        ::keras_adam::QuantizedAdamOp);

REGISTER_OP("KerasAdamMultiTensorQuantizedAdam")
    .Input("var: N * resource")
    .Input("m_codes: N * resource")
    .Input("m_scales: N * resource")
    .Input("v_codes: N * resource")
    .Input("v_scales: N * resource")
    .Input("v_hat_codes: M * resource")
    .Input("v_hat_scales: M * resource")
    .Input("grad: N * float")
    KERAS_ADAM_QUANTIZED_TABLE_INPUTS
    .Attr("N: int >= 1")
    .Attr("M: int >= 0")
    KERAS_ADAM_QUANTIZED_FORMAT_ATTRS
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc(R"doc(
Adam on block-wise quantized moments of N variables at once, in place:
var, and each moment's codes (uint8) and scales (float32), are resource
variables (M = N v_hat ones with amsgrad, else none); grad one dense tensor
per variable. scalars holds alpha, 1 - beta1, 1 - beta2, epsilon, lambda,
lr and sqrt(1 - beta2^t).
)doc");

REGISTER_KERNEL_BUILDER(Name("KerasAdamMultiTensorQuantizedAdam").Device(DEVICE_CPU),
                        ::keras_adam::MultiTensorQuantizedAdamOp);

}  // namespace tensorflow
