// Adam on block-wise quantized moments as TensorFlow CPU ops: one pass per
// block (quantized_adam.h: decode, float32 Adam, encode), on the device's
// intra-op thread pool. Two ops:
//
// KerasAdamMultiTensorQuantizedAdam updates the resource variables of N
// model variables (each variable, and its moments) in one call, in place,
// with the resource semantics of TensorFlow's training ops
// (resource_variables.h): every variable's mutex held for the whole update,
// locked in address order; a buffer shared with a pending read is copied
// first and the copy updated.
//
// KerasAdamQuantizedAdam is functional, for one variable (tf.distribute
// steps each variable's components on their own): it reads the variable's
// value, its gradient and its moments, and returns their new values,
// which the caller assigns (keras_adam/backends/tensorflow.py).
// Each output reuses its input's buffer where TensorFlow allows it, else is
// a copy made block by block, just before the block is stepped.
//
// Each moment is one uint8 buffer: its blocks' float32 scales, then its
// codes (quantized_storage). The code tables come in as inputs
// (keras_adam/quantization.py builds them), as do the scalars: alpha,
// 1 - beta1, 1 - beta2, epsilon, lambda, lr and sqrt(1 - beta2^t).

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
  kVar = 0, kGrad, kM, kV, kVh,
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
    const Tensor& lut = context->input(table + 2);
    return {bits,
            block,
            m ? m_zero : -1,
            context->input(table).flat<float>().data(),
            context->input(table + 1).flat<float>().data(),
            lut.flat<int32_t>().data(),
            static_cast<int32_t>(lut.NumElements()),
            lut_shift,
            m ? m_lut_base : v_lut_base};
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
    const int64_t blocks = quantized_storage::Blocks(n, attrs_.block);
    const int64_t bytes = quantized_storage::Bytes(n, attrs_.bits, attrs_.block);
    OP_REQUIRES(context, grad.shape() == var.shape(),
                errors::InvalidArgument("grad has shape ", grad.shape().DebugString(),
                                        " but var has ", var.shape().DebugString()));
    const int moments = attrs_.flags.amsgrad ? 3 : 2;
    for (int k = 0; k < moments; ++k) {
      const Tensor& moment = context->input(kM + k);
      OP_REQUIRES(context, moment.NumElements() == bytes,
                  errors::InvalidArgument("moment ", k, " has ", moment.NumElements(),
                                          " bytes; expected ", bytes, " for ", n, " values"));
    }
    const Tensor& scalars = context->input(kScalars);
    OP_REQUIRES(context, scalars.NumElements() == 7,
                errors::InvalidArgument("scalars must hold 7 values"));

    // Outputs, forwarded from their inputs where TensorFlow allows.
    Tensor* out[4] = {nullptr};
    const int sources[4] = {kVar, kM, kV, kVh};
    bool forwarded[4];
    for (int k = 0; k < 4; ++k) {
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
    auto storage = [&](int k) { return static_cast<uint8_t*>(out[k]->data()); };

    auto work = [&](int64_t begin, int64_t end) {
      // Copy this range's inputs where the outputs are not their buffers.
      for (int k = 0; k < 4; ++k) {
        if (forwarded[k] || (k == 3 && !s.amsgrad)) continue;
        const Tensor& input = context->input(sources[k]);
        if (k == 0) {
          const int64_t first = begin * block, last = std::min(end * block, n);
          std::memcpy(out[0]->flat<float>().data() + first, input.flat<float>().data() + first,
                      (last - first) * sizeof(float));
        } else {
          quantized_storage::CopyBlocks(storage(k), input.flat<uint8_t>().data(), n, bits, block,
                                        begin, end);
        }
      }
      step(out[0]->flat<float>().data(), grad.flat<float>().data(),
           quantized_storage::Parts(storage(1), n, block),
           quantized_storage::Parts(storage(2), n, block),
           quantized_storage::Parts(s.amsgrad ? storage(3) : nullptr, n, block), n, fm, fv, s,
           begin, end);
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
    // Resources: var[0..n), then each moment's, n each.
    const int resources = (1 + moments) * n;
    const int grad_input = resources;
    const int table_input = grad_input + n;
    const Tensor& scalars = context->input(table_input + 6);
    OP_REQUIRES(context, scalars.NumElements() == 7,
                errors::InvalidArgument("scalars must hold 7 values"));

    std::vector<tensorflow::core::RefCountPtr<tensorflow::Var>> vars;
    std::vector<tensorflow::mutex_lock> locks;
    OP_REQUIRES_OK(context, LockResourceInputs(context, resources, &vars, &locks));

    // Validate before touching anything. Resource r of variable i is
    // vars[r * n + i]: r = 0 the variable, then its moments.
    const int64_t block = attrs_.block;
    for (int i = 0; i < n; ++i) {
      const Tensor& grad = context->input(grad_input + i);
      const int64_t size = grad.NumElements();
      const int64_t bytes = quantized_storage::Bytes(size, attrs_.bits, block);
      for (int r = 0; r < 1 + moments; ++r) {
        tensorflow::Var* var = vars[r * n + i].get();
        OP_REQUIRES(context, var->is_initialized && var->tensor()->IsInitialized(),
                    errors::FailedPrecondition("resource ", r, " of variable ", i,
                                               " is uninitialized"));
        const Tensor* t = var->tensor();
        const tensorflow::DataType dtype = r > 0 ? tensorflow::DT_UINT8 : tensorflow::DT_FLOAT;
        const int64_t expected = r == 0 ? size : bytes;
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

    std::vector<float*> var(n);
    std::vector<const float*> grad(n);
    std::vector<uint8_t*> m(n), v(n), vh(n);
    std::vector<int64_t> sizes(n);
    auto data = [&](int r, int i) { return vars[r * n + i]->tensor()->data(); };
    for (int i = 0; i < n; ++i) {
      sizes[i] = context->input(grad_input + i).NumElements();
      grad[i] = context->input(grad_input + i).flat<float>().data();
      var[i] = static_cast<float*>(data(0, i));
      m[i] = static_cast<uint8_t*>(data(1, i));
      v[i] = static_cast<uint8_t*>(data(2, i));
      vh[i] = attrs_.flags.amsgrad ? static_cast<uint8_t*>(data(3, i)) : nullptr;
    }
    QuantizedScalars s = attrs_.flags;
    s.Read(scalars.flat<float>().data());
    OP_REQUIRES_OK(context, attrs_.CheckLuts(context, table_input));
    const QuantizedFormat fm = attrs_.Format(context, table_input, true);
    const QuantizedFormat fv = attrs_.Format(context, table_input + 3, false);
    const quantized_threads::Tensors t{var.data(), grad.data(), m.data(), v.data(),
                                       vh.data(),  sizes.data(), n};
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
    .Input("m: uint8")
    .Input("v: uint8")
    .Input("v_hat: uint8")
    KERAS_ADAM_QUANTIZED_TABLE_INPUTS
    .Output("var_out: float")
    .Output("m_out: uint8")
    .Output("v_out: uint8")
    .Output("v_hat_out: uint8")
    KERAS_ADAM_QUANTIZED_FORMAT_ATTRS
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      const int sources[4] = {0, 2, 3, 4};
      for (int k = 0; k < 4; ++k) c->set_output(k, c->input(sources[k]));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Adam on block-wise quantized moments (keras_adam/quantization.py): decode
m and v (and v_hat with amsgrad; else an empty input), step in float32,
encode; returns the new variable and moments. Each moment is one uint8
buffer holding its blocks' float32 scales, then its codes. scalars holds
alpha, 1 - beta1, 1 - beta2, epsilon, lambda, lr and sqrt(1 - beta2^t).
)doc");

REGISTER_KERNEL_BUILDER(Name("KerasAdamQuantizedAdam").Device(DEVICE_CPU),
                        ::keras_adam::QuantizedAdamOp);

REGISTER_OP("KerasAdamMultiTensorQuantizedAdam")
    .Input("var: N * resource")
    .Input("m: N * resource")
    .Input("v: N * resource")
    .Input("v_hat: M * resource")
    .Input("grad: N * float")
    KERAS_ADAM_QUANTIZED_TABLE_INPUTS
    .Attr("N: int >= 1")
    .Attr("M: int >= 0")
    KERAS_ADAM_QUANTIZED_FORMAT_ATTRS
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc(R"doc(
Adam on block-wise quantized moments of N variables at once, in place:
var, and each moment (uint8: its blocks' float32 scales, then its codes),
are resource variables (M = N v_hat ones with amsgrad, else none); grad one
dense tensor per variable. scalars holds alpha, 1 - beta1, 1 - beta2,
epsilon, lambda, lr and sqrt(1 - beta2^t).
)doc");

REGISTER_KERNEL_BUILDER(Name("KerasAdamMultiTensorQuantizedAdam").Device(DEVICE_CPU),
                        ::keras_adam::MultiTensorQuantizedAdamOp);

}  // namespace tensorflow
