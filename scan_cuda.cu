// The selective scan of DiS's bidirectional Mamba mixer as CUDA kernels, forward and backward,
// with the contract of scan_triton.py's _scan_forward / _scan_backward (token-major layout
// (batch, L, directions, E), direction 1 walking the same memory backwards; the gate z and the
// output y shared by the directions). scan_cuda.py builds and calls them; the readable
// definition is scan.py's selective_scan_ref, which the tests compare against.
//
// One thread (lane) owns one channel e of one batch element and holds its (up to) 16 states in
// registers, so the sums over states (y, and the gradients of u and delta) stay inside the
// thread, and each thread has 16 independent recurrences to interleave. A block of THREADS
// channels walks time in segments of K steps; the segment's B and C are staged in shared memory
// as float32 and read by every lane.
//
// The gradients of B and C are sums over channels, i.e. over lanes. Lane l keeps state j ^ m in
// its register j, m = (l >> 1) & 15. With that permutation a reduce-scatter over the warp needs
// no selects: at the shuffle across lane bit 4 every lane adds its partner's registers 8..15
// onto its own 0..7 (they hold the same states), then bits 3, 2, 1 likewise, and bit 0 adds the
// last value: lanes 2m and 2m + 1 end with the warp's sum for state m, at one shuffle and one
// add per value. To read B and C in that register order with 16-byte loads,
// shared memory holds four copies of each step's B (and C), copy c with element q = B[q ^ c].
//
// Training: the forward pass saves the state at the start of every save_every-th segment
// (float32, (batch, directions, saved, 16, E), register order). The backward pass walks the
// segments last to first: from the saved state it recomputes the segment forwards, keeping
// a_s h_{s-1} (a_s = exp(delta_s A)) per step in shared memory and forming dC_s = sum_e g_s h_s
// (g = dy silu(z)) on the way, then runs the adjoint dh_s = C_s g_s + a_{s+1} dh_{s+1}
// backwards, forming dB_s = sum_e dh_s delta_s u_s and the per-channel gradients. Steps past
// the end of the sequence run with delta = u = g = 0, which leaves every state and sum alone.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int NS = 16;    // states per channel, padded with zero states
constexpr int COPY = 20;   // floats between the four permuted copies of a step's B in shared memory
constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

struct Params {
  const void *u, *dl, *B, *C, *z, *dy;
  const float *A, *D, *bias;
  void *y, *du, *ddl, *dz;
  float *states, *dBC, *dA, *dD, *dbias;
  int64_t su_b, su_l, su_d, sd_b, sd_l, sd_d;
  int64_t sB_b, sB_l, sB_d, sB_n, sC_b, sC_l, sC_d, sC_n;
  int64_t sz_b, sz_l, sy_b, sy_l;  // z; y (forward) or dy (backward)
  int batch, L, E, ND, N, n_seg, save_every, n_saved;
  bool save_states;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

// torch's softplus (threshold 20); log1p(w) by Goldberg's trick on the fast log. Both sides of
// the selects are computed, so that no branch splits a segment's steps (see the kernels).
__device__ __forceinline__ float softplus(float x) {
  const float w = __expf(x), v = 1.f + w;
  const float goldberg = __logf(v) * __fdividef(w, v - 1.f);
  return x > 20.f ? x : (v == 1.f ? w : goldberg);
}

// ---- which lane holds what ------------------------------------------------------------------------
struct Lane {
  int lane, warp, m, e;
  bool active;  // e < E
  template <int THREADS>
  __device__ static Lane of(int E) {
    const int tid = threadIdx.x;
    return Lane{tid & 31, tid >> 5, (tid >> 1) & 15, (int)blockIdx.x * THREADS + tid, (int)blockIdx.x * THREADS + tid < E};
  }
  __device__ int state(int j) const { return j ^ m; }  // which state register j holds
};

// Sum over the warp's lanes of state m (see the top of the file); v is clobbered.
__device__ __forceinline__ float reduce_scatter(float (&v)[NS]) {
#pragma unroll
  for (int r = 1; r < NS; r *= 2) {  // keep NS / 2r values, adding those of the lane across bit 16 / r
#pragma unroll
    for (int k = 0; k < NS / (2 * r); ++k) v[k] += __shfl_xor_sync(FULL, v[k + NS / (2 * r)], 16 / r);
  }
  return v[0] + __shfl_xor_sync(FULL, v[0], 1);
}

// ---- B and C of a segment, staged in shared memory -------------------------------------------------
// Layout per buffer: [step K][B, C][copy 4][COPY floats]; copy c holds X[q ^ c] at element q.
template <int K> __host__ __device__ constexpr int bc_floats() { return K * 2 * 4 * COPY; }
template <int K, int THREADS> __host__ __device__ constexpr int bc_fill() { return (K * 32 + THREADS - 1) / THREADS; }

__device__ __forceinline__ int time_of(const Params& p, int d, int s) { return d ? p.L - 1 - s : s; }

// Loaded values are kept in their own type until used: converting them right away would make
// the thread wait for the load there (the compiler places the conversion next to the load).
template <typename T, int K, int THREADS>
__device__ __forceinline__ void fetch_bc(const Params& p, int b, int d, int seg, T (&r)[bc_fill<K, THREADS>()]) {
#pragma unroll
  for (int k = 0; k < bc_fill<K, THREADS>(); ++k) {
    const int idx = threadIdx.x + k * THREADS, i = idx >> 5, kind = (idx >> 4) & 1, n = idx & 15;
    const int s = seg * K + i;
    T v = from_f<T>(0.f);
    if (idx < K * 32 && n < p.N && s < p.L) {
      const int64_t t = time_of(p, d, s);
      v = kind ? __ldg((const T*)p.C + b * p.sC_b + t * p.sC_l + d * p.sC_d + n * p.sC_n)
               : __ldg((const T*)p.B + b * p.sB_b + t * p.sB_l + d * p.sB_d + n * p.sB_n);
    }
    r[k] = v;
  }
}

template <typename T, int K, int THREADS>
__device__ __forceinline__ void store_bc(float* buf, const T (&r)[bc_fill<K, THREADS>()]) {
#pragma unroll
  for (int k = 0; k < bc_fill<K, THREADS>(); ++k) {
    const int idx = threadIdx.x + k * THREADS, i = idx >> 5, kind = (idx >> 4) & 1, n = idx & 15;
    if (idx < K * 32) {
      const float v = to_f(r[k]);
#pragma unroll
      for (int c = 0; c < 4; ++c) buf[((i * 2 + kind) * 4 + c) * COPY + (n ^ c)] = v;
    }
  }
}

// Step i's B (kind 0) or C (kind 1) in this lane's register order: x[j] = X[j ^ m].
__device__ __forceinline__ void read_bc(const float* buf, int i, int kind, const Lane& ln, float (&x)[NS]) {
  const float4* c = reinterpret_cast<const float4*>(buf + ((i * 2 + kind) * 4 + (ln.m & 3)) * COPY);
#pragma unroll
  for (int g = 0; g < NS / 4; ++g) {
    const float4 q = c[g ^ (ln.m >> 2)];
    x[4 * g] = q.x; x[4 * g + 1] = q.y; x[4 * g + 2] = q.z; x[4 * g + 3] = q.w;
  }
}

// ---- per-channel pieces -----------------------------------------------------------------------------
// Where a direction reads a (batch, L, ...) tensor of channel e: step s is at at + s * step.
template <typename T>
struct Walk {
  const T* at;
  int64_t step;
  __device__ Walk(const void* base, int64_t offset, int64_t stride_l, const Params& p, int d)
      : at((const T*)base + offset + (d ? (int64_t)(p.L - 1) * stride_l : 0)), step(d ? -stride_l : stride_l) {}
};

// The segment's K values of one per-channel input; zero past the end and for idle lanes.
// `ours`: written earlier by this kernel (the first direction's output), so not via the read-only cache.
template <typename T, int K>
__device__ __forceinline__ void load_steps(const Walk<T>& w, int seg, int L, bool on, bool ours, T (&x)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int s = seg * K + i;
    const T* ptr = w.at + s * w.step;
    x[i] = on && s < L ? (ours ? *ptr : __ldg(ptr)) : from_f<T>(0.f);
  }
}

// Direction d's A times log2(e) in register order (exp(delta A) = exp2(delta A2)); zero past N.
__device__ __forceinline__ void direction_A2(const Params& p, int d, const Lane& ln, float (&A2)[NS]) {
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    const int n = ln.state(j);
    A2[j] = ln.active && n < p.N ? p.A[((int64_t)d * p.E + ln.e) * p.N + n] * LOG2E : 0.f;
  }
}

// The saved state k of direction d: register j of channel e at [j * E].
__device__ __forceinline__ float* saved_state(const Params& p, int b, int d, int k, const Lane& ln) {
  return p.states + (((int64_t)b * p.ND + d) * p.n_saved + k) * NS * p.E + ln.e;
}


// ---- forward --------------------------------------------------------------------------------------------
// Grid: (E / THREADS, batch). The second direction adds its gated output onto the first's.
template <typename T, int K, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_fwd_kernel(Params p) {
  constexpr int FILL = bc_fill<K, THREADS>();
  __shared__ __align__(16) float bc[2][bc_floats<K>()];
  const Lane ln = Lane::of<THREADS>(p.E);
  const int b = blockIdx.y;
  T* y = (T*)p.y;
  for (int d = 0; d < p.ND; ++d) {
    float A2[NS];
    direction_A2(p, d, ln, A2);
    const float bias = p.bias && ln.active ? p.bias[d * p.E + ln.e] : 0.f;
    const float Dv = p.D && ln.active ? p.D[d * p.E + ln.e] : 0.f;
    const Walk<T> wu(p.u, b * p.su_b + d * p.su_d + ln.e, p.su_l, p, d);
    const Walk<T> wd(p.dl, b * p.sd_b + d * p.sd_d + ln.e, p.sd_l, p, d);
    const Walk<T> wz(p.z, b * p.sz_b + ln.e, p.sz_l, p, d);
    const Walk<T> wy(p.y, b * p.sy_b + ln.e, p.sy_l, p, d);
    float h[NS];
#pragma unroll
    for (int j = 0; j < NS; ++j) h[j] = 0.f;
    // inputs of the next segment, loaded one segment ahead
    T nu[K], nx[K], nz[K], ny[K];
    load_steps<T, K>(wu, 0, p.L, ln.active, false, nu);
    load_steps<T, K>(wd, 0, p.L, ln.active, false, nx);
    load_steps<T, K>(wz, 0, p.L, ln.active, false, nz);
    load_steps<T, K>(wy, 0, p.L, ln.active && d > 0, true, ny);
    T r[FILL];
    fetch_bc<T, K, THREADS>(p, b, d, 0, r);
    store_bc<T, K, THREADS>(bc[0], r);
    __syncthreads();
    for (int seg = 0; seg < p.n_seg; ++seg) {
      T uu[K], xx[K], zz[K], yp[K];
#pragma unroll
      for (int i = 0; i < K; ++i) { uu[i] = nu[i]; xx[i] = nx[i]; zz[i] = nz[i]; yp[i] = ny[i]; }
      if (seg + 1 < p.n_seg) {
        fetch_bc<T, K, THREADS>(p, b, d, seg + 1, r);
        load_steps<T, K>(wu, seg + 1, p.L, ln.active, false, nu);
        load_steps<T, K>(wd, seg + 1, p.L, ln.active, false, nx);
        load_steps<T, K>(wz, seg + 1, p.L, ln.active, false, nz);
        load_steps<T, K>(wy, seg + 1, p.L, ln.active && d > 0, true, ny);
      }
      if (p.save_states && seg % p.save_every == 0 && ln.active) {
        float* st = saved_state(p, b, d, seg / p.save_every, ln);
#pragma unroll
        for (int j = 0; j < NS; ++j) st[j * p.E] = h[j];
      }
      const float* cur = bc[seg & 1];
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int s = seg * K + i;
        const bool ok = s < p.L;
        const float u = to_f(uu[i]), z = to_f(zz[i]);
        const float dt = softplus(to_f(xx[i]) + bias) * (ok ? 1.f : 0.f), du = dt * u;
        float Bv[NS], Cv[NS];
        read_bc(cur, i, 0, ln, Bv);
        read_bc(cur, i, 1, ln, Cv);
        float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
        for (int j = 0; j < NS; j += 2) {
          h[j] = fmaf(ex2(dt * A2[j]), h[j], du * Bv[j]);
          h[j + 1] = fmaf(ex2(dt * A2[j + 1]), h[j + 1], du * Bv[j + 1]);
          acc0 = fmaf(Cv[j], h[j], acc0);
          acc1 = fmaf(Cv[j + 1], h[j + 1], acc1);
        }
        const float out = (acc0 + acc1 + Dv * u) * z * sigmoid(z) + to_f(yp[i]);
        if (ok && ln.active) y[(wy.at - (const T*)p.y) + s * wy.step] = from_f<T>(out);
      }
      if (seg + 1 < p.n_seg) store_bc<T, K, THREADS>(bc[(seg + 1) & 1], r);
      __syncthreads();
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------------------
template <int K, int THREADS> constexpr size_t bwd_smem_bytes() {
  return sizeof(float) * (K * NS * THREADS + 2 * bc_floats<K>() + 2 * K * 2 * (THREADS / 32) * 16);
}

// The state after segment c from the state before it (the segments between a saved state and the
// one being differentiated, when save_every > 1); B straight from global memory.
template <typename T, int K>
__device__ void advance(const Params& p, int b, int d, int c, const Lane& ln, float bias, const Walk<T>& wu,
                        const Walk<T>& wd, const float (&A2)[NS], float (&h)[NS]) {
  for (int i = 0; i < K; ++i) {
    const int s = c * K + i;
    const int64_t t = time_of(p, d, s);
    const float dt = ln.active ? softplus(to_f(__ldg(wd.at + s * wd.step)) + bias) : 0.f;
    const float du = ln.active ? dt * to_f(__ldg(wu.at + s * wu.step)) : 0.f;
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      const int n = ln.state(j);
      const float Bn = n < p.N ? to_f(__ldg((const T*)p.B + b * p.sB_b + t * p.sB_l + d * p.sB_d + n * p.sB_n)) : 0.f;
      h[j] = fmaf(ex2(dt * A2[j]), h[j], du * Bn);
    }
  }
}

__device__ __forceinline__ void load_state(const Params& p, int b, int d, int seg, const Lane& ln, float (&h)[NS]) {
  const float* st = saved_state(p, b, d, seg / p.save_every, ln);
#pragma unroll
  for (int j = 0; j < NS; ++j) h[j] = ln.active ? st[j * p.E] : 0.f;
}

// Grid: (E / THREADS, batch); dynamic shared memory bwd_smem_bytes<K, THREADS>().
template <typename T, int K, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_bwd_kernel(Params p) {
  constexpr int FILL = bc_fill<K, THREADS>(), WARPS = THREADS / 32;
  extern __shared__ __align__(16) float smem[];
  float4* stash = reinterpret_cast<float4*>(smem);  // [K][4][THREADS]: a_s h_{s-1}, per lane
  float* bc = smem + K * NS * THREADS;              // [2][bc_floats]
  float* red = bc + 2 * bc_floats<K>();             // [2][K][B, C][WARPS][16]: per-warp channel sums
  const Lane ln = Lane::of<THREADS>(p.E);
  const int tid = threadIdx.x, b = blockIdx.y;
  T* du_out = (T*)p.du;
  T* ddl_out = (T*)p.ddl;
  T* dz_out = (T*)p.dz;
  for (int d = 0; d < p.ND; ++d) {
    float A2[NS];
    direction_A2(p, d, ln, A2);
    const float bias = p.bias && ln.active ? p.bias[d * p.E + ln.e] : 0.f;
    const float Dv = p.D && ln.active ? p.D[d * p.E + ln.e] : 0.f;
    const Walk<T> wu(p.u, b * p.su_b + d * p.su_d + ln.e, p.su_l, p, d);
    const Walk<T> wd(p.dl, b * p.sd_b + d * p.sd_d + ln.e, p.sd_l, p, d);
    const Walk<T> wz(p.z, b * p.sz_b + ln.e, p.sz_l, p, d);
    const Walk<T> wg(p.dy, b * p.sy_b + ln.e, p.sy_l, p, d);
    const Walk<T> wdz(p.dz, (int64_t)b * p.L * p.E + ln.e, p.E, p, d);  // dz, du, ddelta: contiguous
    const Walk<T> wdu(p.du, ((int64_t)b * p.L * p.ND + d) * p.E + ln.e, p.ND * p.E, p, d);
    float dh[NS], dA[NS];
#pragma unroll
    for (int j = 0; j < NS; ++j) dh[j] = dA[j] = 0.f;
    float dD = 0.f, dbias = 0.f, dt_after = 0.f;  // dt_after: delta of the step after the segment
    // inputs and saved state of the next segment (walking backwards), loaded one segment ahead
    T nu[K], nx[K], nz[K], ng[K], nq[K];
    float nh[NS];
    const int last = p.n_seg - 1;
    load_steps<T, K>(wu, last, p.L, ln.active, false, nu);
    load_steps<T, K>(wd, last, p.L, ln.active, false, nx);
    load_steps<T, K>(wz, last, p.L, ln.active, false, nz);
    load_steps<T, K>(wg, last, p.L, ln.active, false, ng);
    load_steps<T, K>(wdz, last, p.L, ln.active && d > 0, true, nq);
    load_state(p, b, d, last, ln, nh);
    T r[FILL];
    fetch_bc<T, K, THREADS>(p, b, d, last, r);
    store_bc<T, K, THREADS>(bc + (last & 1) * bc_floats<K>(), r);
    __syncthreads();
    for (int seg = last; seg >= 0; --seg) {
      T uu[K], xx[K], zz[K], gy[K], dzp[K];
      float h[NS];
#pragma unroll
      for (int i = 0; i < K; ++i) { uu[i] = nu[i]; xx[i] = nx[i]; zz[i] = nz[i]; gy[i] = ng[i]; dzp[i] = nq[i]; }
#pragma unroll
      for (int j = 0; j < NS; ++j) h[j] = nh[j];
      if (seg > 0) {
        fetch_bc<T, K, THREADS>(p, b, d, seg - 1, r);
        load_steps<T, K>(wu, seg - 1, p.L, ln.active, false, nu);
        load_steps<T, K>(wd, seg - 1, p.L, ln.active, false, nx);
        load_steps<T, K>(wz, seg - 1, p.L, ln.active, false, nz);
        load_steps<T, K>(wg, seg - 1, p.L, ln.active, false, ng);
        load_steps<T, K>(wdz, seg - 1, p.L, ln.active && d > 0, true, nq);
        load_state(p, b, d, seg - 1, ln, nh);
      }
      for (int c = seg - seg % p.save_every; c < seg; ++c) advance<T, K>(p, b, d, c, ln, bias, wu, wd, A2, h);
      const float* cur = bc + (seg & 1) * bc_floats<K>();
      float* rs = red + (seg & 1) * K * 2 * WARPS * 16;
      // Forward through the segment: stash a_s h_{s-1}, form dC_s and dz_s.
      float dts[K], dus[K], gs[K], sps[K];
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int s = seg * K + i;
        const bool ok = s < p.L;
        const float x = to_f(xx[i]) + bias, u = to_f(uu[i]), z = to_f(zz[i]), dy = to_f(gy[i]);
        const float dt = softplus(x) * (ok ? 1.f : 0.f), du = dt * u;
        const float sp = x > 20.f ? 1.f : sigmoid(x);  // d delta / d x
        const float sig = sigmoid(z), g = dy * z * sig;
        float Bv[NS], Cv[NS], v[NS], ah[NS];
        read_bc(cur, i, 0, ln, Bv);
        read_bc(cur, i, 1, ln, Cv);
        float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
        for (int j = 0; j < NS; j += 2) {
          ah[j] = ex2(dt * A2[j]) * h[j];
          ah[j + 1] = ex2(dt * A2[j + 1]) * h[j + 1];
          h[j] = fmaf(du, Bv[j], ah[j]);
          h[j + 1] = fmaf(du, Bv[j + 1], ah[j + 1]);
          acc0 = fmaf(Cv[j], h[j], acc0);
          acc1 = fmaf(Cv[j + 1], h[j + 1], acc1);
          v[j] = h[j] * g;
          v[j + 1] = h[j + 1] * g;
        }
#pragma unroll
        for (int q = 0; q < NS / 4; ++q)
          stash[(i * 4 + q) * THREADS + tid] = make_float4(ah[4 * q], ah[4 * q + 1], ah[4 * q + 2], ah[4 * q + 3]);
        const float dC = reduce_scatter(v);
        if (!(ln.lane & 1)) rs[((i * 2 + 1) * WARPS + ln.warp) * 16 + ln.m] = dC;
        const float yssm = acc0 + acc1 + Dv * u;
        if (ok && ln.active) {
          const float dzv = dy * yssm * sig * (1.f + z * (1.f - sig)) + to_f(dzp[i]);
          dz_out[(wdz.at - (const T*)p.dz) + s * wdz.step] = from_f<T>(dzv);
        }
        dD = fmaf(g, u, dD);
        dts[i] = dt; dus[i] = du; gs[i] = g; sps[i] = sp;
      }
      // Backward through the segment: dh_s = C_s g_s + a_{s+1} dh_{s+1}; dB_s, du_s, ddelta_s, dA.
#pragma unroll
      for (int i = K - 1; i >= 0; --i) {
        const int s = seg * K + i;
        const float dt_next = i == K - 1 ? dt_after : dts[i + 1];  // a_{s+1} is recomputed from it
        float Bv[NS], Cv[NS], v[NS], ah[NS];
        read_bc(cur, i, 0, ln, Bv);
        read_bc(cur, i, 1, ln, Cv);
#pragma unroll
        for (int q = 0; q < NS / 4; ++q) {
          const float4 a4 = stash[(i * 4 + q) * THREADS + tid];
          ah[4 * q] = a4.x; ah[4 * q + 1] = a4.y; ah[4 * q + 2] = a4.z; ah[4 * q + 3] = a4.w;
        }
        float sw = 0.f, dhB = 0.f;
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          dh[j] = fmaf(ex2(dt_next * A2[j]), dh[j], Cv[j] * gs[i]);
          const float w = dh[j] * ah[j];  // gradient w.r.t. a_s, times a_s
          dA[j] = fmaf(w, dts[i], dA[j]);
          sw = fmaf(w, A2[j], sw);
          dhB = fmaf(dh[j], Bv[j], dhB);
          v[j] = dh[j] * dus[i];
        }
        const float dB = reduce_scatter(v);
        if (!(ln.lane & 1)) rs[((i * 2) * WARPS + ln.warp) * 16 + ln.m] = dB;
                        const float ddt = (LN2 * sw + dhB * to_f(uu[i])) * sps[i];  // d a_s / d delta_s = A a_s
        dbias += ddt;
        if (s < p.L && ln.active) {
          const int64_t at = (wdu.at - (const T*)p.du) + s * wdu.step;
          du_out[at] = from_f<T>(dhB * dts[i] + Dv * gs[i]);
          ddl_out[at] = from_f<T>(ddt);
        }
      }
      dt_after = dts[0];
      if (seg > 0) store_bc<T, K, THREADS>(bc + ((seg - 1) & 1) * bc_floats<K>(), r);
      __syncthreads();
      // The block's sums over its warps, one partial per block: (E blocks, batch, L, ND, B/C, N).
      for (int idx = tid; idx < K * 32; idx += THREADS) {
        const int i = idx >> 5, kind = (idx >> 4) & 1, n = idx & 15, s = seg * K + i;
        if (s < p.L && n < p.N) {
          float sum = 0.f;
#pragma unroll
          for (int w = 0; w < WARPS; ++w) sum += rs[((i * 2 + kind) * WARPS + w) * 16 + n];
          const int64_t t = time_of(p, d, s);
          p.dBC[((((int64_t)blockIdx.x * p.batch + b) * p.L + t) * p.ND + d) * 2 * p.N + kind * p.N + n] = sum;
        }
      }
    }
    if (ln.active) {
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        const int n = ln.state(j);
        if (n < p.N) p.dA[(((int64_t)b * p.ND + d) * p.E + ln.e) * p.N + n] = dA[j];
      }
    }
    if (ln.active) {
      p.dD[((int64_t)b * p.ND + d) * p.E + ln.e] = dD;
      p.dbias[((int64_t)b * p.ND + d) * p.E + ln.e] = dbias;
    }
  }
}

// ---- host side --------------------------------------------------------------------------------------------
// One configuration, tuned on the H100 at DiS's shapes (BENCHMARKS.md): segments of 4 steps,
// 128 channels per block; the forward pass capped at 128 registers (4 blocks per SM).
constexpr int CHUNK = 4, THREADS = 128, FWD_MIN_BLOCKS = 4, BWD_MIN_BLOCKS = 1;

Params common_params(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& B,
                     const torch::Tensor& C, const c10::optional<torch::Tensor>& D,
                     const torch::Tensor& z, const c10::optional<torch::Tensor>& bias, int64_t save_every) {
  Params p{};
  p.u = u.data_ptr(); p.dl = delta.data_ptr(); p.B = B.data_ptr(); p.C = C.data_ptr();
  p.z = z.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = D ? D->data_ptr<float>() : nullptr;
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.su_b = u.stride(0); p.su_l = u.stride(1); p.su_d = u.stride(2);
  p.sd_b = delta.stride(0); p.sd_l = delta.stride(1); p.sd_d = delta.stride(2);
  p.sB_b = B.stride(0); p.sB_l = B.stride(1); p.sB_d = B.stride(2); p.sB_n = B.stride(3);
  p.sC_b = C.stride(0); p.sC_l = C.stride(1); p.sC_d = C.stride(2); p.sC_n = C.stride(3);
  p.sz_b = z.stride(0); p.sz_l = z.stride(1);
  p.batch = u.size(0); p.L = u.size(1); p.ND = u.size(2); p.E = u.size(3); p.N = A.size(2);
  p.n_seg = (p.L + CHUNK - 1) / CHUNK;
  p.save_every = save_every;
  p.n_saved = (p.n_seg + save_every - 1) / save_every;
  return p;
}

template <typename T>
void launch_fwd(const Params& p) {
  const dim3 grid((p.E + THREADS - 1) / THREADS, p.batch);
  scan_fwd_kernel<T, CHUNK, THREADS, FWD_MIN_BLOCKS><<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
}

template <typename T>
void launch_bwd(const Params& p) {
  constexpr size_t smem = bwd_smem_bytes<CHUNK, THREADS>();
  auto kernel = scan_bwd_kernel<T, CHUNK, THREADS, BWD_MIN_BLOCKS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.E + THREADS - 1) / THREADS, p.batch);
  kernel<<<grid, THREADS, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
}

// launch_fwd or launch_bwd for u's dtype.
template <void (*F)(const Params&), void (*BF)(const Params&), void (*H)(const Params&)>
void by_dtype(const torch::Tensor& u, const Params& p) {
  switch (u.scalar_type()) {
    case torch::kFloat: F(p); break;
    case torch::kBFloat16: BF(p); break;
    case torch::kHalf: H(p); break;
    default: TORCH_CHECK(false, "scan_cuda: unsupported dtype ", u.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The kernels compute DiS's mixer: delta = softplus(delta + bias), output gated by silu(z).
// y (batch, L, E) and, when given, states (batch, ND, saved, 16, E) float32 are written.
void scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
              c10::optional<torch::Tensor> D, torch::Tensor z, c10::optional<torch::Tensor> bias, torch::Tensor y,
              c10::optional<torch::Tensor> states, int64_t save_every) {
  const c10::cuda::CUDAGuard guard(u.device());
  Params p = common_params(u, delta, A, B, C, D, z, bias, save_every);
  p.y = y.data_ptr(); p.sy_b = y.stride(0); p.sy_l = y.stride(1);
  p.save_states = states.has_value();
  p.states = states ? states->data_ptr<float>() : nullptr;
  by_dtype<launch_fwd<float>, launch_fwd<__nv_bfloat16>, launch_fwd<__half>>(u, p);
}

// du, ddelta (batch, L, ND, E), dz (batch, L, E) contiguous; float32 partial sums dBC
// (E blocks, batch, L, ND, 2, N), dA (batch, ND, E, N), dD and dbias (batch, ND, E).
void scan_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
              c10::optional<torch::Tensor> D, torch::Tensor z, c10::optional<torch::Tensor> bias, torch::Tensor dy,
              torch::Tensor states, torch::Tensor du, torch::Tensor ddelta, torch::Tensor dz, torch::Tensor dBC,
              torch::Tensor dA, torch::Tensor dD, torch::Tensor dbias, int64_t save_every) {
  const c10::cuda::CUDAGuard guard(u.device());
  Params p = common_params(u, delta, A, B, C, D, z, bias, save_every);
  p.dy = dy.data_ptr(); p.sy_b = dy.stride(0); p.sy_l = dy.stride(1);
  p.states = states.data_ptr<float>();
  p.du = du.data_ptr(); p.ddl = ddelta.data_ptr(); p.dz = dz.data_ptr();
  p.dBC = dBC.data_ptr<float>(); p.dA = dA.data_ptr<float>(); p.dD = dD.data_ptr<float>();
  p.dbias = dbias.data_ptr<float>();
  by_dtype<launch_bwd<float>, launch_bwd<__nv_bfloat16>, launch_bwd<__half>>(u, p);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("chunk") = CHUNK;
  m.attr("threads") = THREADS;
  m.def("scan_fwd", &scan_fwd, "DiS selective scan, forward (both directions)");
  m.def("scan_bwd", &scan_bwd, "DiS selective scan, backward (both directions)");
}
