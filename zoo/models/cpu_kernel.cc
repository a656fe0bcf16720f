// Batched float32 matmul for XLA:CPU through the XLA FFI: C[i] = op(A[i]) @ op(B[i]) for every
// index i of the (equal) leading dimensions of A and B, row-major, op = identity or transpose.
//
// Why: XLA:CPU runs a batched dot of many small matrices (attention's [B, H, L, D] products)
// at 1.4-2.2x the time of one BLAS sgemm per matrix (zoo/models/cpu_kernel.py). Here each
// matrix is one single-threaded sgemm call and the matrices are spread over XLA's own
// intra-op thread pool, so BLAS threads never compete with XLA's.
//
// The sgemm (Fortran ABI) and a per-thread "use one thread" setter come from Python at load
// time (scipy's BLAS); nothing here links against a BLAS library.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef void (*SgemmFn)(const char*, const char*, const int*, const int*, const int*,
                        const float*, const float*, const int*, const float*, const int*,
                        const float*, float*, const int*);
typedef int (*SetThreadsFn)(int);

static SgemmFn g_sgemm = nullptr;
static SetThreadsFn g_set_local_threads = nullptr;

extern "C" void zoo_set_blas(void* sgemm, void* set_local_threads) {
  g_sgemm = reinterpret_cast<SgemmFn>(sgemm);
  g_set_local_threads = reinterpret_cast<SetThreadsFn>(set_local_threads);
}

namespace {

// One call's work, shared by the calling thread and the pool tasks it schedules. Tasks take
// chunks of matrices from `next` until none is left, so the caller never waits on a task
// that has not started (no deadlock when every pool thread is busy elsewhere).
struct Job {
  const float* a;
  const float* b;
  float* c;
  bool trans_a, trans_b;
  int m, n, k, lda, ldb, ldc;
  int64_t stride_a, stride_b, stride_c, matrices, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void RunChunk(int64_t chunk_index) const {
    const float one = 1.f, zero = 0.f;
    const int64_t end = std::min(matrices, (chunk_index + 1) * chunk);
    for (int64_t i = chunk_index * chunk; i < end; ++i) {
      // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
      g_sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &one, b + i * stride_b,
              &ldb, a + i * stride_a, &lda, &zero, c + i * stride_c, &ldc);
    }
  }

  void Work() {
    if (g_set_local_threads != nullptr) g_set_local_threads(1);
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
      RunChunk(i);
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

ffi::Error BatchedSgemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (g_sgemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "zoo_batched_sgemm: no BLAS set");
  }
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  const size_t rank = a_dims.size();
  if (rank < 2 || b_dims.size() != rank) {
    return ffi::Error::InvalidArgument("zoo_batched_sgemm: operands need the same rank >= 2");
  }
  auto job = std::make_shared<Job>();
  job->matrices = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (a_dims[i] != b_dims[i]) {
      return ffi::Error::InvalidArgument("zoo_batched_sgemm: leading dimensions differ");
    }
    job->matrices *= a_dims[i];
  }
  const int64_t a_rows = a_dims[rank - 2], a_cols = a_dims[rank - 1];
  const int64_t b_rows = b_dims[rank - 2], b_cols = b_dims[rank - 1];
  job->a = a.typed_data();
  job->b = b.typed_data();
  job->c = c->typed_data();
  job->trans_a = trans_a;
  job->trans_b = trans_b;
  const int64_t kMaxBlasInt = std::numeric_limits<int>::max();
  if (std::max({a_rows, a_cols, b_rows, b_cols}) > kMaxBlasInt) {
    return ffi::Error::InvalidArgument("zoo_batched_sgemm: a matrix side exceeds BLAS's int");
  }
  job->m = static_cast<int>(trans_a ? a_cols : a_rows);
  job->k = static_cast<int>(trans_a ? a_rows : a_cols);
  job->n = static_cast<int>(trans_b ? b_rows : b_cols);
  if ((trans_b ? b_cols : b_rows) != job->k) {
    return ffi::Error::InvalidArgument("zoo_batched_sgemm: contracted dimensions differ");
  }
  job->lda = std::max(1, static_cast<int>(a_cols));  // BLAS wants leading dimensions >= 1
  job->ldb = std::max(1, static_cast<int>(b_cols));
  job->ldc = std::max(1, job->n);
  job->stride_a = a_rows * a_cols;
  job->stride_b = b_rows * b_cols;
  job->stride_c = static_cast<int64_t>(job->m) * job->n;
  if (job->matrices == 0 || job->stride_c == 0) return ffi::Error::Success();
  if (job->k == 0) {  // an empty sum: zeros, without asking BLAS about 0-wide operands
    std::fill(job->c, job->c + job->matrices * job->stride_c, 0.f);
    return ffi::Error::Success();
  }
  // At most 32 threads call sgemm at once: OpenBLAS builds keep a fixed number of per-thread
  // buffers (MAX_THREADS, 64 in scipy's wheels).
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, 32);
  // About four chunks per thread: small enough to even out, large enough to amortise.
  job->chunk = std::max<int64_t>(1, (job->matrices + 4 * threads - 1) / (4 * threads));
  job->chunks = (job->matrices + job->chunk - 1) / job->chunk;
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) {
    pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->all_done.wait(lock, [&] { return job->done.load() == job->chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooBatchedSgemm, BatchedSgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
