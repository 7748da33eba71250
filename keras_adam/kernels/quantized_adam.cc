// Adam on block-wise quantized moments as a TensorFlow CPU op: one pass per
// block (quantized_adam.h: decode, float32 Adam, encode), on the device's
// intra-op thread pool.
//
// Functional: the op reads the variable's value, its gradient and the
// moments' codes and scales, and returns their new values, which the caller
// assigns (keras_adam/backends/tensorflow.py). Each output reuses its
// input's buffer where TensorFlow allows it, else is a copy made block by
// block, just before the block is stepped. The code tables come in as
// inputs (keras_adam/quantization.py builds them), as do the scalars:
// alpha, 1 - beta1, 1 - beta2, epsilon, lambda, lr and sqrt(1 - beta2^t).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/threadpool.h"

#include "quantized_adam.h"

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

class QuantizedAdamOp : public OpKernel {
 public:
  explicit QuantizedAdamOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("bits", &bits_));
    OP_REQUIRES_OK(context, context->GetAttr("block", &block_));
    OP_REQUIRES_OK(context, context->GetAttr("m_zero", &m_zero_));
    OP_REQUIRES_OK(context, context->GetAttr("lut_shift", &lut_shift_));
    OP_REQUIRES_OK(context, context->GetAttr("lut_base", &lut_base_));
    bool flag;
    OP_REQUIRES_OK(context, context->GetAttr("maximize", &flag));
    flags_.maximize = flag;
    OP_REQUIRES_OK(context, context->GetAttr("l2", &flag));
    flags_.l2 = flag;
    OP_REQUIRES_OK(context, context->GetAttr("decoupled", &flag));
    flags_.decoupled = flag;
    OP_REQUIRES_OK(context, context->GetAttr("amsgrad", &flag));
    flags_.amsgrad = flag;
    OP_REQUIRES_OK(context, context->GetAttr("paper", &flag));
    flags_.paper = flag;
    OP_REQUIRES(context, (bits_ == 8 || bits_ == 4) && block_ > 0 && block_ <= 256 &&
                             block_ % 2 == 0,
                errors::InvalidArgument("bits must be 8 or 4 and block even, at most 256"));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& var = context->input(kVar);
    const Tensor& grad = context->input(kGrad);
    const int64_t n = var.NumElements();
    const int64_t blocks = (n + block_ - 1) / block_;
    const int64_t code_bytes = bits_ == 8 ? n : (n + 1) / 2;
    OP_REQUIRES(context, grad.shape() == var.shape(),
                errors::InvalidArgument("grad has shape ", grad.shape().DebugString(),
                                        " but var has ", var.shape().DebugString()));
    const int moments = flags_.amsgrad ? 3 : 2;
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

    QuantizedScalars s = flags_;
    s.Read(scalars.flat<float>().data());
    const QuantizedFormat fm = Format(context, kMTable, m_zero_);
    const QuantizedFormat fv = Format(context, kVTable, -1);
    const BlocksFunction step = Pick(bits_, s.amsgrad, s.paper);
    const int bits = bits_;
    const int64_t block = block_;

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
    pool->ParallelFor(blocks, 60 * block_, work);
  }

 private:
  // The format whose table, midpoints and lookup are the inputs from `table` on.
  QuantizedFormat Format(OpKernelContext* context, int table, int zero) const {
    QuantizedFormat f;
    f.bits = bits_;
    f.block = block_;
    f.zero = zero;
    f.table = context->input(table).flat<float>().data();
    f.mid = context->input(table + 1).flat<float>().data();
    const Tensor& lut = context->input(table + 2);
    f.lut = lut.flat<int32_t>().data();
    f.lut_size = static_cast<int32_t>(lut.NumElements());
    f.lut_shift = lut_shift_;
    f.lut_base = lut_base_;
    return f;
  }

  int bits_, block_, m_zero_, lut_shift_, lut_base_;
  QuantizedScalars flags_{};
};

}  // namespace keras_adam

namespace tensorflow {

REGISTER_OP("KerasAdamQuantizedAdam")
    .Input("var: float")
    .Input("grad: float")
    .Input("m_codes: uint8")
    .Input("m_scales: float")
    .Input("v_codes: uint8")
    .Input("v_scales: float")
    .Input("v_hat_codes: uint8")
    .Input("v_hat_scales: float")
    .Input("m_table: float")
    .Input("m_mid: float")
    .Input("m_lut: int32")
    .Input("v_table: float")
    .Input("v_mid: float")
    .Input("v_lut: int32")
    .Input("scalars: float")
    .Output("var_out: float")
    .Output("m_codes_out: uint8")
    .Output("m_scales_out: float")
    .Output("v_codes_out: uint8")
    .Output("v_scales_out: float")
    .Output("v_hat_codes_out: uint8")
    .Output("v_hat_scales_out: float")
    .Attr("bits: int")
    .Attr("block: int")
    .Attr("m_zero: int")
    .Attr("lut_shift: int")
    .Attr("lut_base: int")
    .Attr("maximize: bool")
    .Attr("l2: bool")
    .Attr("decoupled: bool")
    .Attr("amsgrad: bool")
    .Attr("paper: bool")
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

}  // namespace tensorflow
