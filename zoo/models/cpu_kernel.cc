// Float32 kernels for XLA:CPU through the XLA FFI:
//  * ZooBatchedSgemm: C[i] = op(A[i]) @ op(B[i]) for every index i of the (equal) leading
//    dimensions of A and B, row-major, op = identity or transpose;
//  * ZooPackedAttention{Forward,Backward}: softmax self-attention over a packed qkv projection
//    ([B, L, 3, H, D]), one (batch, head) block at a time (see the section below);
//  * ZooLayerNorm{Forward,Backward}: LayerNorm over the last axis;
//  * ZooDenseWeightGradient: a dense layer's x^T g and bias sums over packed blocks.
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
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define ZOO_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// Row-major C = alpha op(A) op(B) through the column-major sgemm: C^T = op(B)^T op(A)^T.
void RowMajorGemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                  int lda, const float* b, int ldb, float* c, int ldc) {
  const float zero = 0.f;
  g_sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &zero,
          c, &ldc);
}

// Runs body(i) for i in [0, count) over XLA's intra-op pool: the work is cut into about four
// chunks per thread, which the calling thread and the pool tasks take from a shared counter
// until none is left, so the caller never waits on a task that has not started (no deadlock
// when every pool thread is busy elsewhere). Each thread asks OpenBLAS for one thread first.
// `max_threads`: OpenBLAS builds keep a fixed number of per-thread buffers (MAX_THREADS, 64 in
// scipy's wheels), so at most 32 threads call sgemm at once; loops without BLAS take them all.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, Body body, int64_t max_threads) {
  struct Job {
    Body body;
    int64_t count, chunk, chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable all_done;

    explicit Job(Body b) : body(std::move(b)) {}
    void Work() {
      if (g_set_local_threads != nullptr) g_set_local_threads(1);
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        const int64_t end = std::min(count, (c + 1) * chunk);
        for (int64_t i = c * chunk; i < end; ++i) body(i);
        if (done.fetch_add(1) + 1 == chunks) {
          std::lock_guard<std::mutex> lock(mu);
          all_done.notify_all();
        }
      }
    }
  };
  if (count <= 0) return;
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, max_threads);
  auto job = std::make_shared<Job>(std::move(body));
  job->count = count;
  job->chunk = std::max<int64_t>(1, (count + 4 * threads - 1) / (4 * threads));
  job->chunks = (count + job->chunk - 1) / job->chunk;
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) {
    pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->all_done.wait(lock, [&] { return job->done.load() == job->chunks; });
}

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
  int64_t matrices = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (a_dims[i] != b_dims[i]) {
      return ffi::Error::InvalidArgument("zoo_batched_sgemm: leading dimensions differ");
    }
    matrices *= a_dims[i];
  }
  const int64_t a_rows = a_dims[rank - 2], a_cols = a_dims[rank - 1];
  const int64_t b_rows = b_dims[rank - 2], b_cols = b_dims[rank - 1];
  const int64_t kMaxBlasInt = std::numeric_limits<int>::max();
  if (std::max({a_rows, a_cols, b_rows, b_cols}) > kMaxBlasInt) {
    return ffi::Error::InvalidArgument("zoo_batched_sgemm: a matrix side exceeds BLAS's int");
  }
  const int m = static_cast<int>(trans_a ? a_cols : a_rows);
  const int k = static_cast<int>(trans_a ? a_rows : a_cols);
  const int n = static_cast<int>(trans_b ? b_rows : b_cols);
  if ((trans_b ? b_cols : b_rows) != k) {
    return ffi::Error::InvalidArgument("zoo_batched_sgemm: contracted dimensions differ");
  }
  const int lda = std::max(1, static_cast<int>(a_cols));  // BLAS wants leading dimensions >= 1
  const int ldb = std::max(1, static_cast<int>(b_cols));
  const int ldc = std::max(1, n);
  const int64_t stride_a = a_rows * a_cols, stride_b = b_rows * b_cols;
  const int64_t stride_c = static_cast<int64_t>(m) * n;
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* c_data = c->typed_data();
  if (matrices == 0 || stride_c == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum: zeros, without asking BLAS about 0-wide operands
    std::fill(c_data, c_data + matrices * stride_c, 0.f);
    return ffi::Error::Success();
  }
  ParallelFor(pool, matrices, [=](int64_t i) {
    RowMajorGemm(trans_a, trans_b, m, n, k, 1.f, a_data + i * stride_a, lda,
                 b_data + i * stride_b, ldb, c_data + i * stride_c, ldc);
  }, /*max_threads=*/32);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Self-attention over a packed qkv projection, forward and backward, one (batch, head) per task.
//
// qkv is [B, L, 3, H, D] (the fused projection's output reshaped, unchanged in memory): the
// query, key and value matrices of (b, h) are L x D views with row stride 3*H*D, so no
// transpose to a heads-major layout is made; the output is written as [B, L, H, D] (the input
// of the output projection) and the gradient as [B, L, 3, H, D]. Per (b, h) the scores, the
// softmax and the products run on one L x L block that stays in the core's cache, instead of
// whole [B, H, L, L] tensors going through memory between separate XLA ops.
// ---------------------------------------------------------------------------------------------

// A small register-tiled matmul for attention's blocks (OpenBLAS's sgemm reaches only ~60
// GFLOP/s per core on 197 x 197 x 32 products here, about half of this loop's speed):
//   C[i][j] = alpha * sum_k A(i, k) * B[k][j]   for i < M, j < N,
// with A(i, k) = a[i * a_row + k * a_col] (any strides, so A may be a transposed view) and the
// rows of B contiguous (row stride ldb). Columns are taken 32 or 16 at a time into vector
// registers (GCC/Clang vector extensions: AVX-512 registers with -march=native where the CPU
// has them), kRows rows of C per tile. `readable` is how many columns of each B row may be read
// (>= N; a padded, packed B lets the last tile run full width and store only what fits).
typedef float Vec16 __attribute__((vector_size(64)));

inline Vec16 Load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#ifdef __AVX512F__
constexpr int kRows = 8;  // 8 x 2 accumulators + 2 B vectors of the 32 zmm registers
#else
constexpr int kRows = 3;  // 16 ymm registers: each Vec16 takes two
#endif

template <int R, int V>
void Tile(int K, float alpha, const float* a, int64_t a_row, int64_t a_col, const float* b,
          int64_t ldb, float* c, int64_t ldc, int store_cols) {
  Vec16 acc[R][V] = {};
#pragma GCC unroll 2
  for (int k = 0; k < K; ++k) {
    Vec16 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = Load16(b + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float ar = a[r * a_row + k * a_col];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] += ar * bv[v];
    }
  }
  if (store_cols >= 16 * V) {  // whole vectors (a fixed-size memcpy is one vector store)
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        const Vec16 scaled = alpha * acc[r][v];
        std::memcpy(c + r * ldc + 16 * v, &scaled, sizeof(scaled));
      }
    }
    return;
  }
  for (int r = 0; r < R; ++r) {  // the last, partial columns of a padded B
    float out[16 * V];
    for (int v = 0; v < V; ++v) {
      const Vec16 scaled = alpha * acc[r][v];
      std::memcpy(out + 16 * v, &scaled, sizeof(scaled));
    }
    std::memcpy(c + r * ldc, out, sizeof(float) * store_cols);
  }
}

// Tile<rows, V> for a row count known only at run time (1 <= rows <= R).
template <int V, int R>
void TileRemainder(int rows, int K, float alpha, const float* a, int64_t a_row, int64_t a_col,
                   const float* b, int64_t ldb, float* c, int64_t ldc, int store_cols) {
  if constexpr (R > 0) {
    if (rows == R) {
      Tile<R, V>(K, alpha, a, a_row, a_col, b, ldb, c, ldc, store_cols);
    } else {
      TileRemainder<V, R - 1>(rows, K, alpha, a, a_row, a_col, b, ldb, c, ldc, store_cols);
    }
  }
}

template <int V>
void TileColumns(int M, int K, float alpha, const float* a, int64_t a_row, int64_t a_col,
                 const float* b, int64_t ldb, float* c, int64_t ldc, int store_cols) {
  int i = 0;
  for (; i + kRows <= M; i += kRows) {
    Tile<kRows, V>(K, alpha, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, store_cols);
  }
  if (i < M) {  // the last rows, fewer than a tile
    TileRemainder<V, kRows - 1>(M - i, K, alpha, a + i * a_row, a_row, a_col, b, ldb,
                                c + i * ldc, ldc, store_cols);
  }
}

void SmallGemm(int M, int N, int K, float alpha, const float* a, int64_t a_row, int64_t a_col,
               const float* b, int64_t ldb, int readable, float* c, int64_t ldc) {
  int j = 0;
  for (; j + 32 <= readable && j < N; j += 32) {
    TileColumns<2>(M, K, alpha, a, a_row, a_col, b + j, ldb, c + j, ldc, N - j);
  }
  for (; j + 16 <= readable && j < N; j += 16) {
    TileColumns<1>(M, K, alpha, a, a_row, a_col, b + j, ldb, c + j, ldc, N - j);
  }
  if (j < N) {  // fewer than 16 columns left that may not be read 16 at a time: a padded copy
    thread_local std::vector<float> tail;
    tail.assign(static_cast<size_t>(K) * 16, 0.f);
    for (int k = 0; k < K; ++k) {
      std::memcpy(&tail[k * 16], b + k * ldb + j, sizeof(float) * (N - j));
    }
    TileColumns<1>(M, K, alpha, a, a_row, a_col, tail.data(), 16, c + j, ldc, N - j);
  }
}

// Copies the rows x cols matrix at `src` (row stride ld) transposed into `dst` [cols][padded],
// zeros in the padding columns, so that SmallGemm reads it 16 columns at a time.
void PackTransposed(const float* src, int64_t ld, int rows, int cols, int padded, float* dst) {
  for (int d = 0; d < cols; ++d) {
    float* out = dst + static_cast<int64_t>(d) * padded;
    for (int j = 0; j < rows; ++j) out[j] = src[j * ld + d];
    std::fill(out + rows, out + padded, 0.f);
  }
}

inline int RoundUp16(int n) { return (n + 15) / 16 * 16; }

// exp(x) for x <= 0 (softmax's shifted scores): 2^n * e^r with n = round(x / ln 2) and a
// degree-7 Taylor polynomial for |r| <= ln(2)/2 (relative error < 1e-8 before rounding); 0
// below -87 (where float's exp leaves the normal range). Plain arithmetic, so loops vectorise.
inline float ExpNonPositive(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.f;  // 1.5 * 2^23: adding then subtracting rounds to an integer
  const float clamped = x < -87.f ? -87.f : x;
  const float n = (clamped * kLog2e + kRound) - kRound;  // round(clamped / ln 2)
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  // 2^n from the bits of n + kRound (an integer-valued float with n in its low mantissa bits),
  // in unsigned arithmetic: no float-to-int conversion, defined for every input.
  const float shifted = clamped * kLog2e + kRound;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.f ? 0.f : p * two_n;
}

// Where a boolean mask broadcastable to [B, H, L, L] allows attention (null: everywhere).
struct MaskView {
  const bool* data = nullptr;
  int64_t b = 0, h = 0, i = 0, j = 0;  // strides, 0 along broadcast dimensions
  const bool* Row(int64_t bi, int64_t hi, int64_t row) const {
    return data + bi * b + hi * h + row * i;
  }
};

// Softmax of one row in place; masked entries score float's lowest value first (as the einsum
// path's jnp.where(mask, s, finfo.min)), so a fully masked row comes out uniform.
void SoftmaxRow(float* row, int64_t n, const bool* allowed, int64_t allowed_stride) {
  if (allowed != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      if (!allowed[j * allowed_stride]) row[j] = -std::numeric_limits<float>::max();
    }
  }
  float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < n; ++j) top = row[j] > top ? row[j] : top;  // (std::max: 10x slower)
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = ExpNonPositive(row[j] - top);
    row[j] = e;
    sum += e;
  }
  const float inverse = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= inverse;
}

struct PackedShape {
  int64_t batch, length, heads, dim;
  int64_t QkvRow() const { return 3 * heads * dim; }
  int64_t OutRow() const { return heads * dim; }
};

ffi::Error CheckPacked(ffi::Buffer<ffi::F32>& qkv, ffi::Buffer<ffi::PRED>& mask, bool masked,
                       PackedShape* shape, MaskView* view) {
  auto dims = qkv.dimensions();
  if (dims.size() != 5 || dims[2] != 3) {
    return ffi::Error::InvalidArgument("zoo_packed_attention: qkv must be [B, L, 3, H, D]");
  }
  *shape = {dims[0], dims[1], dims[3], dims[4]};
  if (std::max({shape->length, shape->dim, shape->QkvRow()}) > std::numeric_limits<int>::max()) {
    return ffi::Error::InvalidArgument("zoo_packed_attention: a side exceeds BLAS's int");
  }
  if (!masked) return ffi::Error::Success();
  auto m = mask.dimensions();
  const int64_t full[4] = {shape->batch, shape->heads, shape->length, shape->length};
  if (m.size() != 4) {
    return ffi::Error::InvalidArgument("zoo_packed_attention: the mask must have rank 4");
  }
  int64_t strides[4], stride = 1;
  for (int d = 3; d >= 0; --d) {
    if (m[d] != 1 && m[d] != full[d]) {
      return ffi::Error::InvalidArgument(
          "zoo_packed_attention: the mask does not broadcast to [B, H, L, L]");
    }
    strides[d] = m[d] == 1 ? 0 : stride;
    stride *= m[d];
  }
  *view = {mask.typed_data(), strides[0], strides[1], strides[2], strides[3]};
  return ffi::Error::Success();
}

// The projection's bias [3, H, D] (optional, `has_bias`) is folded in rather than added to qkv
// beforehand, saving XLA a pass over the projection: with q' = q + bq, k' = k + bk, v' = v + bv,
// softmax_j(q'_i . k'_j) = softmax_j(q_i . k_j + bq . k_j) (the terms constant in j cancel, so
// the key bias drops out), and p v' = p v + bv (each row of p sums to 1).
ffi::Error CheckBias(const ffi::Buffer<ffi::F32>& bias, bool has_bias, const PackedShape& s) {
  if (has_bias && bias.element_count() != static_cast<size_t>(3 * s.heads * s.dim)) {
    return ffi::Error::InvalidArgument("zoo_packed_attention: the bias must be [3, H, D]");
  }
  return ffi::Error::Success();
}

ffi::Error PackedAttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                  ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> bias,
                                  ffi::ResultBuffer<ffi::F32> out,
                                  ffi::ResultBuffer<ffi::F32> weights, float scale, bool masked,
                                  bool has_bias) {
  PackedShape s;
  MaskView view;
  if (auto error = CheckPacked(qkv, mask, masked, &s, &view); error.failure()) return error;
  if (auto error = CheckBias(bias, has_bias, s); error.failure()) return error;
  const float* biases = has_bias ? bias.typed_data() : nullptr;
  const float* x = qkv.typed_data();
  float* o = out->typed_data();
  float* p = weights->typed_data();
  const int L = static_cast<int>(s.length), D = static_cast<int>(s.dim);
  const int qkv_row = static_cast<int>(s.QkvRow()), out_row = static_cast<int>(s.OutRow());
  const int padded = RoundUp16(L);
  ParallelFor(pool, s.batch * s.heads, [=](int64_t task) {
    thread_local std::vector<float> packed;
    packed.resize(static_cast<size_t>(D) * padded);
    const int64_t b = task / s.heads, h = task % s.heads;
    const float* q = x + b * s.length * qkv_row + h * s.dim;
    const float* k = q + s.heads * s.dim;
    const float* v = k + s.heads * s.dim;
    float* probs = p + task * s.length * s.length;
    PackTransposed(k, qkv_row, L, D, padded, packed.data());  // k^T [D, L]
    SmallGemm(L, L, D, scale, q, qkv_row, 1, packed.data(), padded, padded, probs, L);
    if (biases != nullptr) {  // + scale * bq . k_j in every row
      thread_local std::vector<float> key_terms;
      key_terms.resize(s.length);
      const float* bq = biases + h * s.dim;
      for (int64_t j = 0; j < s.length; ++j) {
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < s.dim; ++d) dot += bq[d] * k[j * qkv_row + d];
        key_terms[j] = scale * dot;
      }
      for (int64_t i = 0; i < s.length; ++i) {
        float* row = probs + i * s.length;
#pragma omp simd
        for (int64_t j = 0; j < s.length; ++j) row[j] += key_terms[j];
      }
    }
    for (int64_t i = 0; i < s.length; ++i) {
      SoftmaxRow(probs + i * s.length, s.length,
                 view.data ? view.Row(b, h, i) : nullptr, view.j);
    }
    float* out_block = o + b * s.length * out_row + h * s.dim;
    SmallGemm(L, D, L, 1.f, probs, L, 1, v, qkv_row, D, out_block, out_row);
    if (biases != nullptr) {  // + bv in every row
      const float* bv = biases + (2 * s.heads + h) * s.dim;
      for (int64_t i = 0; i < s.length; ++i) {
#pragma omp simd
        for (int64_t d = 0; d < s.dim; ++d) out_block[i * out_row + d] += bv[d];
      }
    }
  }, std::numeric_limits<int64_t>::max());
  return ffi::Error::Success();
}

ffi::Error PackedAttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                   ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> d_out,
                                   ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> bias,
                                   ffi::ResultBuffer<ffi::F32> d_qkv,
                                   ffi::ResultBuffer<ffi::F32> d_bias, float scale, bool masked,
                                   bool has_bias) {
  PackedShape s;
  MaskView view;
  if (auto error = CheckPacked(qkv, mask, masked, &s, &view); error.failure()) return error;
  if (auto error = CheckBias(bias, has_bias, s); error.failure()) return error;
  if (has_bias && d_bias->element_count() != bias.element_count()) {
    return ffi::Error::InvalidArgument("zoo_packed_attention: d_bias must be [3, H, D]");
  }
  const float* biases = has_bias ? bias.typed_data() : nullptr;
  // With the bias folded in, each (batch, head) task also sums its rows of d q, d k and d v
  // (the bias's gradient), into its own slot; the slots are added up at the end.
  std::vector<float> bias_partials(has_bias ? s.batch * s.heads * 3 * s.dim : 0, 0.f);
  float* partials = bias_partials.data();
  auto w = weights.dimensions();
  auto g = d_out.dimensions();
  if (w.size() != 4 || w[0] != s.batch || w[1] != s.heads || w[2] != s.length ||
      w[3] != s.length || g.size() != 4 || g[0] != s.batch || g[1] != s.length ||
      g[2] != s.heads || g[3] != s.dim) {
    return ffi::Error::InvalidArgument(
        "zoo_packed_attention: weights must be [B, H, L, L] and d_out [B, L, H, D]");
  }
  const float* x = qkv.typed_data();
  const float* p = weights.typed_data();
  const float* dy = d_out.typed_data();
  float* dx = d_qkv->typed_data();
  const int L = static_cast<int>(s.length), D = static_cast<int>(s.dim);
  const int qkv_row = static_cast<int>(s.QkvRow()), out_row = static_cast<int>(s.OutRow());
  const int padded = RoundUp16(L);
  ParallelFor(pool, s.batch * s.heads, [=](int64_t task) {
    thread_local std::vector<float> scratch, packed;
    scratch.resize(s.length * s.length);
    packed.resize(static_cast<size_t>(D) * padded);
    float* ds = scratch.data();
    const int64_t b = task / s.heads, h = task % s.heads;
    const int64_t offset = b * s.length * qkv_row + h * s.dim;
    const float *q = x + offset, *k = q + s.heads * s.dim, *v = k + s.heads * s.dim;
    float *dq = dx + offset, *dk = dq + s.heads * s.dim, *dv = dk + s.heads * s.dim;
    const float* probs = p + task * s.length * s.length;
    const float* dyo = dy + b * s.length * out_row + h * s.dim;
    PackTransposed(v, qkv_row, L, D, padded, packed.data());  // v^T [D, L]
    SmallGemm(L, L, D, 1.f, dyo, out_row, 1, packed.data(), padded, padded, ds, L);  // d probs
    for (int64_t i = 0; i < s.length; ++i) {  // d scores = p * (dp - sum(p * dp))
      const float* pr = probs + i * s.length;
      float* row = ds + i * s.length;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < s.length; ++j) dot += pr[j] * row[j];
#pragma omp simd
      for (int64_t j = 0; j < s.length; ++j) row[j] = pr[j] * (row[j] - dot);
      if (view.data) {  // a fully masked row has uniform weights but no gradient
        const bool* allowed = view.Row(b, h, i);
        for (int64_t j = 0; j < s.length; ++j) {
          if (!allowed[j * view.j]) row[j] = 0.f;
        }
      }
    }
    // The folded bias: v's leaves d scores alone (a constant per row of d probs) and k's
    // leaves d q alone (each row of d scores sums to 0); q's adds (column sums of d scores) x bq
    // to d k.
    SmallGemm(L, D, L, scale, ds, L, 1, k, qkv_row, D, dq, qkv_row);      // ds k
    SmallGemm(L, D, L, scale, ds, 1, L, q, qkv_row, D, dk, qkv_row);      // ds^T q
    SmallGemm(L, D, L, 1.f, probs, 1, L, dyo, out_row, D, dv, qkv_row);  // p^T d out
    if (biases != nullptr) {
      thread_local std::vector<float> column_sums;
      column_sums.assign(s.length, 0.f);
      float* sums = column_sums.data();
      for (int64_t i = 0; i < s.length; ++i) {
        const float* row = ds + i * s.length;
#pragma omp simd
        for (int64_t j = 0; j < s.length; ++j) sums[j] += row[j];
      }
      const float* bq = biases + h * s.dim;
      float* part = partials + task * 3 * s.dim;
      for (int64_t j = 0; j < s.length; ++j) {
        float* dkj = dk + j * qkv_row;
        const float* dqj = dq + j * qkv_row;
        const float* dvj = dv + j * qkv_row;
        const float c = scale * sums[j];
#pragma omp simd
        for (int64_t d = 0; d < s.dim; ++d) {
          dkj[d] += c * bq[d];
          part[d] += dqj[d];
          part[s.dim + d] += dkj[d];
          part[2 * s.dim + d] += dvj[d];
        }
      }
    }
  }, std::numeric_limits<int64_t>::max());
  if (has_bias) {  // d bias [3, H, D] = the tasks' sums over the batch
    float* db = d_bias->typed_data();
    std::fill(db, db + 3 * s.heads * s.dim, 0.f);
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t h = 0; h < s.heads; ++h) {
        const float* part = partials + (b * s.heads + h) * 3 * s.dim;
        for (int64_t t = 0; t < 3; ++t) {
          float* out = db + (t * s.heads + h) * s.dim;
          for (int64_t d = 0; d < s.dim; ++d) out[d] += part[t * s.dim + d];
        }
      }
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last axis of a float32 [R, C] array (all leading axes as rows), forward and
// backward, rows spread over the pool. Values are torch.nn.LayerNorm's (and
// zoo/models/layer_norm.py's): mean, then the biased variance of the centred values (two
// passes), rstd = 1 / sqrt(var + eps), y = (x - mean) * rstd * scale + bias. One pass over the
// rows each way, where XLA:CPU made separate reductions and elementwise passes (the MAE step
// spent ~8% of its time in LayerNorm).
// ---------------------------------------------------------------------------------------------

struct RowsShape {
  int64_t rows = 0, cols = 0;
};

ffi::Error RowsOf(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& scale,
                  RowsShape* shape) {
  auto dims = x.dimensions();
  if (dims.size() < 1 || scale.dimensions().size() != 1 ||
      scale.dimensions()[0] != dims[dims.size() - 1]) {
    return ffi::Error::InvalidArgument("zoo_layer_norm: scale must match x's last axis");
  }
  shape->cols = dims[dims.size() - 1];
  shape->rows = shape->cols == 0 ? 0 : static_cast<int64_t>(x.element_count()) / shape->cols;
  return ffi::Error::Success();
}

ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  RowsShape s;
  if (auto error = RowsOf(x, scale, &s); error.failure()) return error;
  if (bias.element_count() != static_cast<size_t>(s.cols) ||
      mean->element_count() != static_cast<size_t>(s.rows) ||
      rstd->element_count() != static_cast<size_t>(s.rows)) {
    return ffi::Error::InvalidArgument("zoo_layer_norm: bias, mean or rstd has the wrong size");
  }
  const float *in = x.typed_data(), *g = scale.typed_data(), *b = bias.typed_data();
  float *out = y->typed_data(), *mu = mean->typed_data(), *rs = rstd->typed_data();
  const int64_t C = s.cols;
  const float inv_c = 1.f / static_cast<float>(C);
  ParallelFor(pool, s.rows, [=](int64_t r) {
    const float* row = in + r * C;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < C; ++j) sum += row[j];
    const float m = sum * inv_c;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < C; ++j) squares += (row[j] - m) * (row[j] - m);
    const float inv_std = 1.f / std::sqrt(squares * inv_c + eps);
    float* o = out + r * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) o[j] = (row[j] - m) * inv_std * g[j] + b[j];
    mu[r] = m;
    rs[r] = inv_std;
  }, std::numeric_limits<int64_t>::max());
  return ffi::Error::Success();
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale, xhat = (x - mean) * rstd;
// d_scale = sum over rows of dy * xhat, d_bias = sum of dy (per block of rows, then added up).
ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                             ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                             ffi::Buffer<ffi::F32> d_residual, ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> d_scale,
                             ffi::ResultBuffer<ffi::F32> d_bias, bool add_residual) {
  RowsShape s;
  if (auto error = RowsOf(x, scale, &s); error.failure()) return error;
  if (dy.element_count() != x.element_count() ||
      mean.element_count() != static_cast<size_t>(s.rows) ||
      rstd.element_count() != static_cast<size_t>(s.rows) ||
      (add_residual && d_residual.element_count() != x.element_count())) {
    return ffi::Error::InvalidArgument(
        "zoo_layer_norm: dy, d_residual, mean or rstd has the wrong size");
  }
  const float *in = x.typed_data(), *g = scale.typed_data(), *mu = mean.typed_data();
  const float *rs = rstd.typed_data(), *grad = dy.typed_data();
  // With add_residual, dx also takes the gradient of the block's residual path (a pre-norm
  // block reads its input twice: through the norm and around it), saving XLA a pass to add it.
  const float* res = add_residual ? d_residual.typed_data() : nullptr;
  float* out = dx->typed_data();
  const int64_t C = s.cols, R = s.rows;
  const float inv_c = C == 0 ? 0.f : 1.f / static_cast<float>(C);
  // Blocks of rows, each with its own partial column sums (no sharing between threads).
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(R, 8 * pool.num_threads()));
  const int64_t per_block = R == 0 ? 0 : (R + blocks - 1) / blocks;
  std::vector<float> partial(static_cast<size_t>(blocks) * 2 * C, 0.f);
  float* sums = partial.data();
  ParallelFor(pool, blocks, [=](int64_t block) {
    float* ds = sums + block * 2 * C;
    float* db = ds + C;
    const int64_t end = std::min(R, (block + 1) * per_block);
    for (int64_t r = block * per_block; r < end; ++r) {
      const float* row = in + r * C;
      const float* d = grad + r * C;
      const float m = mu[r], inv_std = rs[r];
      float mean_g = 0.f, mean_gx = 0.f;
#pragma omp simd reduction(+ : mean_g, mean_gx)
      for (int64_t j = 0; j < C; ++j) {
        const float xhat = (row[j] - m) * inv_std;
        const float gj = d[j] * g[j];
        mean_g += gj;
        mean_gx += gj * xhat;
        ds[j] += d[j] * xhat;
        db[j] += d[j];
      }
      mean_g *= inv_c;
      mean_gx *= inv_c;
      float* o = out + r * C;
      if (res == nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) {
          const float xhat = (row[j] - m) * inv_std;
          o[j] = inv_std * (d[j] * g[j] - mean_g - xhat * mean_gx);
        }
      } else {
        const float* rr = res + r * C;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) {
          const float xhat = (row[j] - m) * inv_std;
          o[j] = inv_std * (d[j] * g[j] - mean_g - xhat * mean_gx) + rr[j];
        }
      }
    }
  }, std::numeric_limits<int64_t>::max());
  float *d_g = d_scale->typed_data(), *d_b = d_bias->typed_data();
  std::fill(d_g, d_g + C, 0.f);
  std::fill(d_b, d_b + C, 0.f);
  for (int64_t block = 0; block < blocks; ++block) {
    const float* ds = sums + block * 2 * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      d_g[j] += ds[j];
      d_b[j] += ds[C + j];
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// A dense layer's weight and bias gradients: dW = x^T g [M, N] and db = the column sums of g [N],
// for the layer's input x [K, M] and output gradient g [K, N] (leading axes flattened into K
// rows). XLA:CPU ran this transposed-operand product at 155-235 GFLOP/s on the MAE step's
// shapes (2 cores) where the forward's plain products reach ~290. Here both operands are first
// copied into contiguous blocks of kDepth rows (A tiles of kGradRows columns of x, B panels of
// 32 columns of g), and a register tile of kGradRows x 32 accumulates over each block
// (220-270 GFLOP/s on the same shapes). The bias sums are taken while g's rows are packed, so g
// is read once for both gradients. In the MAE step XLA runs this beside the input gradient's
// product (one core each), so the step gains only ~1-3%. zoo/models/linear.py calls it for
// weights of at most 2^20 entries: larger gradients, re-read once per block, leave L2.
// ---------------------------------------------------------------------------------------------

constexpr int kPanel = 32;   // columns of dW per register tile (two Vec16)
constexpr int kDepth = 384;  // rows of x and g per packed block
#ifdef __AVX512F__
constexpr int kGradRows = 12;  // 12 x 2 accumulators, 2 B vectors and a broadcast: 27 of 32 zmm
#else
constexpr int kGradRows = 3;   // 16 ymm registers: each Vec16 takes two
#endif

// c[r][0:cols] (+)= sum over k < depth of a[k * R + r] * b[k * kPanel + 0:kPanel], for packed a
// (depth x R) and b (depth x 32, zero past `cols`); `accumulate` adds to what c holds.
template <int R>
void PackedTile(int depth, const float* a, const float* b, float* c, int64_t ldc, int cols,
                bool accumulate) {
  Vec16 acc[R][2] = {};
  float edge[kPanel] = {};  // the last panel's columns, when fewer than 32 are left
  if (accumulate) {
    for (int r = 0; r < R; ++r) {
      const float* row = c + r * ldc;
      if (cols < kPanel) row = static_cast<const float*>(std::memcpy(edge, row, 4 * cols));
      acc[r][0] = Load16(row);
      acc[r][1] = Load16(row + 16);
    }
  }
#pragma GCC unroll 2
  for (int k = 0; k < depth; ++k) {
    const Vec16 b0 = Load16(b + k * kPanel), b1 = Load16(b + k * kPanel + 16);
    const float* ak = a + k * R;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      acc[r][0] += ak[r] * b0;
      acc[r][1] += ak[r] * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    float* out = cols < kPanel ? edge : row;
    std::memcpy(out, &acc[r][0], sizeof(Vec16));
    std::memcpy(out + 16, &acc[r][1], sizeof(Vec16));
    if (cols < kPanel) std::memcpy(row, edge, 4 * cols);
  }
}

// For the rows [m, m + R) of dW: packs x's block (rows k0.., columns m..m+R) and runs the tile
// over every packed panel of this task.
template <int R>
void GradientRows(int depth, const float* x, int64_t M, int64_t m, const float* b_packed,
                  int panels, int64_t first_col, int64_t N, float* a_packed, float* dw,
                  bool accumulate) {
  for (int k = 0; k < depth; ++k) std::memcpy(a_packed + k * R, x + k * M + m, sizeof(float) * R);
  for (int p = 0; p < panels; ++p) {
    const int64_t col = first_col + static_cast<int64_t>(p) * kPanel;
    PackedTile<R>(depth, a_packed, b_packed + static_cast<int64_t>(p) * kDepth * kPanel,
                  dw + m * N + col, N, static_cast<int>(std::min<int64_t>(kPanel, N - col)),
                  accumulate);
  }
}

// GradientRows<rows> for a row count known only at run time (1 <= rows <= R).
template <int R>
void GradientRowsUpTo(int rows, int depth, const float* x, int64_t M, int64_t m,
                      const float* b_packed, int panels, int64_t first_col, int64_t N,
                      float* a_packed, float* dw, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) {
      GradientRows<R>(depth, x, M, m, b_packed, panels, first_col, N, a_packed, dw, accumulate);
    } else {
      GradientRowsUpTo<R - 1>(rows, depth, x, M, m, b_packed, panels, first_col, N, a_packed, dw,
                              accumulate);
    }
  }
}

ffi::Error DenseWeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> d_kernel,
                               ffi::ResultBuffer<ffi::F32> d_bias) {
  auto x_dims = x.dimensions();
  auto g_dims = g.dimensions();
  if (x_dims.size() != 2 || g_dims.size() != 2 || x_dims[0] != g_dims[0]) {
    return ffi::Error::InvalidArgument("zoo_dense_weight_gradient: x [K, M] and g [K, N]");
  }
  const int64_t K = x_dims[0], M = x_dims[1], N = g_dims[1];
  const float *xs = x.typed_data(), *gs = g.typed_data();
  float *dw = d_kernel->typed_data(), *db = d_bias->typed_data();
  if (K == 0 || M == 0) {  // an empty sum (or no weights): zeros
    std::fill(dw, dw + M * N, 0.f);
    std::fill(db, db + N, 0.f);
    if (M == 0) {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t n = 0; n < N; ++n) db[n] += gs[k * N + n];
      }
    }
    return ffi::Error::Success();
  }
  // One task per thread. Every task packs all of one operand's block and its share of the
  // other's, so the split runs along the larger of M and N: each task then repacks only the
  // smaller operand. (Smaller tasks balanced better but repacked more: one or two panels per
  // task, or extra row blocks per column range, were 10-30% slower on the MAE shapes.)
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t row_tiles = (M + kGradRows - 1) / kGradRows;
  const bool split_rows = M > N;
  const int64_t parts = split_rows ? row_tiles : panels;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(parts, pool.num_threads()));
  ParallelFor(pool, tasks, [=](int64_t task) {
    const int64_t lo = task * parts / tasks, hi = (task + 1) * parts / tasks;
    const int64_t p0 = split_rows ? 0 : lo, p1 = split_rows ? panels : hi;
    const int64_t m_begin = split_rows ? lo * kGradRows : 0;
    const int64_t m_end = split_rows ? std::min(M, hi * kGradRows) : M;
    const bool sums_bias = !split_rows || task == 0;  // each column summed by one task
    const int count = static_cast<int>(p1 - p0);
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<size_t>(kDepth) * (kPanel * count + kGradRows));
    float* b_packed = scratch.data();
    float* a_packed = b_packed + static_cast<int64_t>(kDepth) * kPanel * count;
    const int64_t first_col = p0 * kPanel, last_col = std::min(N, p1 * kPanel);
    if (sums_bias) std::fill(db + first_col, db + last_col, 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int depth = static_cast<int>(std::min<int64_t>(kDepth, K - k0));
      for (int p = 0; p < count; ++p) {  // pack g's block (and sum its columns for db)
        const int64_t col = first_col + static_cast<int64_t>(p) * kPanel;
        const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - col));
        float* panel = b_packed + static_cast<int64_t>(p) * kDepth * kPanel;
        float* sums = db + col;
        for (int k = 0; k < depth; ++k) {
          const float* src = gs + (k0 + k) * N + col;
          float* dst = panel + k * kPanel;
          std::memcpy(dst, src, sizeof(float) * cols);
          std::fill(dst + cols, dst + kPanel, 0.f);
          if (sums_bias) {
#pragma omp simd
            for (int j = 0; j < cols; ++j) sums[j] += src[j];
          }
        }
      }
      const float* block = xs + k0 * M;
      int64_t m = m_begin;
      for (; m + kGradRows <= m_end; m += kGradRows) {
        GradientRows<kGradRows>(depth, block, M, m, b_packed, count, first_col, N, a_packed, dw,
                                k0 > 0);
      }
      if (m < m_end) {
        GradientRowsUpTo<kGradRows - 1>(static_cast<int>(m_end - m), depth, block, M, m,
                                        b_packed, count, first_col, N, a_packed, dw, k0 > 0);
      }
    }
  }, std::numeric_limits<int64_t>::max());
  return ffi::Error::Success();
}

}  // namespace

// 1 when this build has the AMX kernel and Linux lets this process use the tile registers
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, process-wide, once); 0 otherwise.
extern "C" int zoo_amx_enable() {
#ifdef ZOO_HAS_AMX
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 1 : 0;
#else
  return 0;
#endif
}

namespace {

// ---------------------------------------------------------------------------------------------
// Float32 products on AMX tiles: C = op(A) op(B) for float32 A [M, K] and B [K, N] (op = identity
// or transpose), row-major, through the bfloat16 tile multiply of Intel's AMX (Sapphire Rapids
// and later): 2.9-4 TFLOP/s per core here on tiles held in registers, ~20x the ~200 GFLOP/s of
// AVX-512 float32 FMAs.
//
// Float32 accuracy from bfloat16 products: every operand is split while it is packed into
// bfloat16 pieces, a = a0 + a1 + a2 (each the round-to-nearest bfloat16 of what is left, 8
// significant bits each, 24 in all: a float32's precision), and with `passes` = 6 the product
// sums a0 b0 + a0 b1 + a1 b0 + a1 b1 + a0 b2 + a2 b0, dropping only terms ~2^-24 of a0 b0 (the
// split TPUs use for Precision.HIGHEST). The tile multiply accumulates in float32. passes = 3
// (a0 b0 + a0 b1 + a1 b0: ~2^-16 relative, TPU's HIGH) and 1 (plain bfloat16) are there for
// experiments. Non-finite inputs give NaN where float32 would give inf.
//
// Packed layouts (bfloat16, zero-padded to whole tiles): A as 16-row x 32-column tiles, one per
// (row tile, 32-wide chunk of K, piece); B in AMX's pair-interleaved ("VNNI") layout, 16 pairs
// of K rows x 16 columns x 2. Each task packs as it goes (AmxMatmul below): a slice of B's
// columns into L2, a 32-row block of A into L1, and computes 32 x 32 blocks of C with 2 x 2
// tiles in the 8 tile registers (4 accumulators, 2 A tiles, 2 B tiles). On the MAE bench's
// layers (2 cores) the 6-pass products take 0.61-0.66x XLA's float32 dots' time; the whole MAE
// step 0.77-0.85x (same-process A/Bs).
// ---------------------------------------------------------------------------------------------
#ifdef ZOO_HAS_AMX
constexpr int kTile = 16;           // rows (and B's columns) per tile
constexpr int kChunk = 32;          // K per tile: 32 bfloat16 = 64 bytes per tile row
constexpr int kTileElems = 512;     // bfloat16 per tile (1 KiB)

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
} __attribute__((packed));

inline __m512 Bf16ToF32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Splits 16 floats into `pieces` bfloat16 vectors: out[p] = bf16(v - out[0] - ... - out[p-1]).
inline void Split(__m512 v, int pieces, __m256i* out) {
  for (int p = 0; p < pieces; ++p) {
    out[p] = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    if (p + 1 < pieces) v = _mm512_sub_ps(v, Bf16ToF32(out[p]));
  }
}

inline __mmask16 TailMask(int64_t count) {
  return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

struct AmxShape {
  int64_t m, n, k, chunks, row_tiles, col_tiles;
  int pieces;
};

// Transposes the 16 x 16 block of 32-bit values in rows[0..15] in place (row i <-> column i).
inline void Transpose16(__m512i* rows) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  // u[4g + c], 128-bit lane l: column 4l + c of rows 4g..4g+3.
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4l + c = lane l of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    rows[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    rows[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    rows[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    rows[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// Stores row r of an A tile: 32 floats (v0: K 0..15, v1: K 16..31) split into pieces.
inline void StoreARow(__m512 v0, __m512 v1, int pieces, uint16_t* tile, int r) {
  __m256i lo[3], hi[3];
  Split(v0, pieces, lo);
  Split(v1, pieces, hi);
  for (int p = 0; p < pieces; ++p) {
    uint16_t* out = tile + p * kTileElems + r * kChunk;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo[p]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), hi[p]);
  }
}

// The 32 floats line[k0 .. k0 + 32) (zeros past k), and a prefetch of the next 32: the
// packers' next tile reads them (see PackATile).
inline void LoadChunk(const float* line, int64_t k0, int64_t k, __m512* v0, __m512* v1) {
  if (k0 + kChunk < k) {
    _mm_prefetch(reinterpret_cast<const char*>(line + k0 + kChunk), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(line + k0 + kChunk + 16), _MM_HINT_T0);
  }
  *v0 = _mm512_maskz_loadu_ps(TailMask(k - k0), line + k0);
  *v1 = _mm512_maskz_loadu_ps(TailMask(k - k0 - 16), line + k0 + 16);
}

// A's tile of rows [r0, r0 + 16) and K [k0, k0 + 32) of op(A), split into pieces at dst (piece
// p at dst + p * 512). trans: A[r][k] = src[k * ld + r], read 16 K rows at a time and transposed
// in registers. The packers prefetch the lines of the next chunk along K (the next tile they are
// asked for): the rows they read lie in different pages, which the hardware prefetchers do not
// follow (~2.7% of the MAE step).
void PackATile(const float* src, int64_t ld, bool trans, const AmxShape& s, int64_t r0,
               int64_t k0, uint16_t* dst) {
  if (!trans) {
    for (int r = 0; r < kTile; ++r) {
      __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
      if (r0 + r < s.m) LoadChunk(src + (r0 + r) * ld, k0, s.k, &v0, &v1);
      StoreARow(v0, v1, s.pieces, dst, r);
    }
    return;
  }
  const __mmask16 rows = TailMask(s.m - r0);
  __m512i half[2][16];
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 16; ++k) {
      const int64_t kk = k0 + 16 * h + k;
      if (kk + kChunk < s.k) {
        _mm_prefetch(reinterpret_cast<const char*>(src + (kk + kChunk) * ld + r0), _MM_HINT_T0);
      }
      half[h][k] = kk < s.k ? _mm512_maskz_loadu_epi32(rows, src + kk * ld + r0)
                            : _mm512_setzero_si512();
    }
    Transpose16(half[h]);
  }
  for (int r = 0; r < kTile; ++r) {
    StoreARow(_mm512_castsi512_ps(half[0][r]), _mm512_castsi512_ps(half[1][r]), s.pieces, dst,
              r);
  }
}

// B's tile of columns [n0, n0 + 16) and K [k0, k0 + 32) in the pair-interleaved layout:
// element (k, n) at (k / 2) * 32 + n * 2 + k % 2. trans: B[k][n] = src[n * ld + k].
void PackBTile(const float* src, int64_t ld, bool trans, const AmxShape& s, int64_t n0,
               int64_t k0, uint16_t* dst) {
  if (!trans) {
    alignas(64) static const uint16_t kInterleave[32] = {
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i order = _mm512_load_si512(kInterleave);
    const __mmask16 cols = TailMask(s.n - n0);
    for (int kp = 0; kp < kChunk / 2; ++kp) {
      __m256i even[3], odd[3];
      const int64_t k = k0 + 2 * kp;
      const __m512 v0 = k < s.k ? _mm512_maskz_loadu_ps(cols, src + k * ld + n0)
                                : _mm512_setzero_ps();
      const __m512 v1 = k + 1 < s.k ? _mm512_maskz_loadu_ps(cols, src + (k + 1) * ld + n0)
                                    : _mm512_setzero_ps();
      Split(v0, s.pieces, even);
      Split(v1, s.pieces, odd);
      for (int p = 0; p < s.pieces; ++p) {
        const __m512i pairs = _mm512_permutex2var_epi16(_mm512_castsi256_si512(even[p]), order,
                                                        _mm512_castsi256_si512(odd[p]));
        _mm512_storeu_si512(dst + p * kTileElems + kp * 32, pairs);
      }
    }
    return;
  }
  // Transposed source: column n of the tile is 32 contiguous floats of src's row n0 + n, whose
  // bfloat16 pairs (k, k + 1) are already the layout's pairs: a 16 x 16 transpose of 32-bit
  // pairs turns the columns into the layout's rows.
  __m512i columns[3][16];
  for (int n = 0; n < kTile; ++n) {
    __m256i lo[3], hi[3];
    __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
    if (n0 + n < s.n) LoadChunk(src + (n0 + n) * ld, k0, s.k, &v0, &v1);
    Split(v0, s.pieces, lo);
    Split(v1, s.pieces, hi);
    for (int p = 0; p < s.pieces; ++p) {
      columns[p][n] = _mm512_inserti64x4(_mm512_castsi256_si512(lo[p]), hi[p], 1);
    }
  }
  for (int p = 0; p < s.pieces; ++p) {
    Transpose16(columns[p]);
    for (int kp = 0; kp < kTile; ++kp) {
      _mm512_storeu_si512(dst + p * kTileElems + kp * 32, columns[p][kp]);
    }
  }
}

// (piece of A, piece of B) for each pass, grouped by B's piece: B's tiles come from L2 and are
// loaded once per chunk and piece; A's (packed just before, in L1) are reloaded.
constexpr int kPairs6[6][2] = {{0, 0}, {1, 0}, {2, 0}, {0, 1}, {1, 1}, {0, 2}};
constexpr int kPairs3[3][2] = {{0, 0}, {1, 0}, {0, 1}};

enum class Start { kZero, kBias, kAccumulate };

// A thread's packed tiles, 64-byte aligned: a tile row that straddles two cache lines makes
// every tile load touch twice the lines (with a std::vector's 16-byte alignment the MAE step
// ran ~1.4x slower).
class TileBuffer {
 public:
  uint16_t* Get(int64_t elements) {
    if (elements > size_) {
      const size_t bytes = ((elements * 2 + 63) / 64) * 64;  // aligned_alloc wants a multiple
      data_.reset(static_cast<uint16_t*>(std::aligned_alloc(64, bytes)));
      size_ = elements;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(uint16_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint16_t, Free> data_;
  int64_t size_ = 0;
};

// Adds the products of `chunks` chunks of a 32 x 32 block of C (row tiles at a and a +
// a_tile_stride, column tiles at b and b + b_tile_stride) to what `start` gives: zeros, the
// bias (a tile load with row stride 0 repeats it in every row) or C's current values.
template <int Passes>
void AmxBlock(const uint16_t* a, int64_t a_tile_stride, const uint16_t* b,
              int64_t b_tile_stride, int64_t chunks, Start start, const float* bias,
              const AmxShape& s, int64_t r0, int64_t n0, float* c) {
  const bool full = r0 + 32 <= s.m && n0 + 32 <= s.n;
  const int64_t ldc = s.n;
  const int64_t rows = std::min<int64_t>(32, s.m - r0), cols = std::min<int64_t>(32, s.n - n0);
  alignas(64) float edge[32][32];
  if (start == Start::kAccumulate) {
    const float* from = c + r0 * ldc + n0;
    int64_t stride = ldc;
    if (!full) {
      std::memset(edge, 0, sizeof(edge));
      for (int64_t r = 0; r < rows; ++r) std::memcpy(edge[r], from + r * ldc, 4 * cols);
      from = &edge[0][0];
      stride = 32;
    }
    _tile_loadd(0, from, stride * 4);
    _tile_loadd(1, from + 16, stride * 4);
    _tile_loadd(2, from + 16 * stride, stride * 4);
    _tile_loadd(3, from + 16 * stride + 16, stride * 4);
  } else if (start == Start::kBias) {
    alignas(64) float row[32] = {};
    for (int64_t j = 0; j < cols; ++j) row[j] = bias[n0 + j];
    _tile_loadd(0, row, 0);
    _tile_loadd(1, row + 16, 0);
    _tile_loadd(2, row, 0);
    _tile_loadd(3, row + 16, 0);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t chunk_stride = static_cast<int64_t>(s.pieces) * kTileElems;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const uint16_t* ac = a + ch * chunk_stride;
    const uint16_t* bc = b + ch * chunk_stride;
    int loaded_b = -1;
    for (int pass = 0; pass < Passes; ++pass) {
      const int pa = Passes == 6 ? kPairs6[pass][0] : Passes == 3 ? kPairs3[pass][0] : 0;
      const int pb = Passes == 6 ? kPairs6[pass][1] : Passes == 3 ? kPairs3[pass][1] : 0;
      if (pb != loaded_b) {
        _tile_loadd(6, bc + pb * kTileElems, 64);
        _tile_loadd(7, bc + b_tile_stride + pb * kTileElems, 64);
        loaded_b = pb;
      }
      _tile_loadd(4, ac + pa * kTileElems, 64);
      _tile_loadd(5, ac + a_tile_stride + pa * kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (full) {
    float* out = c + r0 * ldc + n0;
    _tile_stored(0, out, ldc * 4);
    _tile_stored(1, out + 16, ldc * 4);
    _tile_stored(2, out + 16 * ldc, ldc * 4);
    _tile_stored(3, out + 16 * ldc + 16, ldc * 4);
    return;
  }
  _tile_stored(0, &edge[0][0], 128);
  _tile_stored(1, &edge[0][16], 128);
  _tile_stored(2, &edge[16][0], 128);
  _tile_stored(3, &edge[16][16], 128);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(c + (r0 + r) * ldc + n0, edge[r], 4 * cols);
}

// K per slice: 8 chunks (256), so a block's A tiles (48 KiB with 3 pieces) stay near L1 and C
// is re-read once per 256 of K (4 and 12 chunks measured within noise of 8).
constexpr int64_t kSliceChunks = 8;
// B's slice per column group: ~1.25 MiB of the 2 MiB L2, so a group of up to ~800 columns (6
// passes) stays there while the task's row blocks run against it; more columns are split.
constexpr int64_t kSliceBytes = 1280 * 1024;

// C = op(A) op(B) (+ bias), one task per thread, split along the larger of M and N. For each
// slice of K (kSliceChunks chunks) a task packs B's tiles of its columns there (into L2), then for
// each of its 32-row blocks packs that block's A tiles (into L1) and runs them against every
// column block of the slice, adding into C. The operand on the smaller side is packed by every
// task; nothing round-trips through memory in packed form.
void AmxMatmul(ffi::ThreadPool& pool, const float* a, int64_t lda, bool trans_a, const float* b,
               int64_t ldb, bool trans_b, const AmxShape& s, int passes, const float* bias,
               float* c) {
  const int64_t row_blocks = s.row_tiles / 2, col_blocks = s.col_tiles / 2;
  const bool split_rows = row_blocks >= col_blocks;
  const int64_t parts = split_rows ? row_blocks : col_blocks;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(parts, pool.num_threads()));
  const int64_t tile_elems = static_cast<int64_t>(s.pieces) * kTileElems;
  constexpr int64_t kb = kSliceChunks;
  ParallelFor(pool, tasks, [&](int64_t task) {
    static thread_local TileConfig config;
    static thread_local TileBuffer a_buffer, b_buffer;
    const int64_t lo = task * parts / tasks, hi = (task + 1) * parts / tasks;
    const int64_t row0 = split_rows ? lo : 0, row1 = split_rows ? hi : row_blocks;
    const int64_t col0 = split_rows ? 0 : lo, col1 = split_rows ? col_blocks : hi;
    const int64_t b_tile_stride = kb * tile_elems;   // next column tile of the slice
    const int64_t a_tile_stride = kb * tile_elems;   // the block's second row tile
    // The task's columns in as few groups of (near) equal size as keep B's slice within
    // kSliceBytes (2 column tiles of 2 bytes per element per column block).
    const int64_t slice_bytes = (col1 - col0) * 2 * b_tile_stride * 2;
    const int64_t groups = std::max<int64_t>(1, (slice_bytes + kSliceBytes - 1) / kSliceBytes);
    uint16_t* b_slice = b_buffer.Get(2 * ((col1 - col0 + groups - 1) / groups) * b_tile_stride);
    uint16_t* a_block = a_buffer.Get(2 * kb * tile_elems);
    _tile_loadconfig(&config);
    for (int64_t c0 = 0; c0 < s.chunks; c0 += kb) {
      const int64_t chunks = std::min(kb, s.chunks - c0);
      const Start start = c0 > 0 ? Start::kAccumulate : bias ? Start::kBias : Start::kZero;
      for (int64_t group = 0; group < groups; ++group) {
        const int64_t g0 = col0 + group * (col1 - col0) / groups;
        const int64_t g1 = col0 + (group + 1) * (col1 - col0) / groups;
        // Row-major B is read a row at a time across the group's columns (a chunk's tiles in
        // turn); transposed B a source row at a time along K (a column tile's chunks in turn):
        // sequential reads either way, ~3.5% of the MAE step over one order for both.
        for (int64_t i = 0; i < 2 * (g1 - g0) * chunks; ++i) {
          const int64_t u = trans_b ? i / chunks : i % (2 * (g1 - g0));
          const int64_t ch = trans_b ? i % chunks : i / (2 * (g1 - g0));
          PackBTile(b, ldb, trans_b, s, (2 * g0 + u) * kTile, (c0 + ch) * kChunk,
                    b_slice + u * b_tile_stride + ch * tile_elems);
        }
        for (int64_t row = row0; row < row1; ++row) {
          for (int t = 0; t < 2; ++t) {
            for (int64_t ch = 0; ch < chunks; ++ch) {
              PackATile(a, lda, trans_a, s, (2 * row + t) * kTile, (c0 + ch) * kChunk,
                        a_block + t * a_tile_stride + ch * tile_elems);
            }
          }
          for (int64_t col = g0; col < g1; ++col) {
            const uint16_t* bb = b_slice + 2 * (col - g0) * b_tile_stride;
            if (passes == 6) {
              AmxBlock<6>(a_block, a_tile_stride, bb, b_tile_stride, chunks, start, bias, s,
                          32 * row, 32 * col, c);
            } else if (passes == 3) {
              AmxBlock<3>(a_block, a_tile_stride, bb, b_tile_stride, chunks, start, bias, s,
                          32 * row, 32 * col, c);
            } else {
              AmxBlock<1>(a_block, a_tile_stride, bb, b_tile_stride, chunks, start, bias, s,
                          32 * row, 32 * col, c);
            }
          }
        }
      }
    }
    _tile_release();
  }, std::numeric_limits<int64_t>::max());
}
#endif  // ZOO_HAS_AMX

ffi::Error AmxMatmulHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                            ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b,
                            int64_t passes, bool has_bias) {
#ifdef ZOO_HAS_AMX
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("zoo_amx_matmul: a and b must be matrices");
  }
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1];
  if ((trans_b ? bd[1] : bd[0]) != k) {
    return ffi::Error::InvalidArgument("zoo_amx_matmul: contracted dimensions differ");
  }
  if (passes != 1 && passes != 3 && passes != 6) {
    return ffi::Error::InvalidArgument("zoo_amx_matmul: passes must be 1, 3 or 6");
  }
  if (has_bias && bias.element_count() != static_cast<size_t>(n)) {
    return ffi::Error::InvalidArgument("zoo_amx_matmul: the bias must have N entries");
  }
  float* out = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < n; ++j) out[r * n + j] = has_bias ? bias.typed_data()[j] : 0.f;
    }
    return ffi::Error::Success();
  }
  AmxShape s;
  s.m = m;
  s.n = n;
  s.k = k;
  s.chunks = (k + kChunk - 1) / kChunk;
  s.row_tiles = 2 * ((m + 31) / 32);
  s.col_tiles = 2 * ((n + 31) / 32);
  s.pieces = passes == 6 ? 3 : passes == 3 ? 2 : 1;
  AmxMatmul(pool, a.typed_data(), ad[1], trans_a, b.typed_data(), bd[1], trans_b, s,
            static_cast<int>(passes), has_bias ? bias.typed_data() : nullptr, out);
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "zoo_amx_matmul: built without AMX");
#endif
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooPackedAttentionForward, PackedAttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv [B, L, 3, H, D]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (unused unless masked)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [3, H, D] (if has_bias)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, L, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // weights [B, H, L, L]
                                  .Attr<float>("scale")
                                  .Attr<bool>("masked")
                                  .Attr<bool>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooPackedAttentionBackward, PackedAttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv [B, L, 3, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [B, H, L, L]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d out [B, L, H, D]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (unused unless masked)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [3, H, D] (if has_bias)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d qkv [B, L, 3, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d bias [3, H, D] (if has_bias)
                                  .Attr<float>("scale")
                                  .Attr<bool>("masked")
                                  .Attr<bool>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [..., C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean [..., 1]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // rstd [..., 1]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean [..., 1]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rstd [..., 1]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d residual (if added)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [..., C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d scale [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d bias [C]
                                  .Attr<bool>("add_residual"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooDenseWeightGradient, DenseWeightGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [K, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d kernel [M, N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d bias [N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooAmxMatmul, AmxMatmulHandler,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a [M, K] ([K, M] if trans_a)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b [K, N] ([N, K] if trans_b)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [N] (if has_bias)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c [M, N]
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("passes")
                                  .Attr<bool>("has_bias"));
