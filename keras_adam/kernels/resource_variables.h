// Resource variables as TensorFlow's training ops take them
// (tensorflow/core/kernels/training_op_helpers.h): the ops of
// multi_tensor_adam.cc and quantized_adam.cc update many variables in one
// call, so each holds every variable's mutex for the whole update, locked
// in address order (as MaybeLockVariableInputMutexesInOrder does).

#ifndef KERAS_ADAM_KERNELS_RESOURCE_VARIABLES_H_
#define KERAS_ADAM_KERNELS_RESOURCE_VARIABLES_H_

#include <algorithm>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/lib/core/refcount.h"
#include "tensorflow/core/platform/mutex.h"

namespace keras_adam {

// Looks up the variables of resource inputs [0, count) into `vars` and
// locks them all into `locks`, in address order. A variable passed twice
// is an InvalidArgument error (then nothing is locked).
inline absl::Status LockResourceInputs(
    tensorflow::OpKernelContext* context, int count,
    std::vector<tensorflow::core::RefCountPtr<tensorflow::Var>>* vars,
    std::vector<tensorflow::mutex_lock>* locks) {
  vars->resize(count);
  std::vector<tensorflow::Var*> order(count);
  for (int i = 0; i < count; ++i) {
    TF_RETURN_IF_ERROR(tensorflow::LookupResource(
        context, tensorflow::HandleFromInput(context, i), &(*vars)[i]));
    order[i] = (*vars)[i].get();
  }
  std::sort(order.begin(), order.end());
  if (std::adjacent_find(order.begin(), order.end()) != order.end()) {
    return tensorflow::errors::InvalidArgument(
        "A variable is passed more than once (as a variable or a moment).");
  }
  locks->reserve(order.size());
  for (tensorflow::Var* var : order) locks->emplace_back(*var->mu());
  return absl::OkStatus();
}

}  // namespace keras_adam

#endif  // KERAS_ADAM_KERNELS_RESOURCE_VARIABLES_H_
