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
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

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
