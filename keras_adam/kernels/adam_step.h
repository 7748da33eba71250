// The elementwise Adam step shared by the kernels of this directory
// (multi_tensor_adam.cc, sparse_rows_adam.cc).
//
// keras.optimizers.Adam's arithmetic (its update_step; Keras's "hat"
// epsilon, see keras_adam/update_rule.py), operation for operation, so that
// the kernels give Keras's numbers to the last bit as long as the compiler
// does not contract to FMA (they are built with -ffp-contract=off):
//
//   m   <- m + (g - m) * one_minus_beta1
//   v   <- v + (g * g - v) * one_minus_beta2
//   var <- var - (m * alpha) / (sqrt(v) + epsilon)
//
// The scalars are inputs of the ops, computed by the caller as Keras
// computes them (keras_adam/backends/tensorflow.py): 1 - beta1 and
// 1 - beta2 in double from the Python floats, rounded once to T, and
// alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t) with TensorFlow ops in T.
// Computing 1 - beta here from a float beta, as ResourceApplyAdam does,
// is off by up to one rounding of beta: 1 - 0.999f = 0.00099998713, 1.3e-5
// relative away from Keras's float(1 - 0.999) = 0.001.

#ifndef KERAS_ADAM_KERNELS_ADAM_STEP_H_
#define KERAS_ADAM_KERNELS_ADAM_STEP_H_

#include <cmath>
#include <cstdint>

namespace keras_adam {

// The step's scalars, as the ops receive them.
template <typename T>
struct Scalars {
  T alpha, one_minus_beta1, one_minus_beta2, epsilon;
};

// In place: the common case. Pointers do not alias each other.
template <typename T>
__attribute__((always_inline)) inline void StepInPlace(
    T* __restrict__ var, T* __restrict__ m, T* __restrict__ v,
    const T* __restrict__ g, int64_t n, const Scalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const T mi = m[i] + (gi - m[i]) * s.one_minus_beta1;
    const T vi = v[i] + (gi * gi - v[i]) * s.one_minus_beta2;
    m[i] = mi;
    v[i] = vi;
    var[i] = var[i] - (mi * s.alpha) / (std::sqrt(vi) + s.epsilon);
  }
}

// Copy-on-write: reads the old buffers, writes new ones (rare; not tuned).
template <typename T>
void StepOutOfPlace(const T* var_in, const T* m_in, const T* v_in, const T* g, T* var_out,
                    T* m_out, T* v_out, int64_t n, const Scalars<T>& s) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const T mi = m_in[i] + (gi - m_in[i]) * s.one_minus_beta1;
    const T vi = v_in[i] + (gi * gi - v_in[i]) * s.one_minus_beta2;
    const T pi = var_in[i];
    m_out[i] = mi;
    v_out[i] = vi;
    var_out[i] = pi - (mi * s.alpha) / (std::sqrt(vi) + s.epsilon);
  }
}

// Compiled for several instruction sets; the loader picks one at run time,
// so a cached library stays valid on another x86-64 machine. In an unnamed
// namespace: each source file that includes this header gets its own copy
// (and its own resolver), so they link into one library without clashing;
// the dispatching overloads too, as they call into it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERAS_ADAM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KERAS_ADAM_CLONES
#endif

namespace {

KERAS_ADAM_CLONES void StepInPlaceF32(float* var, float* m, float* v, const float* g,
                                      int64_t n, const Scalars<float> s) {
  StepInPlace<float>(var, m, v, g, n, s);
}

KERAS_ADAM_CLONES void StepInPlaceF64(double* var, double* m, double* v, const double* g,
                                      int64_t n, const Scalars<double> s) {
  StepInPlace<double>(var, m, v, g, n, s);
}

inline void StepInPlaceDispatch(float* var, float* m, float* v, const float* g, int64_t n,
                                const Scalars<float>& s) {
  StepInPlaceF32(var, m, v, g, n, s);
}

inline void StepInPlaceDispatch(double* var, double* m, double* v, const double* g, int64_t n,
                                const Scalars<double>& s) {
  StepInPlaceF64(var, m, v, g, n, s);
}

}  // namespace

}  // namespace keras_adam

#endif  // KERAS_ADAM_KERNELS_ADAM_STEP_H_
