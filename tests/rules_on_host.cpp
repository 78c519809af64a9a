// The activation rules of csrc/rules.h (forward and backward) as plain C functions, so that
// tests/test_rules.py can compare every rule with torch's own activation and derivative on the
// CPU. On the CPU, gelu, gelu_tanh and silu run through ATen and the CUDA kernels through
// these rules: without this check a CUDA-only rule would be tested only against itself.
// Built as a shared library by the test and called through ctypes.
#include <cstdint>

#include "rules.h"

namespace {

using fused_dropout::Activation;

template <typename T, Activation kAct>
void forward(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fused_dropout::activate<kAct, T>(x[i]);
}

template <typename T, Activation kAct>
void backward(const T* grad, const T* x, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = fused_dropout::activation_backward<kAct, T, T>(grad[i], x[i]);
}

}  // namespace

extern "C" {
void activation_forward_f32(int act, const float* x, float* y, int64_t n) {
  fused_dropout::visit_activation(static_cast<Activation>(act),
                                  [&](auto a) { forward<float, decltype(a)::value>(x, y, n); });
}
void activation_forward_f64(int act, const double* x, double* y, int64_t n) {
  fused_dropout::visit_activation(static_cast<Activation>(act),
                                  [&](auto a) { forward<double, decltype(a)::value>(x, y, n); });
}
void activation_backward_f32(int act, const float* grad, const float* x, float* out, int64_t n) {
  fused_dropout::visit_activation(static_cast<Activation>(act),
                                  [&](auto a) { backward<float, decltype(a)::value>(grad, x, out, n); });
}
void activation_backward_f64(int act, const double* grad, const double* x, double* out, int64_t n) {
  fused_dropout::visit_activation(static_cast<Activation>(act),
                                  [&](auto a) { backward<double, decltype(a)::value>(grad, x, out, n); });
}
}
