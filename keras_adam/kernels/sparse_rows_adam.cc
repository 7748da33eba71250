// A lazy sparse Adam for TensorFlow on CPU: one op call updates only the rows
// of a variable (and of its first and second moments) that a sparse gradient
// (`tf.IndexedSlices`: values `grad` [N, row dims...] at rows `indices` [N])
// touches. Untouched rows, moments included, are not read or written.
//
// The math is that of keras_adam.Adam(lazy_sparse=True) on its default
// options ("hat" epsilon, no AMSGrad, no rectification): update_rule.adam_step
// restricted to the touched rows. For each distinct row r, with its slices
// summed in the order of their positions (repeated indices are coalesced
// first, as `tf.math.unsorted_segment_sum` does):
//
//   g = sum of grad[i] over the positions i with indices[i] == r
//   g = -g                                      if maximize
//   g = g + var[r] * weight_decay               if L2 decay (not decoupled)
//   var[r] = var[r] - var[r] * weight_decay * lr  if decoupled decay
//   then Keras's Adam step on var[r], m[r], v[r] (adam_step.h)
//
// (weight_decay == 0 skips both decays.) The scalars are inputs, computed
// by the caller as Keras computes them: alpha = lr * sqrt(1 - beta2^t) /
// (1 - beta1^t), and 1 - beta1, 1 - beta2 each rounded once to T. The
// operation order is that of the dense fused path, so where every row is
// touched once the result is that of KerasAdamMultiTensorApplyAdam to the
// bit.
//
// Cost: O(N log N) at worst to group the positions by row (none when the
// indices are already sorted), then one pass over the N slices and the
// touched rows, split over the distinct rows on the device's intra-op
// thread pool. Nothing is proportional to the size of the table, except a
// copy-on-write (below).
//
// Resource-variable semantics: the three variables' mutexes are held for the
// whole update, locked in address order; passing one variable twice (var as
// m, say) is rejected. A buffer that is shared with another tensor (a pending
// read of the variable) is not written in place: it is copied first, which
// costs the WHOLE table, so callers must not leave reads of the table alive
// when the op runs (keras_adam.Adam passes no read of it). Every index is
// checked before anything is written: bad input returns InvalidArgument and
// leaves var, m and v as they were.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

namespace keras_adam {

using ::tensorflow::DataType;
using ::tensorflow::DataTypeString;
using ::tensorflow::DataTypeToEnum;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::Var;
namespace errors = ::tensorflow::errors;

// -- grouping the positions by row -------------------------------------------

// Fills `order` with the positions 0..n-1 grouped by index, positions
// ascending within a group, and `starts` with the offset in `order` of each
// group, plus n at the end. The indices are valid, in [0, rows).
template <typename Tindex>
void GroupByRow(const Tindex* indices, int64_t n, int64_t rows, std::vector<int64_t>* order,
                std::vector<int64_t>* starts) {
  order->resize(n);
  int64_t* out = order->data();
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  bool sorted = true;
  for (int64_t i = 1; i < n && sorted; ++i) sorted = indices[i - 1] <= indices[i];
  if (!sorted) {
    if (n < 256) {
      std::stable_sort(out, out + n,
                       [indices](int64_t a, int64_t b) { return indices[a] < indices[b]; });
    } else {
      // Least-significant-digit radix sort on the index, 11 bits a pass:
      // stable, so positions stay ascending within a row.
      constexpr int kBits = 11;
      constexpr int64_t kBuckets = int64_t{1} << kBits;
      int bits = 0;
      while (bits < 63 && (int64_t{1} << bits) < rows) ++bits;
      std::vector<int64_t> scratch(n);
      int64_t* from = out;
      int64_t* to = scratch.data();
      std::vector<int64_t> count(kBuckets);
      for (int shift = 0; shift < bits; shift += kBits) {
        std::fill(count.begin(), count.end(), 0);
        for (int64_t i = 0; i < n; ++i) {
          ++count[(static_cast<uint64_t>(indices[from[i]]) >> shift) & (kBuckets - 1)];
        }
        int64_t sum = 0;
        for (int64_t b = 0; b < kBuckets; ++b) {
          const int64_t c = count[b];
          count[b] = sum;
          sum += c;
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = from[i];
          to[count[(static_cast<uint64_t>(indices[p]) >> shift) & (kBuckets - 1)]++] = p;
        }
        std::swap(from, to);
      }
      if (from != out) std::memcpy(out, from, n * sizeof(int64_t));
    }
  }
  starts->clear();
  starts->reserve(n + 1);
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || indices[out[i]] != indices[out[i - 1]]) starts->push_back(i);
  }
  starts->push_back(n);
}

// -- prefetching -------------------------------------------------------------

// The touched rows are scattered over three large tables, so each row of
// each table is a cache miss and usually a TLB miss too (one 4 KiB page per
// row). Asking for the rows a few distinct rows ahead overlaps those misses
// with the arithmetic; the exact distance matters little. Narrow rows gain
// the most; long rows gain little, as the hardware prefetcher streams within
// a row, so only the first KiB of each row is requested, with intent to
// write.
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kCacheLine = 64;

template <typename T>
inline void PrefetchRow(const T* row, int64_t row_size) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = std::min<int64_t>(row_size * sizeof(T), kPrefetchBytes);
  for (int64_t b = 0; b < bytes; b += kCacheLine) {
    __builtin_prefetch(p + b, /*rw=*/1, /*locality=*/3);
  }
}

// -- the op ------------------------------------------------------------------

// Input layout.
enum Input {
  kVar = 0,
  kM,
  kV,
  kGrad,
  kIndices,
  kLr,
  kAlpha,
  kOneMinusBeta1,
  kOneMinusBeta2,
  kEpsilon,
  kWeightDecay,
  kNumInputs
};

template <typename T, typename Tindex>
class SparseApplyAdamOp : public OpKernel {
 public:
  explicit SparseApplyAdamOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("decoupled_weight_decay", &decoupled_));
    OP_REQUIRES_OK(context, context->GetAttr("maximize", &maximize_));
  }

  void Compute(OpKernelContext* context) override {
    const DataType dtype = DataTypeToEnum<T>::v();

    // Scalars.
    static const char* const kScalarNames[] = {
        "lr", "alpha", "one_minus_beta1", "one_minus_beta2", "epsilon", "weight_decay"};
    T scalar[kNumInputs];
    for (int k = kLr; k < kNumInputs; ++k) {
      const Tensor& t = context->input(k);
      OP_REQUIRES(context, tensorflow::TensorShapeUtils::IsScalar(t.shape()),
                  errors::InvalidArgument(kScalarNames[k - kLr], " is not a scalar: ",
                                          t.shape().DebugString()));
      scalar[k] = t.scalar<T>()();
    }
    Scalars<T> s;
    s.alpha = scalar[kAlpha];
    s.one_minus_beta1 = scalar[kOneMinusBeta1];
    s.one_minus_beta2 = scalar[kOneMinusBeta2];
    s.epsilon = scalar[kEpsilon];
    const T lr = scalar[kLr];
    const T weight_decay = scalar[kWeightDecay];

    const Tensor& grad = context->input(kGrad);
    const Tensor& indices = context->input(kIndices);
    OP_REQUIRES(context, tensorflow::TensorShapeUtils::IsVector(indices.shape()),
                errors::InvalidArgument("indices must be a vector, got shape ",
                                        indices.shape().DebugString()));
    OP_REQUIRES(context, grad.dims() >= 1,
                errors::InvalidArgument("grad must have rank >= 1, got shape ",
                                        grad.shape().DebugString()));
    const int64_t n = indices.dim_size(0);
    OP_REQUIRES(context, grad.dim_size(0) == n,
                errors::InvalidArgument("grad has ", grad.dim_size(0), " rows (shape ",
                                        grad.shape().DebugString(), ") but indices has ", n,
                                        " entries."));

    // Look up the three variables; each must be a different one.
    tensorflow::core::RefCountPtr<Var> vars[3];
    for (int r = 0; r < 3; ++r) {
      OP_REQUIRES_OK(context, tensorflow::LookupResource(
                                  context, tensorflow::HandleFromInput(context, r), &vars[r]));
    }
    Var* order[3] = {vars[0].get(), vars[1].get(), vars[2].get()};
    std::sort(order, order + 3);
    OP_REQUIRES(context, order[0] != order[1] && order[1] != order[2],
                errors::InvalidArgument(
                    "A variable is passed more than once (as the variable or a moment)."));

    // Lock the three mutexes, in address order (as TensorFlow's
    // MaybeLockVariableInputMutexesInOrder does), for the whole update.
    tensorflow::mutex_lock lock0(*order[0]->mu());
    tensorflow::mutex_lock lock1(*order[1]->mu());
    tensorflow::mutex_lock lock2(*order[2]->mu());

    // Validate everything before touching anything.
    static const char* const kRole[3] = {"var", "m", "v"};
    for (int r = 0; r < 3; ++r) {
      Var* var = vars[r].get();
      OP_REQUIRES(context, var->is_initialized && var->tensor()->IsInitialized(),
                  errors::FailedPrecondition("Attempting to use uninitialized variable ",
                                             kRole[r], "."));
      OP_REQUIRES(context, var->tensor()->dtype() == dtype,
                  errors::InvalidArgument(kRole[r], " has dtype ",
                                          DataTypeString(var->tensor()->dtype()), ", expected ",
                                          DataTypeString(dtype), "."));
    }
    const TensorShape shape = vars[0]->tensor()->shape();
    for (int r = 1; r < 3; ++r) {
      OP_REQUIRES(context, vars[r]->tensor()->shape() == shape,
                  errors::InvalidArgument(kRole[r], " has shape ",
                                          vars[r]->tensor()->shape().DebugString(),
                                          " but var has shape ", shape.DebugString(), "."));
    }
    OP_REQUIRES(context, shape.dims() >= 1,
                errors::InvalidArgument("var must have rank >= 1, got shape ",
                                        shape.DebugString()));
    bool rows_match = grad.dims() == shape.dims();
    for (int d = 1; rows_match && d < shape.dims(); ++d) {
      rows_match = grad.dim_size(d) == shape.dim_size(d);
    }
    OP_REQUIRES(context, rows_match,
                errors::InvalidArgument("grad has shape ", grad.shape().DebugString(),
                                        ": its rows do not have the shape of var's rows (var "
                                        "has shape ",
                                        shape.DebugString(), ")."));
    const int64_t rows = shape.dim_size(0);
    const auto index = indices.vec<Tindex>();
    for (int64_t i = 0; i < n; ++i) {
      const Tindex row = index(i);
      OP_REQUIRES(context, row >= 0 && static_cast<int64_t>(row) < rows,
                  errors::InvalidArgument("indices[", i, "] = ", static_cast<int64_t>(row),
                                          " is not in [0, ", rows, ")."));
    }
    const int64_t row_size = rows == 0 ? 0 : shape.num_elements() / rows;
    if (n == 0 || row_size == 0) return;

    // Copy-on-write where a buffer is shared with another tensor (a read
    // still alive): the copy costs the whole table, not the rows touched.
    // All copies are made before any variable changes.
    Tensor fresh[3];
    bool copy[3] = {false, false, false};
    for (int r = 0; r < 3; ++r) {
      if (!vars[r]->tensor()->RefCountIsOne()) {
        copy[r] = true;
        tsl::AllocatorAttributes attr;
        attr.set_gpu_compatible(true);
        attr.set_nic_compatible(true);
        OP_REQUIRES_OK(context, context->allocate_temp(dtype, shape, &fresh[r], attr));
      }
    }
    for (int r = 0; r < 3; ++r) {
      if (!copy[r]) continue;
      std::memcpy(fresh[r].flat<T>().data(), vars[r]->tensor()->flat<T>().data(),
                  shape.num_elements() * sizeof(T));
      *vars[r]->tensor() = fresh[r];
    }

    // Group the positions by row.
    std::vector<int64_t> positions, starts;
    GroupByRow<Tindex>(index.data(), n, rows, &positions, &starts);
    const int64_t distinct = static_cast<int64_t>(starts.size()) - 1;

    T* var_data = vars[0]->tensor()->flat<T>().data();
    T* m_data = vars[1]->tensor()->flat<T>().data();
    T* v_data = vars[2]->tensor()->flat<T>().data();
    const T* grad_data = grad.flat<T>().data();
    const Tindex* index_data = index.data();
    const bool maximize = maximize_;
    const bool l2 = weight_decay != T(0) && !decoupled_;
    const bool decoupled = weight_decay != T(0) && decoupled_;

    // Distinct rows [begin, end).
    auto work = [&, maximize, l2, decoupled](int64_t begin, int64_t end) {
      std::vector<T> total(row_size);
      for (int64_t k = begin; k < end; ++k) {
        if (k + kPrefetchRows < end) {
          const int64_t ahead =
              static_cast<int64_t>(index_data[positions[starts[k + kPrefetchRows]]]) * row_size;
          PrefetchRow(var_data + ahead, row_size);
          PrefetchRow(m_data + ahead, row_size);
          PrefetchRow(v_data + ahead, row_size);
        }
        const int64_t first = starts[k];
        const int64_t last = starts[k + 1];
        const int64_t row = static_cast<int64_t>(index_data[positions[first]]);
        T* var = var_data + row * row_size;
        T* m = m_data + row * row_size;
        T* v = v_data + row * row_size;
        const T* g = grad_data + positions[first] * row_size;
        if (last - first > 1 || maximize || l2) {
          T* sum = total.data();
          std::copy(g, g + row_size, sum);
          for (int64_t p = first + 1; p < last; ++p) {
            const T* more = grad_data + positions[p] * row_size;
            for (int64_t j = 0; j < row_size; ++j) sum[j] = sum[j] + more[j];
          }
          if (maximize) {
            for (int64_t j = 0; j < row_size; ++j) sum[j] = -sum[j];
          }
          if (l2) {
            for (int64_t j = 0; j < row_size; ++j) sum[j] = sum[j] + var[j] * weight_decay;
          }
          g = sum;
        }
        if (decoupled) {
          for (int64_t j = 0; j < row_size; ++j) var[j] = var[j] - var[j] * weight_decay * lr;
        }
        StepInPlaceDispatch(var, m, v, g, row_size, s);
      }
    };
    // Cost per distinct row, in cycles: the step's 4 loads, 3 stores, sqrt
    // and division per element (ResourceApplyAdam's cost model), plus
    // summing the row's slices.
    const int64_t slices_per_row = (n + distinct - 1) / distinct;
    const int64_t element_size = sizeof(T);
    const int64_t cost_per_row =
        row_size * (7 * element_size + 20 + 2 * element_size * slices_per_row);
    auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(distinct, cost_per_row, work);
  }

 private:
  bool decoupled_;
  bool maximize_;
};

}  // namespace keras_adam

namespace tensorflow {

REGISTER_OP("KerasAdamSparseApplyAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("grad: T")
    .Input("indices: Tindices")
    .Input("lr: T")
    .Input("alpha: T")
    .Input("one_minus_beta1: T")
    .Input("one_minus_beta2: T")
    .Input("epsilon: T")
    .Input("weight_decay: T")
    .Attr("T: {float, double}")
    .Attr("Tindices: {int32, int64}")
    .Attr("decoupled_weight_decay: bool = true")
    .Attr("maximize: bool = false")
    .SetIsStateful()
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle unused, grad, indices;
      for (int k = 5; k < 11; ++k) {
        TF_RETURN_IF_ERROR(c->WithRank(c->input(k), 0, &unused));
      }
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(3), 1, &grad));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 1, &indices));
      shape_inference::DimensionHandle n;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(grad, 0), c->Dim(indices, 0), &n));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Lazy sparse Adam (keras.optimizers.Adam's update) on the rows of var, m and
v that indices names: repeated indices are summed first, then each distinct
row takes one step, with optional maximize and L2 or decoupled weight decay.
Other rows are not touched. Indices out of range are an InvalidArgument
error, raised before anything is written. The step size alpha is
lr * sqrt(1 - beta2^t) / (1 - beta1^t) (the learning rate itself is for the
decoupled decay); one_minus_beta1 and one_minus_beta2 are 1 - beta1 and
1 - beta2, each rounded once to T.
)doc");

#define KERAS_ADAM_REGISTER(T, Tindex)                                     \
  REGISTER_KERNEL_BUILDER(Name("KerasAdamSparseApplyAdam")                \
                              .Device(DEVICE_CPU)                          \
                              .TypeConstraint<T>("T")                      \
                              .TypeConstraint<Tindex>("Tindices"),         \
                          ::keras_adam::SparseApplyAdamOp<T, Tindex>);

KERAS_ADAM_REGISTER(float, int32_t)
KERAS_ADAM_REGISTER(float, int64_t)
KERAS_ADAM_REGISTER(double, int32_t)
KERAS_ADAM_REGISTER(double, int64_t)
#undef KERAS_ADAM_REGISTER

}  // namespace tensorflow
