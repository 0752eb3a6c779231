// GpuKernels: cuBLAS for GEMMs (FP32 math, no TF32, atomics not allowed, a fixed workspace so results
// do not depend on the stream), cuDNN for convolution, batch norm and max pooling with
// deterministic algorithms, and spill's own kernels (gpu_launch.hpp) for the rest. Handles and
// the scratch buffer are created on first use.
#include "kernels/gpu_kernels.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#ifdef SPILL_HAVE_CUDNN
#include <cudnn.h>
#endif

#include "core/errors.hpp"
#include "device/cuda_check.hpp"
#include "kernels/gpu_launch.hpp"

namespace spill::kernels {
namespace {

cudaStream_t cs(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

void check_cublas(cublasStatus_t st, const char* call) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw CudaError(std::string(call) + " failed: " + cublasGetStatusString(st), int(st));
}

#ifdef SPILL_HAVE_CUDNN
void check_cudnn(cudnnStatus_t st, const char* call) {
  if (st != CUDNN_STATUS_SUCCESS)
    throw CudaError(std::string(call) + " failed: " + cudnnGetErrorString(st), int(st));
}
#define SPILL_CUDNN(call) check_cudnn((call), #call)

// A 4-d NCHW float tensor descriptor, destroyed with its scope.
struct TensorDesc {
  cudnnTensorDescriptor_t d = nullptr;
  TensorDesc(int n, int c, int h, int w) {
    SPILL_CUDNN(cudnnCreateTensorDescriptor(&d));
    SPILL_CUDNN(cudnnSetTensor4dDescriptor(d, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, n, c, h, w));
  }
  ~TensorDesc() { cudnnDestroyTensorDescriptor(d); }
  TensorDesc(const TensorDesc&) = delete;
  TensorDesc& operator=(const TensorDesc&) = delete;
};

struct ConvDescs {
  TensorDesc x, y;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  explicit ConvDescs(const Conv2dShape& sh)
      : x(sh.n, sh.c, sh.h, sh.w), y(sh.n, sh.k, sh.out_h(), sh.out_w()) {
    SPILL_CUDNN(cudnnCreateFilterDescriptor(&w));
    SPILL_CUDNN(cudnnSetFilter4dDescriptor(w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, sh.k, sh.c,
                                           sh.r, sh.s));
    SPILL_CUDNN(cudnnCreateConvolutionDescriptor(&conv));
    SPILL_CUDNN(cudnnSetConvolution2dDescriptor(conv, sh.pad, sh.pad, sh.stride, sh.stride, 1, 1,
                                                CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    // FP32 FMA only (no TF32 tensor cores): the CPU reference computes in FP32.
    SPILL_CUDNN(cudnnSetConvolutionMathType(conv, CUDNN_FMA_MATH));
  }
  ~ConvDescs() {
    cudnnDestroyConvolutionDescriptor(conv);
    cudnnDestroyFilterDescriptor(w);
  }
};

struct PoolDesc {
  cudnnPoolingDescriptor_t d = nullptr;
  PoolDesc(cudnnPoolingMode_t mode, int wh, int ww, int stride_h, int stride_w) {
    SPILL_CUDNN(cudnnCreatePoolingDescriptor(&d));
    SPILL_CUDNN(cudnnSetPooling2dDescriptor(d, mode, CUDNN_NOT_PROPAGATE_NAN, wh, ww, 0, 0,
                                            stride_h, stride_w));
  }
  ~PoolDesc() { cudnnDestroyPoolingDescriptor(d); }
};
#endif

[[noreturn]] void no_cudnn(const char* what) {
  throw Error(std::string(what) + " on a GPU needs cuDNN, and this build of spill has none");
}

constexpr float kOne = 1.0f, kZero = 0.0f;
constexpr double kBatchNormEps = 1e-5;  // cuDNN takes it again in backward; saved stats rule

class GpuKernels final : public Kernels {
 public:
  ~GpuKernels() override {
    // Destructors must not throw: errors here have nowhere to go.
    if (scratch_) cudaFree(scratch_);
    if (workspace_) cudaFree(workspace_);
    if (blas_) cublasDestroy(blas_);
#ifdef SPILL_HAVE_CUDNN
    if (dnn_) cudnnDestroy(dnn_);
#endif
  }
  std::string name() const override {
    return std::string("cuda: cuBLAS (FP32, deterministic)") +
           (gpu_has_cudnn() ? ", cuDNN (deterministic algorithms)" : ", no cuDNN") +
           ", spill's own kernels";
  }

 private:
  static constexpr std::size_t kWorkspaceBytes = 32u << 20;

  cublasHandle_t blas(Stream s) {
    if (blas_ == nullptr) {
      check_cublas(cublasCreate(&blas_), "cublasCreate");
      check_cublas(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
      check_cublas(cublasSetAtomicsMode(blas_, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
      SPILL_CUDA_TRY(cudaMalloc(&workspace_, kWorkspaceBytes));
    }
    if (!blas_stream_set_ || s != blas_stream_) {
      // cublasSetStream puts the handle back on cuBLAS's default workspace pool (memory of its
      // own per stream, outside the budget): ours must be set again after it, every time.
      check_cublas(cublasSetStream(blas_, cs(s)), "cublasSetStream");
      check_cublas(cublasSetWorkspace(blas_, workspace_, kWorkspaceBytes), "cublasSetWorkspace");
      blas_stream_ = s;
      blas_stream_set_ = true;
    }
    return blas_;
  }

  // Scratch of at least `bytes`, stream-ordered on the one stream these kernels use at a time.
  void* scratch(std::size_t bytes) {
    if (bytes > scratch_bytes_) {
      SPILL_CUDA_TRY(cudaDeviceSynchronize());  // the old buffer may still be in use
      if (scratch_) SPILL_CUDA_TRY(cudaFree(scratch_));
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      SPILL_CUDA_TRY(cudaMalloc(&scratch_, bytes));
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }

#ifdef SPILL_HAVE_CUDNN
  cudnnHandle_t dnn(Stream s) {
    if (dnn_ == nullptr) SPILL_CUDNN(cudnnCreate(&dnn_));
    SPILL_CUDNN(cudnnSetStream(dnn_, cs(s)));
    return dnn_;
  }
#endif

  void do_gemm(const Cost&, Stream s, Trans ta, Trans tb, int m, int n, int k, float alpha,
               const float* a, int lda, std::int64_t sa, const float* b, int ldb,
               std::int64_t sb, float beta, float* c, int ldc, std::int64_t sc,
               int batch) override {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const cublasOperation_t ob = tb == Trans::No ? CUBLAS_OP_N : CUBLAS_OP_T;
    const cublasOperation_t oa = ta == Trans::No ? CUBLAS_OP_N : CUBLAS_OP_T;
    cublasHandle_t h = blas(s);
    if (batch == 1) {
      check_cublas(cublasSgemm(h, ob, oa, n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc),
                   "cublasSgemm");
    } else {
      check_cublas(cublasSgemmStridedBatched(h, ob, oa, n, m, k, &alpha, b, ldb, sb, a, lda, sa,
                                             &beta, c, ldc, sc, batch),
                   "cublasSgemmStridedBatched");
    }
  }
  void do_fill(const Cost&, Stream s, float* y, float value, std::size_t n) override {
    gpu::fill(y, value, n, cs(s));
  }
  void do_copy(const Cost&, Stream s, float* y, const float* x, std::size_t n) override {
    SPILL_CUDA_TRY(cudaMemcpyAsync(y, x, n * sizeof(float), cudaMemcpyDeviceToDevice, cs(s)));
  }
  void do_add(const Cost&, Stream s, float* y, const float* x, std::size_t n) override {
    gpu::add(y, x, n, cs(s));
  }
  void do_bias_add(const Cost&, Stream s, float* y, const float* b, int rows, int cols) override {
    gpu::bias_add(y, b, rows, cols, cs(s));
  }
  void do_bias_grad(const Cost&, Stream s, float* db, const float* dy, int rows,
                    int cols) override {
    gpu::bias_grad(db, dy, rows, cols, scratch(gpu::bias_grad_scratch_bytes(rows, cols)), cs(s));
  }
  void do_relu_forward(const Cost&, Stream s, float* y, const float* x, std::size_t n) override {
    gpu::relu_forward(y, x, n, cs(s));
  }
  void do_relu_backward(const Cost&, Stream s, float* dx, const float* dy, const float* y,
                        std::size_t n) override {
    gpu::relu_backward(dx, dy, y, n, cs(s));
  }
  void do_gelu_forward(const Cost&, Stream s, float* y, const float* x, std::size_t n) override {
    gpu::gelu_forward(y, x, n, cs(s));
  }
  void do_gelu_backward(const Cost&, Stream s, float* dx, const float* dy, const float* x,
                        std::size_t n) override {
    gpu::gelu_backward(dx, dy, x, n, cs(s));
  }
  void do_layer_norm_forward(const Cost&, Stream s, float* y, float* mean, float* rstd,
                             const float* x, const float* gamma, const float* beta, int rows,
                             int cols, float eps) override {
    gpu::layer_norm_forward(y, mean, rstd, x, gamma, beta, rows, cols, eps, cs(s));
  }
  void do_layer_norm_backward(const Cost&, Stream s, float* dx, float* dgamma, float* dbeta,
                              const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* rstd, int rows, int cols,
                              bool accumulate) override {
    gpu::layer_norm_backward(dx, dgamma, dbeta, dy, x, gamma, mean, rstd, rows, cols, accumulate,
                             scratch(gpu::layer_norm_backward_scratch_bytes(rows, cols)), cs(s));
  }
  void do_softmax_xent_forward(const Cost&, Stream s, float* loss, const float* logits,
                               const std::int32_t* labels, int rows, int classes) override {
    gpu::softmax_xent_forward(loss, logits, labels, rows, classes,
                              scratch(gpu::softmax_xent_scratch_bytes(rows)), cs(s));
  }
  void do_softmax_xent_backward(const Cost&, Stream s, float* dlogits, const float* logits,
                                const std::int32_t* labels, int rows, int classes) override {
    gpu::softmax_xent_backward(dlogits, logits, labels, rows, classes, cs(s));
  }
  void do_causal_softmax_forward(const Cost&, Stream s, float* p, const float* scores, int rows,
                                 int t, float scale) override {
    gpu::causal_softmax_forward(p, scores, rows, t, scale, cs(s));
  }
  void do_causal_softmax_backward(const Cost&, Stream s, float* ds, const float* dp,
                                  const float* p, int rows, int t, float scale) override {
    gpu::causal_softmax_backward(ds, dp, p, rows, t, scale, cs(s));
  }
  void do_embedding_forward(const Cost&, Stream s, float* y, const std::int32_t* ids,
                            const float* table, const float* pos, int batch, int seq,
                            int dim) override {
    gpu::embedding_forward(y, ids, table, pos, batch, seq, dim, cs(s));
  }
  void do_embedding_backward(const Cost&, Stream s, float* dtable, float* dpos, const float* dy,
                             const std::int32_t* ids, int batch, int seq, int dim,
                             int vocab) override {
    const std::size_t bytes = gpu::embedding_backward_scratch_bytes(batch, seq);
    gpu::embedding_backward(dtable, dpos, dy, ids, batch, seq, dim, vocab, scratch(bytes), bytes,
                            cs(s));
  }

#ifdef SPILL_HAVE_CUDNN
  void do_conv2d_forward(const Cost&, Stream s, float* y, const float* x, const float* w,
                         const Conv2dShape& sh) override {
    ConvDescs d(sh);
    cudnnHandle_t h = dnn(s);
    const auto algo = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;  // deterministic
    std::size_t bytes = 0;
    SPILL_CUDNN(cudnnGetConvolutionForwardWorkspaceSize(h, d.x.d, d.w, d.conv, d.y.d, algo, &bytes));
    SPILL_CUDNN(cudnnConvolutionForward(h, &kOne, d.x.d, x, d.w, w, d.conv, algo,
                                        scratch(std::max<std::size_t>(bytes, 1)), bytes, &kZero,
                                        d.y.d, y));
  }
  void do_conv2d_backward_data(const Cost&, Stream s, float* dx, const float* dy, const float* w,
                               const Conv2dShape& sh) override {
    ConvDescs d(sh);
    cudnnHandle_t h = dnn(s);
    const auto algo = CUDNN_CONVOLUTION_BWD_DATA_ALGO_1;  // deterministic (ALGO_0 is not)
    std::size_t bytes = 0;
    SPILL_CUDNN(cudnnGetConvolutionBackwardDataWorkspaceSize(h, d.w, d.y.d, d.conv, d.x.d, algo,
                                                             &bytes));
    SPILL_CUDNN(cudnnConvolutionBackwardData(h, &kOne, d.w, w, d.y.d, dy, d.conv, algo,
                                             scratch(std::max<std::size_t>(bytes, 1)), bytes,
                                             &kZero, d.x.d, dx));
  }
  void do_conv2d_backward_filter(const Cost&, Stream s, float* dw, const float* dy,
                                 const float* x, const Conv2dShape& sh) override {
    ConvDescs d(sh);
    cudnnHandle_t h = dnn(s);
    const auto algo = CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1;  // deterministic (0 and 3 are not)
    std::size_t bytes = 0;
    SPILL_CUDNN(cudnnGetConvolutionBackwardFilterWorkspaceSize(h, d.x.d, d.y.d, d.conv, d.w,
                                                               algo, &bytes));
    SPILL_CUDNN(cudnnConvolutionBackwardFilter(h, &kOne, d.x.d, x, d.y.d, dy, d.conv, algo,
                                               scratch(std::max<std::size_t>(bytes, 1)), bytes,
                                               &kZero, d.w, dw));
  }
  void do_batch_norm_forward(const Cost&, Stream s, float* y, float* mean, float* invstd,
                             const float* x, const float* gamma, const float* beta, int n,
                             int c, int hw, float eps) override {
    TensorDesc xd(n, c, hw, 1), pd(1, c, 1, 1);
    // SPATIAL (not SPATIAL_PERSISTENT, which may use atomics); no running averages kept.
    SPILL_CUDNN(cudnnBatchNormalizationForwardTraining(
        dnn(s), CUDNN_BATCHNORM_SPATIAL, &kOne, &kZero, xd.d, x, xd.d, y, pd.d, gamma, beta, 0.0,
        nullptr, nullptr, std::max<double>(eps, CUDNN_BN_MIN_EPSILON), mean, invstd));
  }
  void do_batch_norm_backward(const Cost&, Stream s, float* dx, float* dgamma, float* dbeta,
                              const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* invstd, int n, int c,
                              int hw) override {
    TensorDesc xd(n, c, hw, 1), pd(1, c, 1, 1);
    SPILL_CUDNN(cudnnBatchNormalizationBackward(dnn(s), CUDNN_BATCHNORM_SPATIAL, &kOne, &kZero,
                                                &kOne, &kZero, xd.d, x, xd.d, dy, xd.d, dx, pd.d,
                                                gamma, dgamma, dbeta, kBatchNormEps, mean,
                                                invstd));
  }
  void do_max_pool_forward(const Cost&, Stream s, float* y, const float* x,
                           const Pool2dShape& sh) override {
    TensorDesc xd(sh.n, sh.c, sh.h, sh.w), yd(sh.n, sh.c, sh.out_h(), sh.out_w());
    PoolDesc p(CUDNN_POOLING_MAX_DETERMINISTIC, sh.window, sh.window, sh.stride, sh.stride);
    SPILL_CUDNN(cudnnPoolingForward(dnn(s), p.d, &kOne, xd.d, x, &kZero, yd.d, y));
  }
  void do_max_pool_backward(const Cost&, Stream s, float* dx, const float* dy, const float* x,
                            const float* y, const Pool2dShape& sh) override {
    TensorDesc xd(sh.n, sh.c, sh.h, sh.w), yd(sh.n, sh.c, sh.out_h(), sh.out_w());
    PoolDesc p(CUDNN_POOLING_MAX_DETERMINISTIC, sh.window, sh.window, sh.stride, sh.stride);
    SPILL_CUDNN(cudnnPoolingBackward(dnn(s), p.d, &kOne, yd.d, y, yd.d, dy, xd.d, x, &kZero, xd.d,
                                     dx));
  }
#else
  void do_conv2d_forward(const Cost&, Stream, float*, const float*, const float*,
                         const Conv2dShape&) override { no_cudnn("conv2d"); }
  void do_conv2d_backward_data(const Cost&, Stream, float*, const float*, const float*,
                               const Conv2dShape&) override { no_cudnn("conv2d"); }
  void do_conv2d_backward_filter(const Cost&, Stream, float*, const float*, const float*,
                                 const Conv2dShape&) override { no_cudnn("conv2d"); }
  void do_batch_norm_forward(const Cost&, Stream, float*, float*, float*, const float*,
                             const float*, const float*, int, int, int, float) override {
    no_cudnn("batch norm");
  }
  void do_batch_norm_backward(const Cost&, Stream, float*, float*, float*, const float*,
                              const float*, const float*, const float*, const float*, int, int,
                              int) override { no_cudnn("batch norm"); }
  void do_max_pool_forward(const Cost&, Stream, float*, const float*,
                           const Pool2dShape&) override { no_cudnn("pooling"); }
  void do_max_pool_backward(const Cost&, Stream, float*, const float*, const float*,
                            const float*, const Pool2dShape&) override { no_cudnn("pooling"); }
#endif
  // Global average pooling is a plain reduction: spill's own kernels (no aliasing of cuDNN's
  // backward inputs, which needs x and y even for averages).
  void do_avg_pool_forward(const Cost&, Stream s, float* y, const float* x, int n, int c,
                           int hw) override {
    gpu::avg_pool_forward(y, x, n, c, hw, cs(s));
  }
  void do_avg_pool_backward(const Cost&, Stream s, float* dx, const float* dy, int n, int c,
                            int hw) override {
    gpu::avg_pool_backward(dx, dy, n, c, hw, cs(s));
  }
  void do_adamw(const Cost&, Stream s, float* w, float* m, float* v, const float* g,
                std::size_t n, const AdamW& hp, int step) override {
    gpu::adamw(w, m, v, g, n, cpu::adamw_scalars(hp, step), cs(s));
  }

  cublasHandle_t blas_ = nullptr;
  Stream blas_stream_ = nullptr;  // the stream (and with it our workspace) the handle has
  bool blas_stream_set_ = false;
#ifdef SPILL_HAVE_CUDNN
  cudnnHandle_t dnn_ = nullptr;
#endif
  void* workspace_ = nullptr;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
};

}  // namespace

bool gpu_has_cudnn() {
#ifdef SPILL_HAVE_CUDNN
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Kernels> make_gpu_kernels(Device& device) {
  SPILL_EXPECTS(device.info().backend == Backend::Cuda,
                "GPU kernels need a CUDA device; '" + device.info().name + "' is not one");
  SPILL_CUDA_TRY(cudaSetDevice(device.info().ordinal));
  return std::make_unique<GpuKernels>();
}

}  // namespace spill::kernels
