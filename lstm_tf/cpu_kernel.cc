// The LSTM recurrence of lstm_tf's training path as two TensorFlow CPU ops.
//
// LstmTfForward and LstmTfBackward take and give exactly what the XLA loops
// `_forward` and `_backward` of lstm_tf/fused.py do (float32, time-major), or
// the same arrays batch-major (`batch_major`: the layers' own layout, which
// spares them transposes); the maths is the same, step for step. Built on
// first use by lstm_tf/cpu_kernel.py.
//
// Why a kernel: at the sizes people train (32-512 units) one step of the
// recurrence is a small matmul and a little element-wise work, and what
// counts is how little happens around them. Each step here is one Eigen matmul
// per slice of units and, in the same pass over that slice, all of its
// element-wise work (the product stays in cache); the units are split into
// slices of multiples of 16 columns, one per thread, and the threads wait for
// each other between steps by spinning (the thread pool's own hand-off costs
// more than a small step).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "Eigen/Core"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Strided = Eigen::OuterStride<>;
using ConstBlock = Eigen::Map<const Matrix, 0, Strided>;
using Block = Eigen::Map<Matrix, 0, Strided>;

inline float Sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }
// Odd by construction, so that tanh(0) is exactly 0 (a dropped input gives h = 0).
inline float Tanh(float z) {
  const float t = std::exp(-2.0f * std::fabs(z));
  return std::copysign((1.0f - t) / (1.0f + t), z);
}

// The units [begin, end) of each slice: as many slices as threads, each a
// multiple of 16 units wide (the last takes the rest), at least 16 units each.
std::vector<int64_t> Slices(int64_t units, int threads) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, units / 16));
  std::vector<int64_t> bounds(n + 1, units);
  for (int64_t s = 0; s < n; ++s) bounds[s] = (units * s / n) / 16 * 16;
  return bounds;
}

// Waits (spinning: a step takes microseconds, too short to sleep on) until
// `done` reaches `target`, yielding the core after a while in case the thread
// it waits for is not running.
void WaitFor(const std::atomic<int64_t>& done, int64_t target) {
  for (int spins = 0; done.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// Runs `work(t, s)` for each step t < steps in order and each slice s < n of it,
// on the calling thread and on up to n - 1 of the op's worker threads, which
// join as they become free (with none free, the calling thread does it all).
// Each thread takes the next slice not yet taken, and starts it once the step
// before is complete.
void ForEachStep(OpKernelContext* ctx, int64_t steps, int64_t n,
                 const std::function<void(int64_t, int64_t)>& work) {
  if (n == 1) {
    for (int64_t t = 0; t < steps; ++t) work(t, 0);
    return;
  }
  struct Progress {
    std::atomic<int64_t> taken{0}, done{0};
  };
  const int64_t total = steps * n;
  auto progress = std::make_shared<Progress>();
  // A helper that starts after the last slice is taken returns at once, without
  // touching `work` (whose owner may have returned by then).
  auto run = [progress, total, n, &work] {
    for (int64_t k; (k = progress->taken.fetch_add(1)) < total;) {
      WaitFor(progress->done, k / n * n);
      work(k / n, k % n);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  for (int64_t i = 1; i < n; ++i) workers->Schedule(run);
  run();
  WaitFor(progress->done, total);
}

class RecurrenceOp : public OpKernel {
 public:
  explicit RecurrenceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("threads", &threads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("batch_major", &batch_major_));
  }

 protected:
  // Where step t of sequence b is in an array of `length` steps of `batch`
  // sequences, in rows: [T, B, ·] arrays, or [B, T, ·] ones with batch_major.
  struct Layout {
    bool batch_major;
    int64_t length, batch;
    int64_t Row(int64_t t, int64_t b) const {
      return batch_major ? b * length + t : t * batch + b;
    }
    int64_t RowsPerSequence() const { return batch_major ? length : 1; }  // from b to b + 1
  };

  // The layout of `input` [T, B, ·] or [B, T, ·].
  Layout LayoutOf(const Tensor& input) const {
    const int64_t dim0 = input.dim_size(0), dim1 = input.dim_size(1);
    return batch_major_ ? Layout{true, dim1, dim0} : Layout{false, dim0, dim1};
  }

  // The slices for `units` units: `threads` of them, or one per worker thread.
  std::vector<int64_t> SlicesOf(OpKernelContext* ctx, int64_t units) const {
    const int threads = threads_ > 0
        ? threads_ : ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
    return Slices(units, threads);
  }

  // Output `index`, all zeros (null if it cannot be allocated).
  static float* Output(OpKernelContext* ctx, int index, const TensorShape& shape) {
    float* data = Uninitialized(ctx, index, shape);
    if (data != nullptr) std::fill_n(data, shape.num_elements(), 0.0f);
    return data;
  }

  // Output `index` [T, B, width] or [B, T, width], zeros at the steps from `steps`
  // on (the ones before are the op's to write).
  static float* Steps(OpKernelContext* ctx, int index, const TensorShape& shape,
                      const Layout& at, int64_t steps) {
    float* data = Uninitialized(ctx, index, shape);
    if (data == nullptr) return nullptr;
    const int64_t width = shape.dim_size(2);
    for (int64_t b = 0; b < at.batch; ++b)
      for (int64_t t = steps; t < at.length; ++t)
        std::fill_n(data + at.Row(t, b) * width, width, 0.0f);
    return data;
  }

 private:
  static float* Uninitialized(OpKernelContext* ctx, int index, const TensorShape& shape) {
    Tensor* out = nullptr;
    ctx->SetStatus(ctx->allocate_output(index, shape, &out));
    return out == nullptr ? nullptr : out->flat<float>().data();
  }

  int threads_;
  bool batch_major_;
};

// (H, Cs, G) [T, B, ·] (or [B, T, ·]): h_t, C_t and the gates i, f, C̃, o after
// each of the first `steps` steps (zeros after), from xw [T, B, 4M] = x_t·W (or
// [B, T, 4M]).
class ForwardOp : public RecurrenceOp {
 public:
  using RecurrenceOp::RecurrenceOp;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xw_in = ctx->input(0);
    const Layout at = LayoutOf(xw_in);
    const int64_t length = at.length, batch = at.batch;
    const int64_t m = ctx->input(2).dim_size(1), g = 4 * m;
    const int64_t steps = std::clamp<int64_t>(ctx->input(1).scalar<int32_t>()(), 0, length);
    const float* xw = xw_in.flat<float>().data();
    const float* h0 = ctx->input(2).flat<float>().data();
    const float* c0 = ctx->input(3).flat<float>().data();
    const float* kernel = ctx->input(4).flat<float>().data();
    const float* bias = ctx->input(5).flat<float>().data();
    TensorShape states = xw_in.shape();
    states.set_dim(2, m);
    float* hs = Steps(ctx, 0, states, at, steps);
    float* cs = Steps(ctx, 1, states, at, steps);
    float* gates = Steps(ctx, 2, xw_in.shape(), at, steps);
    if (!ctx->status().ok()) return;

    // The recurrent kernel with each slice's four gates side by side (columns
    // [4·begin, 4·end): i, f, C̃, o of its units), so that a slice's h_{t-1}·U
    // is one matmul; z holds that product, in the same layout.
    const std::vector<int64_t> bounds = SlicesOf(ctx, m);
    const int64_t n = bounds.size() - 1;
    std::vector<float> packed(m * g), z(batch * g);
    for (int64_t s = 0; s < n; ++s) {
      const int64_t begin = bounds[s], width = bounds[s + 1] - begin;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t gate = 0; gate < 4; ++gate)
          std::memcpy(&packed[r * g + 4 * begin + gate * width],
                      &kernel[r * g + gate * m + begin], width * sizeof(float));
    }

    ForEachStep(ctx, steps, n, [&](int64_t t, int64_t s) {
      // The states before step t: rows `stride` apart.
      const float* h_prev = t == 0 ? h0 : hs + at.Row(t - 1, 0) * m;
      const float* c_prev = t == 0 ? c0 : cs + at.Row(t - 1, 0) * m;
      const int64_t stride = t == 0 ? m : at.RowsPerSequence() * m;
      const int64_t begin = bounds[s], width = bounds[s + 1] - begin;
      Block(&z[4 * begin], batch, 4 * width, Strided(g)).noalias() =
          ConstBlock(h_prev, batch, m, Strided(stride)) *
          ConstBlock(&packed[4 * begin], m, 4 * width, Strided(g));
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t row = at.Row(t, b);
        const float* zb = &z[b * g + 4 * begin];
        const float* xb = xw + row * g + begin;
        const float* bb = bias + begin;
        float* gb = gates + row * g + begin;
        const float* cp = c_prev + b * stride + begin;
        float* cb = cs + row * m + begin;
        float* hb = hs + row * m + begin;
#pragma omp simd
        for (int64_t k = 0; k < width; ++k) {
          const float i = Sigmoid(zb[k] + xb[k] + bb[k]);
          const float f = Sigmoid(zb[width + k] + xb[m + k] + bb[m + k]);
          const float candidate = Tanh(zb[2 * width + k] + xb[2 * m + k] + bb[2 * m + k]);
          const float o = Sigmoid(zb[3 * width + k] + xb[3 * m + k] + bb[3 * m + k]);
          const float c = f * cp[k] + i * candidate;
          gb[k] = i;
          gb[m + k] = f;
          gb[2 * m + k] = candidate;
          gb[3 * m + k] = o;
          cb[k] = c;
          hb[k] = o * Tanh(c);
        }
      }
    });
  }
};

// (dz, dh0, dc0, d_bias): dz [T, B, 4M] (or [B, T, 4M]) the gradient of z_t = x_t·W + h_{t-1}·U + b
// over the first `steps` steps (zeros after), the initial state's gradient
// through the loop (the final state's gradient for an empty sequence is the
// caller's to add), and Σ dz over steps and batch.
class BackwardOp : public RecurrenceOp {
 public:
  using RecurrenceOp::RecurrenceOp;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& cs_in = ctx->input(5);
    const Layout at = LayoutOf(cs_in);
    const int64_t length = at.length, batch = at.batch;
    const int64_t m = cs_in.dim_size(2), g = 4 * m;
    const int64_t steps = std::clamp<int64_t>(ctx->input(3).scalar<int32_t>()(), 0, length);
    const float* d_hs = ctx->input(0).flat<float>().data();
    const float* d_h = ctx->input(1).flat<float>().data();
    const float* d_c = ctx->input(2).flat<float>().data();
    const int32_t* lengths = ctx->input(4).flat<int32_t>().data();
    const float* cs = cs_in.flat<float>().data();
    const float* gates = ctx->input(6).flat<float>().data();
    const float* c0 = ctx->input(7).flat<float>().data();
    const float* kernel = ctx->input(8).flat<float>().data();
    float* dz = Steps(ctx, 0, ctx->input(6).shape(), at, steps);  // gates' shape
    float* dh_next = Output(ctx, 1, TensorShape({batch, m}));  // dz_{t+1}·Uᵀ, at last dh0
    float* dc_next = Output(ctx, 2, TensorShape({batch, m}));  // dC_{t+1} ⊙ f_{t+1}, at last dc0
    float* d_bias = Output(ctx, 3, TensorShape({g}));
    if (!ctx->status().ok()) return;
    // Σ dz: over the batch in float at each step (step_sum), then over the steps
    // in double (a float sum of that many terms would lose digits).
    std::vector<float> step_sum(g);
    std::vector<double> bias_sum(g);

    // A slice's columns of dz_{t+1}·Uᵀ are its rows of U (contiguous) times dz_{t+1}.
    const std::vector<int64_t> bounds = SlicesOf(ctx, m);
    const int64_t n = bounds.size() - 1;
    auto recurrent = [&](int64_t s, int64_t t) {  // dh_next's slice from dz_t
      const int64_t begin = bounds[s], width = bounds[s + 1] - begin;
      Block(dh_next + begin, batch, width, Strided(m)).noalias() =
          ConstBlock(dz + at.Row(t, 0) * g, batch, g, Strided(at.RowsPerSequence() * g)) *
          ConstBlock(kernel + begin * g, width, g, Strided(g)).transpose();
    };
    // The loop's step j is t = steps - 1 - j; one more gives dh0 = dz_0·Uᵀ.
    ForEachStep(ctx, steps + (steps > 0), n, [&](int64_t j, int64_t s) {
      const int64_t t = steps - 1 - j;
      if (t < steps - 1) recurrent(s, t + 1);
      if (t < 0) return;
      const int64_t begin = bounds[s], width = bounds[s + 1] - begin;
      for (int64_t gate = 0; gate < 4; ++gate)
        std::fill_n(&step_sum[gate * m + begin], width, 0.0f);
      for (int64_t b = 0; b < batch; ++b) {
        const bool last = t == lengths[b] - 1;  // the final state's gradient enters here
        const int64_t row = at.Row(t, b);
        const float* gb = gates + row * g + begin;
        const float* cb = cs + row * m + begin;
        const float* cp = (t == 0 ? c0 + b * m : cs + at.Row(t - 1, b) * m) + begin;
        const float* dhs = d_hs + row * m + begin;
        const float* dhf = d_h + b * m + begin;
        const float* dcf = d_c + b * m + begin;
        float* dhn = dh_next + b * m + begin;
        float* dcn = dc_next + b * m + begin;
        float* dzb = dz + row * g + begin;
        float* db = &step_sum[begin];
#pragma omp simd
        for (int64_t k = 0; k < width; ++k) {
          const float i = gb[k], f = gb[m + k], candidate = gb[2 * m + k], o = gb[3 * m + k];
          const float tanh_c = Tanh(cb[k]);
          const float dh = dhs[k] + dhn[k] + (last ? dhf[k] : 0.0f);
          const float dc = dcn[k] + (last ? dcf[k] : 0.0f) + dh * o * (1.0f - tanh_c * tanh_c);
          dzb[k] = dc * candidate * i * (1.0f - i);
          dzb[m + k] = dc * cp[k] * f * (1.0f - f);
          dzb[2 * m + k] = dc * i * (1.0f - candidate * candidate);
          dzb[3 * m + k] = dh * tanh_c * o * (1.0f - o);
          dcn[k] = dc * f;
          db[k] += dzb[k];
          db[m + k] += dzb[m + k];
          db[2 * m + k] += dzb[2 * m + k];
          db[3 * m + k] += dzb[3 * m + k];
        }
      }
      for (int64_t gate = 0; gate < 4; ++gate)
        for (int64_t k = begin; k < begin + width; ++k)
          bias_sum[gate * m + k] += step_sum[gate * m + k];
    });
    std::copy(bias_sum.begin(), bias_sum.end(), d_bias);
  }
};

tensorflow::Status SameAs(InferenceContext* c, int output, int input) {
  c->set_output(output, c->input(input));
  return tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("LstmTfForward")
    .Input("xw: float")
    .Input("steps: int32")
    .Input("h0: float")
    .Input("c0: float")
    .Input("recurrent_kernel: float")
    .Input("bias: float")
    .Attr("threads: int = 0")
    .Attr("batch_major: bool = false")
    .Output("hs: float")
    .Output("cs: float")
    .Output("gates: float")
    .SetShapeFn([](InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle hs;
      TF_RETURN_IF_ERROR(c->ReplaceDim(c->input(0), 2, c->Dim(c->input(2), 1), &hs));
      c->set_output(0, hs);
      c->set_output(1, hs);
      return SameAs(c, 2, 0);
    });

REGISTER_OP("LstmTfBackward")
    .Input("d_hs: float")
    .Input("d_h: float")
    .Input("d_c: float")
    .Input("steps: int32")
    .Input("lengths: int32")
    .Input("cs: float")
    .Input("gates: float")
    .Input("c0: float")
    .Input("recurrent_kernel: float")
    .Attr("threads: int = 0")
    .Attr("batch_major: bool = false")
    .Output("dz: float")
    .Output("dh0: float")
    .Output("dc0: float")
    .Output("d_bias: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(6));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      c->set_output(3, c->Vector(c->Dim(c->input(8), 1)));
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("LstmTfForward").Device(tensorflow::DEVICE_CPU), ForwardOp);
REGISTER_KERNEL_BUILDER(Name("LstmTfBackward").Device(tensorflow::DEVICE_CPU), BackwardOp);
