// CpuKernels: every call becomes simulated compute on the SimDevice stream, whose worker runs
// the host math (kernels/cpu_math.hpp) on the device addresses, which are host memory there.
#include "kernels/cpu_kernels.hpp"

#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "kernels/cpu_math.hpp"

namespace spill::kernels {
namespace {

class CpuKernels final : public Kernels {
 public:
  CpuKernels(SimDevice& sim, const Roofline& roofline) : sim_(sim), roofline_(roofline) {
    cpu::set_blas_threads_once();
  }
  std::string name() const override {
    return "cpu: OpenBLAS (1 thread) and host loops on the simulated device's streams, timed by "
           "a roofline";
  }

 private:
  template <class F>
  void run(const Cost& cost, Stream s, F&& work) {
    sim_.enqueue_compute(s, roofline_.time_s(cost), std::forward<F>(work));
  }

  void do_gemm(const Cost& c, Stream s, Trans ta, Trans tb, int m, int n, int k, float alpha,
               const float* a, int lda, std::int64_t sa, const float* b, int ldb,
               std::int64_t sb, float beta, float* cc, int ldc, std::int64_t sc,
               int batch) override {
    run(c, s, [=] {
      cpu::gemm_batched(ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, cc, ldc, sc, batch);
    });
  }
  void do_fill(const Cost& c, Stream s, float* y, float value, std::size_t n) override {
    run(c, s, [=] { cpu::fill(y, value, n); });
  }
  void do_copy(const Cost& c, Stream s, float* y, const float* x, std::size_t n) override {
    run(c, s, [=] { cpu::copy(y, x, n); });
  }
  void do_add(const Cost& c, Stream s, float* y, const float* x, std::size_t n) override {
    run(c, s, [=] { cpu::add(y, x, n); });
  }
  void do_bias_add(const Cost& c, Stream s, float* y, const float* b, int rows,
                   int cols) override {
    run(c, s, [=] { cpu::bias_add(y, b, rows, cols); });
  }
  void do_bias_grad(const Cost& c, Stream s, float* db, const float* dy, int rows,
                    int cols) override {
    run(c, s, [=] { cpu::bias_grad(db, dy, rows, cols); });
  }
  void do_relu_forward(const Cost& c, Stream s, float* y, const float* x,
                       std::size_t n) override {
    run(c, s, [=] { cpu::relu_forward(y, x, n); });
  }
  void do_relu_backward(const Cost& c, Stream s, float* dx, const float* dy, const float* y,
                        std::size_t n) override {
    run(c, s, [=] { cpu::relu_backward(dx, dy, y, n); });
  }
  void do_gelu_forward(const Cost& c, Stream s, float* y, const float* x,
                       std::size_t n) override {
    run(c, s, [=] { cpu::gelu_forward(y, x, n); });
  }
  void do_gelu_backward(const Cost& c, Stream s, float* dx, const float* dy, const float* x,
                        std::size_t n) override {
    run(c, s, [=] { cpu::gelu_backward(dx, dy, x, n); });
  }
  void do_layer_norm_forward(const Cost& c, Stream s, float* y, float* mean, float* rstd,
                             const float* x, const float* gamma, const float* beta, int rows,
                             int cols, float eps) override {
    run(c, s, [=] { cpu::layer_norm_forward(y, mean, rstd, x, gamma, beta, rows, cols, eps); });
  }
  void do_layer_norm_backward(const Cost& c, Stream s, float* dx, float* dgamma, float* dbeta,
                              const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* rstd, int rows, int cols,
                              bool accumulate) override {
    run(c, s, [=] {
      cpu::layer_norm_backward(dx, dgamma, dbeta, dy, x, gamma, mean, rstd, rows, cols,
                               accumulate);
    });
  }
  void do_softmax_xent_forward(const Cost& c, Stream s, float* loss, const float* logits,
                               const std::int32_t* labels, int rows, int classes) override {
    run(c, s, [=] { cpu::softmax_xent_forward(loss, logits, labels, rows, classes); });
  }
  void do_softmax_xent_backward(const Cost& c, Stream s, float* dlogits, const float* logits,
                                const std::int32_t* labels, int rows, int classes) override {
    run(c, s, [=] { cpu::softmax_xent_backward(dlogits, logits, labels, rows, classes); });
  }
  void do_causal_softmax_forward(const Cost& c, Stream s, float* p, const float* scores,
                                 int rows, int t, float scale) override {
    run(c, s, [=] { cpu::causal_softmax_forward(p, scores, rows, t, scale); });
  }
  void do_causal_softmax_backward(const Cost& c, Stream s, float* ds, const float* dp,
                                  const float* p, int rows, int t, float scale) override {
    run(c, s, [=] { cpu::causal_softmax_backward(ds, dp, p, rows, t, scale); });
  }
  void do_embedding_forward(const Cost& c, Stream s, float* y, const std::int32_t* ids,
                            const float* table, const float* pos, int batch, int seq,
                            int dim) override {
    run(c, s, [=] { cpu::embedding_forward(y, ids, table, pos, batch, seq, dim); });
  }
  void do_embedding_backward(const Cost& c, Stream s, float* dtable, float* dpos,
                             const float* dy, const std::int32_t* ids, int batch, int seq,
                             int dim, int vocab) override {
    run(c, s, [=] { cpu::embedding_backward(dtable, dpos, dy, ids, batch, seq, dim, vocab); });
  }
  void do_conv2d_forward(const Cost& c, Stream s, float* y, const float* x, const float* w,
                         const Conv2dShape& sh) override {
    run(c, s, [=] { cpu::conv2d_forward(y, x, w, sh); });
  }
  void do_conv2d_backward_data(const Cost& c, Stream s, float* dx, const float* dy,
                               const float* w, const Conv2dShape& sh) override {
    run(c, s, [=] { cpu::conv2d_backward_data(dx, dy, w, sh); });
  }
  void do_conv2d_backward_filter(const Cost& c, Stream s, float* dw, const float* dy,
                                 const float* x, const Conv2dShape& sh) override {
    run(c, s, [=] { cpu::conv2d_backward_filter(dw, dy, x, sh); });
  }
  void do_batch_norm_forward(const Cost& c, Stream s, float* y, float* mean, float* invstd,
                             const float* x, const float* gamma, const float* beta, int n,
                             int ch, int hw, float eps) override {
    run(c, s, [=] { cpu::batch_norm_forward(y, mean, invstd, x, gamma, beta, n, ch, hw, eps); });
  }
  void do_batch_norm_backward(const Cost& c, Stream s, float* dx, float* dgamma, float* dbeta,
                              const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* invstd, int n, int ch,
                              int hw) override {
    run(c, s, [=] {
      cpu::batch_norm_backward(dx, dgamma, dbeta, dy, x, gamma, mean, invstd, n, ch, hw);
    });
  }
  void do_max_pool_forward(const Cost& c, Stream s, float* y, const float* x,
                           const Pool2dShape& sh) override {
    run(c, s, [=] { cpu::max_pool_forward(y, x, sh); });
  }
  void do_max_pool_backward(const Cost& c, Stream s, float* dx, const float* dy, const float* x,
                            const float*, const Pool2dShape& sh) override {
    run(c, s, [=] { cpu::max_pool_backward(dx, dy, x, sh); });
  }
  void do_avg_pool_forward(const Cost& c, Stream s, float* y, const float* x, int n, int ch,
                           int hw) override {
    run(c, s, [=] { cpu::avg_pool_forward(y, x, n, ch, hw); });
  }
  void do_avg_pool_backward(const Cost& c, Stream s, float* dx, const float* dy, int n, int ch,
                            int hw) override {
    run(c, s, [=] { cpu::avg_pool_backward(dx, dy, n, ch, hw); });
  }
  void do_adamw(const Cost& c, Stream s, float* w, float* m, float* v, const float* g,
                std::size_t n, const AdamW& hp, int step) override {
    run(c, s, [=] { cpu::adamw(w, m, v, g, n, hp, step); });
  }

  SimDevice& sim_;
  Roofline roofline_;
};

}  // namespace

std::unique_ptr<Kernels> make_cpu_kernels(Device& device, const Roofline& roofline) {
  auto* sim = dynamic_cast<SimDevice*>(&device);
  SPILL_EXPECTS(sim != nullptr, "CPU kernels run on the simulated device only; device '" +
                                    device.info().name + "' is not one");
  return std::make_unique<CpuKernels>(*sim, roofline);
}

}  // namespace spill::kernels
