// A multi-tensor Adam for TensorFlow on CPU: one op call updates the
// variables, first and second moments of all N variables of a step.
//
// The math is keras.optimizers.Adam's (Keras's "hat" epsilon, see
// keras_adam/update_rule.py), written as one pass over each element
// (adam_step.h):
//
//   m   <- m + (g - m) * one_minus_beta1
//   v   <- v + (g * g - v) * one_minus_beta2
//   var <- var - (m * alpha) / (sqrt(v) + epsilon)
//
// in Keras's operation order, with the scalars computed by the caller as
// Keras computes them (1 - beta in double, rounded once to T; alpha =
// lr * sqrt(1 - beta2^t) / (1 - beta1^t) in T), so the result is Keras's
// to the last bit unless the compiler contracts to FMA (it is built with
// -ffp-contract=off). ResourceApplyAdam's update has the same form but
// computes 1 - beta from the rounded beta (adam_step.h).
//
// Resource-variable semantics are those of TensorFlow's training ops
// (tensorflow/core/kernels/training_op_helpers.h): every variable's mutex is
// held for the whole update, locked in address order; a buffer that is
// shared with a pending read (or a variable in copy-on-read mode) is not
// written in place: the update reads the old buffer and writes a new one,
// which becomes the variable's value. Bad inputs return InvalidArgument.
//
// Work is split over the elements of all tensors together, on the device's
// intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/lib/core/refcount.h"
#include "tensorflow/core/platform/mutex.h"
#include "tensorflow/core/platform/threadpool.h"

#include "adam_step.h"
#include "resource_variables.h"

namespace keras_adam {

using ::tensorflow::DataType;
using ::tensorflow::DataTypeString;
using ::tensorflow::DataTypeToEnum;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::Var;
namespace errors = ::tensorflow::errors;

// -- the elementwise step: Scalars, StepInPlaceDispatch and StepOutOfPlace
// are in adam_step.h, shared with sparse_rows_adam.cc.

template <typename T>
struct Segment {
  const T* var_in;
  const T* m_in;
  const T* v_in;
  const T* g;
  T* var_out;
  T* m_out;
  T* v_out;
  bool in_place;
};

// -- the op ------------------------------------------------------------------

// Input layout: var[0..N), m[0..N), v[0..N), grad[0..N), then the scalars.
enum ScalarInput { kAlpha = 0, kOneMinusBeta1, kOneMinusBeta2, kEpsilon, kNumScalars };

template <typename T>
class MultiTensorApplyAdamOp : public OpKernel {
 public:
  explicit MultiTensorApplyAdamOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("N", &n_));
  }

  void Compute(OpKernelContext* context) override {
    const int n = n_;
    const DataType dtype = DataTypeToEnum<T>::v();

    // Scalars.
    T scalar[kNumScalars];
    static const char* const kScalarNames[kNumScalars] = {"alpha", "one_minus_beta1",
                                                          "one_minus_beta2", "epsilon"};
    for (int k = 0; k < kNumScalars; ++k) {
      const Tensor& t = context->input(4 * n + k);
      OP_REQUIRES(context, tensorflow::TensorShapeUtils::IsScalar(t.shape()),
                  errors::InvalidArgument(kScalarNames[k], " is not a scalar: ",
                                          t.shape().DebugString()));
      scalar[k] = t.scalar<T>()();
    }
    Scalars<T> s;
    s.alpha = scalar[kAlpha];
    s.one_minus_beta1 = scalar[kOneMinusBeta1];
    s.one_minus_beta2 = scalar[kOneMinusBeta2];
    s.epsilon = scalar[kEpsilon];

    // Look up and lock the 3N variables; each may appear once only.
    std::vector<tensorflow::core::RefCountPtr<Var>> vars;
    std::vector<tensorflow::mutex_lock> locks;
    OP_REQUIRES_OK(context, LockResourceInputs(context, 3 * n, &vars, &locks));

    // Validate before touching anything.
    static const char* const kRole[3] = {"var", "m", "v"};
    for (int i = 0; i < n; ++i) {
      const Tensor& grad = context->input(3 * n + i);
      for (int r = 0; r < 3; ++r) {
        Var* var = vars[r * n + i].get();
        OP_REQUIRES(context, var->is_initialized && var->tensor()->IsInitialized(),
                    errors::FailedPrecondition("Attempting to use uninitialized variable ",
                                               kRole[r], "[", i, "]."));
        OP_REQUIRES(context, var->tensor()->dtype() == dtype,
                    errors::InvalidArgument(kRole[r], "[", i, "] has dtype ",
                                            DataTypeString(var->tensor()->dtype()),
                                            ", expected ", DataTypeString(dtype), "."));
        OP_REQUIRES(context, var->tensor()->shape() == grad.shape(),
                    errors::InvalidArgument(kRole[r], "[", i, "] has shape ",
                                            var->tensor()->shape().DebugString(),
                                            " but grad[", i, "] has shape ",
                                            grad.shape().DebugString(), "."));
      }
    }

    // Copy-on-write where a buffer is shared, as PrepareToUpdateVariable:
    // all new buffers are allocated before any variable changes, and the
    // old tensors stay alive (in `old`) until the update is done.
    std::vector<Tensor> old(3 * n);
    std::vector<bool> copy(3 * n, false);
    std::vector<Tensor> fresh(3 * n);
    for (int j = 0; j < 3 * n; ++j) {
      Var* var = vars[j].get();
      if (var->copy_on_read_mode.load() || !var->tensor()->RefCountIsOne()) {
        copy[j] = true;
        tsl::AllocatorAttributes attr;
        attr.set_gpu_compatible(true);
        attr.set_nic_compatible(true);
        OP_REQUIRES_OK(context,
                       context->allocate_temp(dtype, var->tensor()->shape(), &fresh[j], attr));
      }
    }
    std::vector<Segment<T>> segments(n);
    std::vector<int64_t> offsets(n + 1, 0);
    for (int i = 0; i < n; ++i) {
      Segment<T>& seg = segments[i];
      seg.in_place = true;
      const T* in[3];
      T* out[3];
      for (int r = 0; r < 3; ++r) {
        const int j = r * n + i;
        Tensor* tensor = vars[j]->tensor();
        if (copy[j]) {
          old[j] = *tensor;
          *tensor = fresh[j];
          in[r] = old[j].flat<T>().data();
          seg.in_place = false;
        } else {
          in[r] = tensor->flat<T>().data();
        }
        out[r] = tensor->flat<T>().data();
      }
      seg.var_in = in[0];
      seg.m_in = in[1];
      seg.v_in = in[2];
      seg.var_out = out[0];
      seg.m_out = out[1];
      seg.v_out = out[2];
      seg.g = context->input(3 * n + i).flat<T>().data();
      offsets[i + 1] = offsets[i] + context->input(3 * n + i).NumElements();
    }
    const int64_t total = offsets[n];
    if (total == 0) return;

    // Elements [begin, end) of all tensors laid end to end.
    auto work = [&segments, &offsets, &s, n](int64_t begin, int64_t end) {
      int i = static_cast<int>(std::upper_bound(offsets.begin(), offsets.end(), begin) -
                               offsets.begin()) - 1;
      for (; i < n && offsets[i] < end; ++i) {
        const int64_t lo = std::max(begin, offsets[i]) - offsets[i];
        const int64_t hi = std::min(end, offsets[i + 1]) - offsets[i];
        if (hi <= lo) continue;
        const Segment<T>& seg = segments[i];
        if (seg.in_place) {
          StepInPlaceDispatch(seg.var_out + lo, seg.m_out + lo, seg.v_out + lo, seg.g + lo,
                              hi - lo, s);
        } else {
          StepOutOfPlace<T>(seg.var_in + lo, seg.m_in + lo, seg.v_in + lo, seg.g + lo,
                            seg.var_out + lo, seg.m_out + lo, seg.v_out + lo, hi - lo, s);
        }
      }
    };
    // Cost per element, in cycles: 4 loads and 3 stores of T plus a sqrt
    // and a division, as ResourceApplyAdam's cost model counts them.
    const int64_t cost_per_element = 7 * sizeof(T) + 20;
    auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(total, cost_per_element, work);
  }

 private:
  int n_;
};

}  // namespace keras_adam

namespace tensorflow {

REGISTER_OP("KerasAdamMultiTensorApplyAdam")
    .Input("var: N * resource")
    .Input("m: N * resource")
    .Input("v: N * resource")
    .Input("grad: N * T")
    .Input("alpha: T")
    .Input("one_minus_beta1: T")
    .Input("one_minus_beta2: T")
    .Input("epsilon: T")
    .Attr("N: int >= 1")
    .Attr("T: {float, double}")
    .SetIsStateful()
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      int n;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      shape_inference::ShapeHandle unused;
      for (int k = 0; k < 4; ++k) {
        TF_RETURN_IF_ERROR(c->WithRank(c->input(4 * n + k), 0, &unused));
      }
      return absl::OkStatus();
    })
    .Doc(R"doc(
Adam (keras.optimizers.Adam's update) on N variables at once, in one pass
per element, on the CPU thread pool. var, m and v are resource variables;
grad has one dense tensor per variable, of the variable's shape. The step
size alpha is lr * sqrt(1 - beta2^t) / (1 - beta1^t); one_minus_beta1 and
one_minus_beta2 are 1 - beta1 and 1 - beta2, each rounded once to T.
)doc");

#define KERAS_ADAM_REGISTER(T)                                         \
  REGISTER_KERNEL_BUILDER(Name("KerasAdamMultiTensorApplyAdam")       \
                              .Device(DEVICE_CPU)                      \
                              .TypeConstraint<T>("T"),                 \
                          ::keras_adam::MultiTensorApplyAdamOp<T>);

KERAS_ADAM_REGISTER(float)
KERAS_ADAM_REGISTER(double)
#undef KERAS_ADAM_REGISTER

}  // namespace tensorflow
