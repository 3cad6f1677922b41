#pragma once
// The decoder layer's small ops on CPU, one dispatch each: at decode (a handful of rows) each torch op costs a few
// microseconds of dispatch for nanoseconds of work, and RMSNorm (~6 ops) and rotary embedding (~12 ops) ran ~60
// times and ~30 times per step.
//
//  rms_norm(x, weight, eps): y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32 and the normalised
//    value rounded to x's dtype before the weight multiplies it (as Hugging Face's LlamaRMSNorm does).
//  rotary_embedding_(qkv, positions, cos, sin, num_heads, head_dim): rotates, in place, the first num_heads heads
//    of each row of qkv [T, >= num_heads * head_dim] (the q and k heads of a fused qkv projection) in the
//    rotate-half layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin [max_position, head_dim / 2] fp32.
//  add_rms_norm(x, residual, weight, eps) -> (sum, normed): sum = x + residual (rounded to x's dtype), normed =
//    rms_norm(sum): the residual add and the next RMSNorm in one pass over the row, one call instead of two.
//  silu_and_mul(gate_up) -> silu(gate) * up for gate_up [T, 2I] = [gate | up]: SwiGLU's activation in one pass,
//    without the split's views and the two temporaries.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace pernode {
namespace layer_ops {
namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t h, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    float ss = 0.f;
    for (int64_t i = 0; i < h; ++i) {
      const float v = to_float(xr[i]);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / float(h) + eps);
    for (int64_t i = 0; i < h; ++i) yr[i] = static_cast<T>(to_float(w[i]) * to_float(static_cast<T>(to_float(xr[i]) * inv)));
  }
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.size(-1) == weight_in.size(0), "rms_norm: weight has ", weight_in.size(0), " values, x rows ",
              x_in.size(-1));
  TORCH_CHECK(x_in.scalar_type() == weight_in.scalar_type(), "rms_norm: x and weight dtypes differ");
  auto x = x_in.contiguous();
  auto w = weight_in.contiguous();
  auto y = at::empty_like(x);
  const int64_t h = x.size(-1), rows = x.numel() / h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (rows < 64) {  // decode: one thread, no fork-join
      rms_norm_rows(xp, wp, yp, rows, h, float(eps));
    } else {
      at::parallel_for(0, rows, 16, [&](int64_t a, int64_t b) {
        rms_norm_rows(xp + a * h, wp, yp + a * h, b - a, h, float(eps));
      });
    }
  });
  return y;
}

template <typename T>
void rotate_rows(T* qkv, int64_t row_stride, const int64_t* pos, const float* cos, const float* sin, int64_t rows,
                 int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + pos[r] * half;
    const float* s = sin + pos[r] * half;
    for (int64_t hd = 0; hd < heads; ++hd) {
      T* x = qkv + r * row_stride + hd * d;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
        x[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
        x[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
      }
    }
  }
}

void rotary_embedding_(at::Tensor& qkv, const at::Tensor& positions_in, const at::Tensor& cos_in,
                       const at::Tensor& sin_in, int64_t num_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "rotary_embedding_: qkv must be [T, width] with unit stride");
  TORCH_CHECK(qkv.size(1) >= num_heads * head_dim && head_dim % 2 == 0, "rotary_embedding_: bad head layout");
  auto positions = positions_in.to(at::kLong).contiguous();
  auto cos = cos_in.to(at::kFloat).contiguous();
  auto sin = sin_in.to(at::kFloat).contiguous();
  TORCH_CHECK(positions.numel() == qkv.size(0), "rotary_embedding_: one position per row");
  TORCH_CHECK(cos.size(1) == head_dim / 2, "rotary_embedding_: cos/sin tables must be [positions, head_dim / 2]");
  const int64_t rows = qkv.size(0), max_pos = cos.size(0);
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(pp[r] >= 0 && pp[r] < max_pos, "rotary_embedding_: position ", pp[r], " outside the table (",
                max_pos, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_embedding_", [&] {
    scalar_t* base = qkv.data_ptr<scalar_t>();
    const int64_t stride = qkv.stride(0);
    auto run = [&](int64_t a, int64_t b) {
      rotate_rows(base + a * stride, stride, pp + a, cos.data_ptr<float>(), sin.data_ptr<float>(), b - a,
                  num_heads, head_dim);
    };
    if (rows < 64)
      run(0, rows);
    else
      at::parallel_for(0, rows, 16, run);
  });
}

template <typename T>
void add_rms_norm_rows(const T* x, const T* res, const T* w, T* sum, T* y, int64_t rows, int64_t h, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * h;
    const T* rr = res + r * h;
    T* sr = sum + r * h;
    float ss = 0.f;
    for (int64_t i = 0; i < h; ++i) {
      const T s = static_cast<T>(to_float(xr[i]) + to_float(rr[i]));
      sr[i] = s;
      const float v = to_float(s);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / float(h) + eps);
    T* yr = y + r * h;
    for (int64_t i = 0; i < h; ++i) yr[i] = static_cast<T>(to_float(w[i]) * to_float(static_cast<T>(to_float(sr[i]) * inv)));
  }
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.sizes() == residual_in.sizes(), "add_rms_norm: x and residual shapes differ");
  TORCH_CHECK(x_in.size(-1) == weight_in.size(0), "add_rms_norm: weight has ", weight_in.size(0),
              " values, x rows ", x_in.size(-1));
  TORCH_CHECK(x_in.scalar_type() == residual_in.scalar_type() && x_in.scalar_type() == weight_in.scalar_type(),
              "add_rms_norm: x, residual and weight dtypes differ");
  auto x = x_in.contiguous();
  auto res = residual_in.contiguous();
  auto w = weight_in.contiguous();
  auto sum = at::empty_like(x);
  auto y = at::empty_like(x);
  const int64_t h = x.size(-1), rows = x.numel() / h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = res.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (rows < 64) {
      add_rms_norm_rows(xp, rp, wp, sp, yp, rows, h, float(eps));
    } else {
      at::parallel_for(0, rows, 16, [&](int64_t a, int64_t b) {
        add_rms_norm_rows(xp + a * h, rp + a * h, wp, sp + a * h, yp + a * h, b - a, h, float(eps));
      });
    }
  });
  return {sum, y};
}

template <typename T>
void silu_and_mul_rows(const T* in, T* out, int64_t rows, int64_t inter, int64_t in_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = in + r * in_stride;
    const T* u = g + inter;
    T* o = out + r * inter;
    for (int64_t i = 0; i < inter; ++i) {
      const float gv = to_float(g[i]);
      // silu rounded to the dtype before the product, as F.silu(gate) * up computes it
      const T s = static_cast<T>(gv / (1.f + std::exp(-gv)));
      o[i] = static_cast<T>(to_float(s) * to_float(u[i]));
    }
  }
}

at::Tensor silu_and_mul(const at::Tensor& gate_up_in) {
  TORCH_CHECK(gate_up_in.dim() == 2 && gate_up_in.size(1) % 2 == 0, "silu_and_mul: gate_up must be [T, 2I]");
  auto gate_up = gate_up_in.contiguous();
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({rows, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* ip = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (rows < 16) {
      silu_and_mul_rows(ip, op, rows, inter, 2 * inter);
    } else {
      at::parallel_for(0, rows, 4, [&](int64_t a, int64_t b) {
        silu_and_mul_rows(ip + a * 2 * inter, op + a * inter, b - a, inter, 2 * inter);
      });
    }
  });
  return out;
}

}  // namespace
}  // namespace layer_ops
}  // namespace pernode
