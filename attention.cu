// attention.cu: fused attention for nanoCIT, forward and backward, never forming the N×N score matrix.
//
// FlashAttention-2 (Dao 2023, arXiv 2307.08691, Algorithms 1 and 2) in the paper's notation: Q, K, V
// are N×d per (batch, head); Br query rows × Bc key columns make a tile; Tr = ⌈N/Br⌉, Tc = ⌈N/Bc⌉.
// model.py compiles this file on first use and holds its PyTorch twin, flash_attention_reference and
// flash_attention_reference_backward, which follow these kernels loop for loop: read the twin first.
//
// Work split: Br = Bc = 32 = warp size. A thread block is 32 warps (1024 threads). In the forward and
// dQ kernels warp w owns query row i·Br + w and lane c owns key column j·Bc + c of each tile; in the
// dK, dV kernel the roles swap (warp = key row, lane = query row). Tiles sit in shared memory as fp32,
// each row padded to d + 1 floats so that 32 lanes reading one column each hit 32 different banks.
// Covers fp32, and bf16 inputs with fp32 accumulation; d ∈ {32, 64, 128}; any N ≥ 1 (every tile load
// is guarded); causal or not; Tq == Tk only (model.py sends KV-cached decoding to SDPA).
//
// Version log (speed: `python tools/bench_attention.py`, causal, d = 64, fp32, ms and TFLOP/s):
//   v1  one warp per row, one lane per key, fp32 FMAs on CUDA cores (no tensor cores); the backward is
//       two kernels (dQ by query tiles, then dK, dV by key tiles) so no atomics are needed.
//       Not yet measured on a GPU: written and compile-checked (nvcc 13.0, sm_80 and sm_90) without one.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>

#include <type_traits>

constexpr int Br = 32;               // query rows per tile
constexpr int Bc = 32;               // key columns per tile
constexpr int THREADS = 32 * 32;     // one warp per tile row, one lane per tile column
constexpr unsigned ALL_LANES = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* dst, float x) { *dst = x; }
__device__ __forceinline__ void store(__nv_bfloat16* dst, float x) { *dst = __float2bfloat16(x); }

// Butterfly reductions: after five exchanges every lane holds the result over the whole warp.
__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(ALL_LANES, x, offset));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(ALL_LANES, x, offset);
  return x;
}

// Copy rows row0 .. row0+31 of an N×d matrix into a padded fp32 tile. Rows past N become zeros: the
// guard that lets N be any length. Consecutive threads read consecutive elements, so loads coalesce.
template <typename scalar_t, int d>
__device__ void load_tile(float* tile, const scalar_t* src, int row0, int N) {
  for (int e = threadIdx.x; e < 32 * d; e += THREADS) {
    const int r = e / d, x = e % d;
    tile[r * (d + 1) + x] = row0 + r < N ? to_float(src[(row0 + r) * d + x]) : 0.f;
  }
}

// Whether query `row` attends to key `col`: both inside the sequence and, if causal, col ≤ row.
__device__ __forceinline__ bool visible(int row, int col, int N, bool causal) {
  return row < N && col < N && (!causal || col <= row);
}

// Key tiles that query tile i needs: with `causal`, none past the one holding its last row.
__device__ __forceinline__ int key_tiles(int i, int N, bool causal) {
  return causal ? (min((i + 1) * Br, N) - 1) / Bc + 1 : (N + Bc - 1) / Bc;
}

// The first query tile that needs key tile j: with `causal`, tiles that end before it begins see none of it.
__device__ __forceinline__ int first_query_tile(int j, bool causal) { return causal ? j * Bc / Br : 0; }

// Forward. grid (batch·heads, Tr). Writes O and the row log-sum-exp L = m + log l for the backward.
template <typename scalar_t, int d>
__global__ void __launch_bounds__(THREADS)
attention_forward_kernel(const scalar_t* Q, const scalar_t* K, const scalar_t* V, scalar_t* O, float* L,
                         int N, float scale, bool causal) {
  extern __shared__ float smem[];
  float *Qi = smem, *Kj = Qi + Br * (d + 1), *Vj = Kj + Bc * (d + 1);  // tiles of Br or Bc rows × (d+1)
  const size_t head = (size_t)blockIdx.x * N * d;  // this (batch, head)'s N×d matrices
  Q += head; K += head; V += head; O += head; L += (size_t)blockIdx.x * N;
  const int i = blockIdx.y, w = threadIdx.x / 32, lane = threadIdx.x % 32, row = i * Br + w;

  load_tile<scalar_t, d>(Qi, Q, i * Br, N);
  float m = -INFINITY, l = 0.f;  // running max and running sum of exp(S - m) of this row
  float o[d / 32] = {};          // this lane's slots x = lane + 32t of the unnormalised output row
  // for j = 0 .. Tc-1:  S = Qi Kjᵀ·scale;  m' = max(m, rowmax S);  P̃ = exp(S - m');
  //                     l = e^(m-m') l + rowsum P̃;  Oi = e^(m-m') Oi + P̃ Vj;  m = m'
  for (int j = 0; j < key_tiles(i, N, causal); ++j) {
    __syncthreads();  // every warp is done with the previous Kj, Vj
    load_tile<scalar_t, d>(Kj, K, j * Bc, N); load_tile<scalar_t, d>(Vj, V, j * Bc, N);
    __syncthreads();
    if (row >= N) continue;  // a padding row: nothing to compute, but it must still reach the barriers
    float s = 0.f;
    for (int k = 0; k < d; ++k) s += Qi[w * (d + 1) + k] * Kj[lane * (d + 1) + k];
    s = visible(row, j * Bc + lane, N, causal) ? s * scale : -INFINITY;
    // Key 0 is visible to every row, so m is finite from the first tile on: no (-inf) - (-inf).
    const float m_new = fmaxf(m, warp_max(s));
    const float p = expf(s - m_new);
    const float alpha = expf(m - m_new);  // rescales what was summed under the old max
    l = alpha * l + warp_sum(p);
    for (int t = 0; t < d / 32; ++t) o[t] *= alpha;
    for (int c = 0; c < Bc; ++c) {
      const float p_c = __shfl_sync(ALL_LANES, p, c);  // P̃[w][c], held by lane c
      for (int t = 0; t < d / 32; ++t) o[t] += p_c * Vj[c * (d + 1) + lane + 32 * t];
    }
    m = m_new;
  }
  if (row >= N) return;
  // Oi = Oi / l;  Li = m + log l
  for (int t = 0; t < d / 32; ++t) store(&O[row * d + lane + 32 * t], o[t] / l);
  if (lane == 0) L[row] = m + logf(l);
}

// Backward, pass 1: dQ. grid (batch·heads, Tr). Also writes D = rowsum(dO ∘ O) for pass 2.
template <typename scalar_t, int d>
__global__ void __launch_bounds__(THREADS)
attention_backward_dq_kernel(const scalar_t* Q, const scalar_t* K, const scalar_t* V, const scalar_t* O,
                             const float* L, const scalar_t* dO, float* D, scalar_t* dQ,
                             int N, float scale, bool causal) {
  extern __shared__ float smem[];
  float *Qi = smem, *dOi = Qi + Br * (d + 1), *Kj = dOi + Br * (d + 1), *Vj = Kj + Bc * (d + 1);
  const size_t head = (size_t)blockIdx.x * N * d;
  Q += head; K += head; V += head; O += head; dO += head; dQ += head;
  L += (size_t)blockIdx.x * N; D += (size_t)blockIdx.x * N;
  const int i = blockIdx.y, w = threadIdx.x / 32, lane = threadIdx.x % 32, row = i * Br + w;

  load_tile<scalar_t, d>(Qi, Q, i * Br, N); load_tile<scalar_t, d>(dOi, dO, i * Br, N);
  float Li = 0.f, Di = 0.f;
  if (row < N) {
    float part = 0.f;  // Di = rowsum(dO ∘ O): the one number per row that the softmax Jacobian needs
    for (int x = lane; x < d; x += 32) part += to_float(dO[row * d + x]) * to_float(O[row * d + x]);
    Di = warp_sum(part);
    Li = L[row];
    if (lane == 0) D[row] = Di;
  }
  float dq[d / 32] = {};
  // for j = 0 .. Tc-1:  P = exp(Qi Kjᵀ·scale - Li);  dP = dOi Vjᵀ;  dS = P ∘ (dP - Di);  dQi += dS Kj·scale
  for (int j = 0; j < key_tiles(i, N, causal); ++j) {
    __syncthreads();
    load_tile<scalar_t, d>(Kj, K, j * Bc, N); load_tile<scalar_t, d>(Vj, V, j * Bc, N);
    __syncthreads();
    if (row >= N) continue;
    float s = 0.f, dp = 0.f;
    for (int k = 0; k < d; ++k) {
      s += Qi[w * (d + 1) + k] * Kj[lane * (d + 1) + k];
      dp += dOi[w * (d + 1) + k] * Vj[lane * (d + 1) + k];
    }
    s = visible(row, j * Bc + lane, N, causal) ? s * scale : -INFINITY;
    const float p = expf(s - Li);  // the forward's probability, rebuilt from the saved log-sum-exp
    const float ds = p * (dp - Di);
    for (int c = 0; c < Bc; ++c) {
      const float ds_c = __shfl_sync(ALL_LANES, ds, c);
      for (int t = 0; t < d / 32; ++t) dq[t] += ds_c * Kj[c * (d + 1) + lane + 32 * t];
    }
  }
  if (row >= N) return;
  for (int t = 0; t < d / 32; ++t) store(&dQ[row * d + lane + 32 * t], dq[t] * scale);
}

// Backward, pass 2: dK and dV. grid (batch·heads, Tc). Warp w owns key row j·Bc + w; lane r owns
// query row i·Br + r of each Q tile. Reads the D that pass 1 wrote.
template <typename scalar_t, int d>
__global__ void __launch_bounds__(THREADS)
attention_backward_dkdv_kernel(const scalar_t* Q, const scalar_t* K, const scalar_t* V, const float* L,
                               const scalar_t* dO, const float* D, scalar_t* dK, scalar_t* dV,
                               int N, float scale, bool causal) {
  extern __shared__ float smem[];
  float *Kj = smem, *Vj = Kj + Bc * (d + 1), *Qi = Vj + Bc * (d + 1), *dOi = Qi + Br * (d + 1);
  const size_t head = (size_t)blockIdx.x * N * d;
  Q += head; K += head; V += head; dO += head; dK += head; dV += head;
  L += (size_t)blockIdx.x * N; D += (size_t)blockIdx.x * N;
  const int j = blockIdx.y, w = threadIdx.x / 32, lane = threadIdx.x % 32, col = j * Bc + w;

  load_tile<scalar_t, d>(Kj, K, j * Bc, N); load_tile<scalar_t, d>(Vj, V, j * Bc, N);
  float dk[d / 32] = {}, dv[d / 32] = {};
  // for i = first .. Tr-1:  P = exp(Qi Kjᵀ·scale - Li);  dVj += Pᵀ dOi;  dP = dOi Vjᵀ;
  //                         dS = P ∘ (dP - Di);  dKj += dSᵀ Qi·scale
  for (int i = first_query_tile(j, causal); i < (N + Br - 1) / Br; ++i) {
    __syncthreads();
    load_tile<scalar_t, d>(Qi, Q, i * Br, N); load_tile<scalar_t, d>(dOi, dO, i * Br, N);
    __syncthreads();
    if (col >= N) continue;
    const int row = i * Br + lane;
    const float Li = row < N ? L[row] : 0.f, Di = row < N ? D[row] : 0.f;
    float s = 0.f, dp = 0.f;
    for (int k = 0; k < d; ++k) {
      s += Qi[lane * (d + 1) + k] * Kj[w * (d + 1) + k];
      dp += dOi[lane * (d + 1) + k] * Vj[w * (d + 1) + k];
    }
    s = visible(row, col, N, causal) ? s * scale : -INFINITY;
    const float p = expf(s - Li);
    const float ds = p * (dp - Di);
    for (int r = 0; r < Br; ++r) {
      const float p_r = __shfl_sync(ALL_LANES, p, r), ds_r = __shfl_sync(ALL_LANES, ds, r);
      for (int t = 0; t < d / 32; ++t) {
        dv[t] += p_r * dOi[r * (d + 1) + lane + 32 * t];
        dk[t] += ds_r * Qi[r * (d + 1) + lane + 32 * t];
      }
    }
  }
  if (col >= N) return;
  for (int t = 0; t < d / 32; ++t) {
    store(&dK[col * d + lane + 32 * t], dk[t] * scale);
    store(&dV[col * d + lane + 32 * t], dv[t]);
  }
}

// ---------------------------------------------------------------------------------------------------
// host side: check the inputs, then launch on PyTorch's current stream

static void check_like(const torch::Tensor& t, const torch::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), name, " must be on ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " is ", t.scalar_type(), " but q is ", q.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), name, " has shape ", t.sizes(), " but q has ", q.sizes(),
              " (this kernel needs Tq == Tk)");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

static void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, nh, N, d), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16,
              "dtype must be float32 or bfloat16, got ", q.scalar_type());
  const int64_t d = q.size(3), N = q.size(2);
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "head dim must be 32, 64 or 128, got ", d);
  TORCH_CHECK(N >= 1 && q.size(0) * q.size(1) >= 1, "q must not be empty, got ", q.sizes());
  // Tiles go on grid.y (at most 65535), which also keeps offsets within one head, N·d, inside an int.
  TORCH_CHECK((N + Br - 1) / Br <= 65535, "sequence too long for the grid: ", N);
  check_like(q, q, "q"); check_like(k, q, "k"); check_like(v, q, "v");
}

// Call launch(scalar_t{}, d as a compile-time constant) for q's dtype and head dim.
template <typename Launch>
static void dispatch(const torch::Tensor& q, Launch launch) {
  auto with_dim = [&](auto scalar) {
    switch (q.size(3)) {
      case 32: launch(scalar, std::integral_constant<int, 32>{}); break;
      case 64: launch(scalar, std::integral_constant<int, 64>{}); break;
      default: launch(scalar, std::integral_constant<int, 128>{}); break;
    }
  };
  if (q.scalar_type() == torch::kBFloat16) with_dim(__nv_bfloat16{});
  else with_dim(float{});
}

// Launch with `tiles` padded fp32 tiles of dynamic shared memory; above 48 KB the kernel must opt in.
template <typename Kernel, typename... Args>
static void launch_kernel(Kernel kernel, dim3 grid, int tiles, int d, Args... args) {
  const int smem = tiles * 32 * (d + 1) * sizeof(float);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, THREADS, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T> static const T* in(const torch::Tensor& t) { return static_cast<const T*>(t.data_ptr()); }
template <typename T> static T* out(torch::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// q, k, v (B, nh, N, d) -> O (B, nh, N, d) and L (B, nh, N) in float32.
std::vector<torch::Tensor> attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, bool causal) {
  check_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const int heads = q.size(0) * q.size(1), N = q.size(2), d = q.size(3);
  auto O = torch::empty_like(q);
  auto L = torch::empty({q.size(0), q.size(1), N}, q.options().dtype(torch::kFloat));
  dispatch(q, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    constexpr int head_dim = decltype(dim)::value;
    launch_kernel(attention_forward_kernel<scalar_t, head_dim>, dim3(heads, (N + Br - 1) / Br), 3, d,
                  in<scalar_t>(q), in<scalar_t>(k), in<scalar_t>(v), out<scalar_t>(O), out<float>(L),
                  N, 1.f / sqrtf(d), causal);
  });
  return {O, L};
}

// The saved q, k, v, O, L and the incoming dO -> dQ, dK, dV.
std::vector<torch::Tensor> attention_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor O,
                                              torch::Tensor L, torch::Tensor dO, bool causal) {
  check_inputs(q, k, v);
  check_like(O, q, "O"); check_like(dO, q, "dO");
  TORCH_CHECK(L.device() == q.device() && L.scalar_type() == torch::kFloat && L.is_contiguous() &&
              L.sizes() == q.sizes().slice(0, 3), "L must be the (B, nh, N) float32 tensor that forward returned");
  const c10::cuda::CUDAGuard guard(q.device());
  const int heads = q.size(0) * q.size(1), N = q.size(2), d = q.size(3);
  auto dQ = torch::empty_like(q), dK = torch::empty_like(k), dV = torch::empty_like(v);
  auto D = torch::empty_like(L);  // rowsum(dO ∘ O): written by pass 1, read by pass 2
  dispatch(q, [&](auto scalar, auto dim) {
    using scalar_t = decltype(scalar);
    constexpr int head_dim = decltype(dim)::value;
    launch_kernel(attention_backward_dq_kernel<scalar_t, head_dim>, dim3(heads, (N + Br - 1) / Br), 4, d,
                  in<scalar_t>(q), in<scalar_t>(k), in<scalar_t>(v), in<scalar_t>(O), in<float>(L),
                  in<scalar_t>(dO), out<float>(D), out<scalar_t>(dQ), N, 1.f / sqrtf(d), causal);
    launch_kernel(attention_backward_dkdv_kernel<scalar_t, head_dim>, dim3(heads, (N + Bc - 1) / Bc), 4, d,
                  in<scalar_t>(q), in<scalar_t>(k), in<scalar_t>(v), in<float>(L), in<scalar_t>(dO),
                  in<float>(D), out<scalar_t>(dK), out<scalar_t>(dV), N, 1.f / sqrtf(d), causal);
  });
  return {dQ, dK, dV};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &attention_forward, "q, k, v (B, nh, N, d), causal -> O, L (row log-sum-exp, float32)");
  m.def("backward", &attention_backward, "q, k, v, O, L, dO, causal -> dQ, dK, dV");
}
