// The selective scan of DiS's bidirectional Mamba mixer as CUDA kernels, forward and backward,
// with the contract of scan_triton.py's _scan_forward / _scan_backward (token-major layout
// (batch, L, directions, E), direction 1 walking the same memory backwards; the gate z and the
// output y shared by the directions). scan_cuda.py builds and calls them; the readable
// definition is scan.py's selective_scan_ref, which the tests compare against.
//
// Four lanes (a quad) own one channel e of one batch element, each lane four of its 16 states,
// in registers: a warp holds 8 channels, so that even one direction at (32, 768, 1026) gives the
// GPU 3,072 warps, and a lane needs few enough registers for 16 warps per SM. A block of
// THREADS / 4 channels walks time in segments of K steps (8 forward, 4 backward); the segment's
// B and C are staged in shared memory as float32 and read by every quad. Each kernel computes
// one direction, d a template parameter: the host launches direction 0, then direction 1, which
// adds its output (y forward, dz backward) onto the first's.
//
// Per step, what is one number per channel (delta through softplus, delta u, the gated dy) is
// computed once, by the step's owner, lane i % 4 of the quad for step i of a chunk of four steps,
// and broadcast to the other three with a shuffle. The sums over states (y, and the gradients of
// u and delta) are partial in each lane; a chunk's four of them are reduce-scattered over the
// quad so that each owner ends with the sum of its own step, and writes it.
//
// The gradients of B and C are sums over channels, i.e. over the warp's 8 quads. Lane l keeps
// state 4q + (j ^ m) in its register j (q = l & 3, m = (l >> 3) & 3), so a reduce-scatter over
// the quads needs no selects: across lane bit 4 every lane adds its partner's registers 2, 3
// onto its own 0, 1 (they hold the same states), across bit 3 register 1 onto 0, across bit 2
// the last value: every lane ends with the warp's sum for state 4q + m. To read B and C in that
// order with one 16-byte load, shared memory holds four copies of each step's B (and C), copy m
// with element 4q + j = B[4q + (j ^ m)].
//
// Training: the forward pass saves the state at the start of every save_every-th chunk of four
// steps (float32, (batch, directions, saved, E, 16), register order). The backward pass walks
// the chunks last to first: from the saved state it recomputes the chunk forwards, keeping
// a_s = exp(delta_s A) and a_s h_{s-1} per step in registers and forming dC_s = sum_e g_s h_s
// (g = dy silu(z)) on the way, then runs the adjoint dh_s = C_s g_s + a_{s+1} dh_{s+1}
// backwards, forming dB_s = sum_e dh_s delta_s u_s and the per-channel gradients. Steps past
// the end of the sequence run with delta = u = g = 0, which leaves every state and sum alone.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace {

constexpr int NS = 16;       // states per channel, padded with zero states
constexpr int QUAD = 4;      // lanes per channel
constexpr int SL = NS / QUAD;  // states per lane
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
  int64_t per_b;  // backward: the batch stride of dA, dD, dbias (one buffer of partial sums)
  int batch, L, E, ND, N, save_every, n_saved;
  int blk0;  // backward: the first block of the launch (blocks are numbered batch-major)
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

// The approximate log2 and reciprocal, flushing denormals to zero like ex2 above: the intrinsics
// __expf, __logf and __fdividef keep denormals, at a few instructions each to rescale them.
__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sigmoid(float x) { return rcp(1.f + ex2(-x * LOG2E)); }

// torch's softplus (threshold 20); log1p(w) by Goldberg's trick on the fast log. Both sides of
// the selects are computed, so that no branch splits a segment's steps (see the kernels).
__device__ __forceinline__ float softplus(float x) {
  const float w = ex2(x * LOG2E), v = 1.f + w;
  const float goldberg = lg2(v) * LN2 * w * rcp(v - 1.f);
  return x > 20.f ? x : (v == 1.f ? w : goldberg);
}

// ---- which lane holds what ------------------------------------------------------------------------
struct Lane {
  int lane, warp, q, m, e;
  bool active;  // e < E
  template <int THREADS>
  __device__ static Lane of(int E, int block) {  // block: which block of THREADS / 4 channels
    const int tid = threadIdx.x, e = block * (THREADS / QUAD) + tid / QUAD;
    return Lane{tid & 31, tid >> 5, tid & 3, (tid >> 3) & 3, e, e < E};
  }
  __device__ int state(int j) const { return 4 * q + (j ^ m); }  // which state register j holds
  __device__ bool writes_sums() const { return !(lane & 4); }     // one of the two lanes with the sum of a state
};

// Step i of a chunk of QUAD steps, broadcast from its owner (lane i of the quad, which holds it in own).
__device__ __forceinline__ float from_owner(float own, int i) { return __shfl_sync(FULL, own, i, QUAD); }

// Sums over the quad of a chunk's four per-step values v[i]; lane q gets step q's.
__device__ __forceinline__ float quad_sum(const float (&v)[QUAD], int q) {
  const bool hi = q & 2, odd = q & 1;
  // across lane bit 1: keep steps 2, 3 (hi) or 0, 1, adding the partner's
  const float k0 = (hi ? v[2] : v[0]) + __shfl_xor_sync(FULL, hi ? v[0] : v[2], 2);
  const float k1 = (hi ? v[3] : v[1]) + __shfl_xor_sync(FULL, hi ? v[1] : v[3], 2);
  // across lane bit 0: keep step q
  return (odd ? k1 : k0) + __shfl_xor_sync(FULL, odd ? k0 : k1, 1);
}

// Sum over the warp's quads (channels) of state 4q + m (see the top of the file); v is clobbered.
__device__ __forceinline__ float channel_sum(float (&v)[SL]) {
  v[0] += __shfl_xor_sync(FULL, v[2], 16);
  v[1] += __shfl_xor_sync(FULL, v[3], 16);
  v[0] += __shfl_xor_sync(FULL, v[1], 8);
  return v[0] + __shfl_xor_sync(FULL, v[0], 4);
}

// ---- B and C of a segment, staged in shared memory -------------------------------------------------
// Layout per buffer: [step K][B, C][copy 4][16 floats]; copy c holds X[4 (n / 4) + (n % 4 ^ c)] at element n.
// Each of the first K * 32 threads of the block loads one value per segment: step i = idx / 32,
// B or C, state n, through a pointer that moves one segment along per call.
template <int K> __host__ __device__ constexpr int bc_floats() { return K * 2 * 4 * NS; }

__device__ __forceinline__ int time_of(const Params& p, int d, int s) { return d ? p.L - 1 - s : s; }

template <typename T, int K>
struct BCLoader {
  const T* at;    // this thread's value in the segment `seg`
  int64_t step;   // one segment along, in the direction of travel
  int seg, i;     // which segment comes next, which of its steps this thread loads
  bool on;        // a thread with a value to load (idx < K * 32, n < N)
  __device__ BCLoader(const Params& p, int b, int d, int seg0, int dir) : seg(seg0) {
    const int idx = threadIdx.x, kind = (idx >> 4) & 1, n = idx & 15;
    i = idx >> 5;
    on = idx < K * 32 && n < p.N;
    const int64_t sb = kind ? p.sC_b : p.sB_b, sl = kind ? p.sC_l : p.sB_l, sd = kind ? p.sC_d : p.sB_d,
                  sn = kind ? p.sC_n : p.sB_n;
    const int s = seg0 * K + i;
    at = (const T*)(kind ? p.C : p.B) + b * sb + d * sd + n * sn + (int64_t)time_of(p, d, s) * sl;
    step = (d ? -sl : sl) * K * dir;
  }
  // Loaded values stay in their own type until used: converting them right away would make the
  // thread wait for the load there (the compiler places the conversion next to the load).
  __device__ T fetch(const Params& p, int dir) {
    const T v = on && seg * K + i < p.L ? __ldg(at) : from_f<T>(0.f);
    at += step;
    seg += dir;
    return v;
  }
};

template <typename T, int K>
__device__ __forceinline__ void store_bc(float* buf, T r) {
  const int idx = threadIdx.x, i = idx >> 5, kind = (idx >> 4) & 1, n = idx & 15;
  if (idx < K * 32) {
    const float v = to_f(r);
#pragma unroll
    for (int c = 0; c < 4; ++c) buf[((i * 2 + kind) * 4 + c) * NS + (n & ~3) + ((n & 3) ^ c)] = v;
  }
}

// Step i's B (kind 0) or C (kind 1) for this lane's states, in register order.
__device__ __forceinline__ float4 read_bc(const float* buf, int i, int kind, const Lane& ln) {
  return *reinterpret_cast<const float4*>(buf + ((i * 2 + kind) * 4 + ln.m) * NS + 4 * ln.q);
}

__device__ __forceinline__ void unpack(float4 v, float (&x)[SL]) { x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w; }

// ---- per-channel pieces -----------------------------------------------------------------------------
// One per-channel (batch, L, ...) tensor as a direction walks it, at this lane's owned steps of
// one segment: step QUAD k + q of the segment is at at + k * own_step; `move` goes one segment
// along in the direction of travel (dir 1: forward pass, -1: backward pass).
template <typename T, int K>
struct Stream {
  T* at;
  int64_t own_step, seg_step;
  __device__ Stream(const void* base, int64_t offset, int64_t stride_l, const Params& p, int d, int seg0, int dir,
                    const Lane& ln) {
    const int64_t sl = d ? -stride_l : stride_l;
    at = (T*)base + offset + (d ? (int64_t)(p.L - 1) * stride_l : 0) + (int64_t)(seg0 * K + ln.q) * sl;
    own_step = QUAD * sl;
    seg_step = K * sl * dir;
  }
  __device__ T* ptr(int k) const { return at + k * own_step; }
  __device__ void move() { at += seg_step; }
};

// The owner's values of one per-channel input in segment seg >= 0 (steps 4k + q); zero past the
// end, for idle lanes and when not `on`; then the stream moves on.
template <typename T, int K>
__device__ __forceinline__ void load_owned(Stream<const T, K>& w, int seg, int L, const Lane& ln, bool on,
                                           T (&x)[K / QUAD]) {
#pragma unroll
  for (int k = 0; k < K / QUAD; ++k) {
    const int s = seg * K + QUAD * k + ln.q;
    x[k] = on && ln.active && s < L ? __ldg(w.ptr(k)) : from_f<T>(0.f);
  }
  w.move();
}

// Direction d's A times log2(e) in register order (exp(delta A) = exp2(delta A2)); zero past N.
__device__ __forceinline__ void direction_A2(const Params& p, int d, const Lane& ln, float (&A2)[SL]) {
#pragma unroll
  for (int j = 0; j < SL; ++j) {
    const int n = ln.state(j);
    A2[j] = ln.active && n < p.N ? p.A[((int64_t)d * p.E + ln.e) * p.N + n] * LOG2E : 0.f;
  }
}

// The saved state k of direction d: this lane's four registers. State k + 1 is saved_step further.
__device__ __forceinline__ float4* saved_state(const Params& p, int b, int d, int k, const Lane& ln) {
  return reinterpret_cast<float4*>(p.states + ((((int64_t)b * p.ND + d) * p.n_saved + k) * p.E + ln.e) * NS) + ln.q;
}
__device__ __forceinline__ int64_t saved_step(const Params& p) { return (int64_t)p.E * NS / 4; }

// ---- forward --------------------------------------------------------------------------------------------
// Direction d; grid (E / (THREADS / 4), batch). Direction 1 adds its gated output onto direction 0's.
template <typename T, int d, int K, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_fwd_kernel(Params p) {
  constexpr int OWN = K / QUAD;
  static_assert(K % QUAD == 0 && K * 32 <= THREADS, "a segment's B and C are one value per thread");
  __shared__ __align__(16) float bc[2][bc_floats<K>()];
  const Lane ln = Lane::of<THREADS>(p.E, blockIdx.x);
  const int b = blockIdx.y, n_seg = (p.L + K - 1) / K;
  float A2[SL];
  direction_A2(p, d, ln, A2);
  const float bias = p.bias && ln.active ? p.bias[d * p.E + ln.e] : 0.f;
  const float Dv = p.D && ln.active ? p.D[d * p.E + ln.e] : 0.f;
  // the owner's inputs, loaded one segment ahead; y written at the current one. Direction 0's y
  // (wyp) may go through the read-only cache: an earlier launch wrote it, and this kernel reads
  // each value once, before the same thread overwrites it.
  Stream<const T, K> wu(p.u, b * p.su_b + d * p.su_d + ln.e, p.su_l, p, d, 0, 1, ln);
  Stream<const T, K> wd(p.dl, b * p.sd_b + d * p.sd_d + ln.e, p.sd_l, p, d, 0, 1, ln);
  Stream<const T, K> wz(p.z, b * p.sz_b + ln.e, p.sz_l, p, d, 0, 1, ln);
  Stream<const T, K> wyp(p.y, b * p.sy_b + ln.e, p.sy_l, p, d, 0, 1, ln);
  Stream<T, K> wy(p.y, b * p.sy_b + ln.e, p.sy_l, p, d, 0, 1, ln);
  BCLoader<T, K> bcl(p, b, d, 0, 1);
  float h[SL] = {0.f, 0.f, 0.f, 0.f};
  T nu[OWN], nx[OWN], nz[OWN], ny[OWN];
  load_owned(wu, 0, p.L, ln, true, nu);
  load_owned(wd, 0, p.L, ln, true, nx);
  load_owned(wz, 0, p.L, ln, true, nz);
  load_owned(wyp, 0, p.L, ln, d > 0, ny);
  store_bc<T, K>(bc[0], bcl.fetch(p, 1));
  __syncthreads();
  int phase = 0;  // which chunk of QUAD steps: c % save_every
  float4* saved = p.save_states ? saved_state(p, b, d, 0, ln) : nullptr;  // state c / save_every
  for (int seg = 0; seg < n_seg; ++seg) {
    T uu[OWN], xx[OWN], zz[OWN], yp[OWN];
#pragma unroll
    for (int k = 0; k < OWN; ++k) { uu[k] = nu[k]; xx[k] = nx[k]; zz[k] = nz[k]; yp[k] = ny[k]; }
    T r = from_f<T>(0.f);
    if (seg + 1 < n_seg) {
      r = bcl.fetch(p, 1);
      load_owned(wu, seg + 1, p.L, ln, true, nu);
      load_owned(wd, seg + 1, p.L, ln, true, nx);
      load_owned(wz, seg + 1, p.L, ln, true, nz);
      load_owned(wyp, seg + 1, p.L, ln, d > 0, ny);
    }
    float dt_o[OWN], du_o[OWN];  // the owner's steps: delta (through softplus), delta u
#pragma unroll
    for (int k = 0; k < OWN; ++k) {
      const bool ok = seg * K + QUAD * k + ln.q < p.L;
      dt_o[k] = softplus(to_f(xx[k]) + bias) * (ok ? 1.f : 0.f);
      du_o[k] = dt_o[k] * to_f(uu[k]);
    }
    const float* cur = bc[seg & 1];
#pragma unroll
    for (int g = 0; g < OWN; ++g) {  // a chunk of QUAD steps: the backward pass's segment
      if (p.save_states && phase == 0 && ln.active && seg * K + QUAD * g < p.L)
        *saved = make_float4(h[0], h[1], h[2], h[3]);
      if (++phase == p.save_every) {
        phase = 0;
        if (p.save_states) saved += saved_step(p);
      }
      float acc[QUAD];  // this lane's part of each step's sum over states, C h
#pragma unroll
      for (int i4 = 0; i4 < QUAD; ++i4) {
        const int i = QUAD * g + i4;
        const float dt = from_owner(dt_o[g], i4), du = from_owner(du_o[g], i4);
        float Bv[SL], Cv[SL];
        unpack(read_bc(cur, i, 0, ln), Bv);
        unpack(read_bc(cur, i, 1, ln), Cv);
#pragma unroll
        for (int j = 0; j < SL; ++j) h[j] = fmaf(ex2(dt * A2[j]), h[j], du * Bv[j]);
        acc[i4] = fmaf(Cv[0], h[0], Cv[1] * h[1]) + fmaf(Cv[2], h[2], Cv[3] * h[3]);
      }
      const int s = seg * K + QUAD * g + ln.q;
      const float u = to_f(uu[g]), z = to_f(zz[g]);
      const float out = (quad_sum(acc, ln.q) + Dv * u) * z * sigmoid(z) + to_f(yp[g]);
      if (s < p.L && ln.active) *wy.ptr(g) = from_f<T>(out);
    }
    wy.move();
    if (seg + 1 < n_seg) store_bc<T, K>(bc[(seg + 1) & 1], r);
    __syncthreads();
  }
}

// ---- backward ---------------------------------------------------------------------------------------------
// The state after chunk c from the state before it (the chunks between a saved state and the
// one being differentiated, when save_every > 1); every lane computes each step's delta itself
// and reads its inputs and B straight from global memory.
template <typename T>
__device__ void advance(const Params& p, int b, int d, int c, const Lane& ln, float bias, const float (&A2)[SL],
                        float (&h)[SL]) {
  for (int i = 0; i < QUAD; ++i) {
    const int64_t t = time_of(p, d, c * QUAD + i);
    const float dt = ln.active ? softplus(to_f(__ldg((const T*)p.dl + b * p.sd_b + t * p.sd_l + d * p.sd_d + ln.e)) + bias) : 0.f;
    const float du = ln.active ? dt * to_f(__ldg((const T*)p.u + b * p.su_b + t * p.su_l + d * p.su_d + ln.e)) : 0.f;
#pragma unroll
    for (int j = 0; j < SL; ++j) {
      const int n = ln.state(j);
      const float Bn = n < p.N ? to_f(__ldg((const T*)p.B + b * p.sB_b + t * p.sB_l + d * p.sB_d + n * p.sB_n)) : 0.f;
      h[j] = fmaf(ex2(dt * A2[j]), h[j], du * Bn);
    }
  }
}

__device__ __forceinline__ float4 load_state(const Params& p, int b, int d, int k, const Lane& ln) {
  return ln.active && k >= 0 ? *saved_state(p, b, d, k, ln) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// Direction d, walking time backwards in segments of one chunk (QUAD steps, one owned by each
// lane of a quad); grid (E / (THREADS / 4), batch). Direction 1 adds its dz onto direction 0's.
template <typename T, int d, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_bwd_kernel(Params p) {
  constexpr int K = QUAD, WARPS = THREADS / 32;
  static_assert(K * 32 <= THREADS, "a segment's B and C are one value per thread");
  __shared__ __align__(16) float bc[2][bc_floats<K>()];
  __shared__ float red[2][K * 2 * WARPS * NS];  // [step][B, C][warp][state]: per-warp channel sums
  // a 1-D grid, possibly split in two launches (launch_bwd_direction): block (channels cb, batch b)
  const int n_cb = (p.E + THREADS / QUAD - 1) / (THREADS / QUAD), blk = p.blk0 + (int)blockIdx.x;
  const int cb = blk % n_cb, b = blk / n_cb;
  const Lane ln = Lane::of<THREADS>(p.E, cb);
  const int tid = threadIdx.x, last = (p.L + K - 1) / K - 1;
  float A2[SL];
  direction_A2(p, d, ln, A2);
  const float bias = p.bias && ln.active ? p.bias[d * p.E + ln.e] : 0.f;
  const float Dv = p.D && ln.active ? p.D[d * p.E + ln.e] : 0.f;
  // the owner's inputs, loaded one segment ahead (walking backwards); outputs at the current one
  Stream<const T, K> wu(p.u, b * p.su_b + d * p.su_d + ln.e, p.su_l, p, d, last, -1, ln);
  Stream<const T, K> wd(p.dl, b * p.sd_b + d * p.sd_d + ln.e, p.sd_l, p, d, last, -1, ln);
  Stream<const T, K> wz(p.z, b * p.sz_b + ln.e, p.sz_l, p, d, last, -1, ln);
  Stream<const T, K> wg(p.dy, b * p.sy_b + ln.e, p.sy_l, p, d, last, -1, ln);
  // dz, du, ddelta: contiguous; direction 0's dz (wdzp) is read as its y is forward
  Stream<const T, K> wdzp(p.dz, (int64_t)b * p.L * p.E + ln.e, p.E, p, d, last, -1, ln);
  Stream<T, K> wdz(p.dz, (int64_t)b * p.L * p.E + ln.e, p.E, p, d, last, -1, ln);
  Stream<T, K> wdu(p.du, ((int64_t)b * p.L * p.ND + d) * p.E + ln.e, p.ND * p.E, p, d, last, -1, ln);
  Stream<T, K> wddl(p.ddl, ((int64_t)b * p.L * p.ND + d) * p.E + ln.e, p.ND * p.E, p, d, last, -1, ln);
  BCLoader<T, K> bcl(p, b, d, last, -1);
  float dh[SL], dA[SL], a_after[SL];  // a_after: a of the step after the segment
#pragma unroll
  for (int j = 0; j < SL; ++j) dh[j] = dA[j] = a_after[j] = 0.f;
  float dD = 0.f, dbias = 0.f;  // over the owner's steps
  T nu[1], nx[1], nz[1], ng[1], nq[1];
  load_owned(wu, last, p.L, ln, true, nu);
  load_owned(wd, last, p.L, ln, true, nx);
  load_owned(wz, last, p.L, ln, true, nz);
  load_owned(wg, last, p.L, ln, true, ng);
  load_owned(wdzp, last, p.L, ln, d > 0, nq);
  int phase = last % p.save_every, saved = last / p.save_every;  // seg % save_every, seg / save_every
  float4 nh = load_state(p, b, d, saved, ln);
  store_bc<T, K>(bc[last & 1], bcl.fetch(p, -1));
  __syncthreads();
  for (int seg = last; seg >= 0; --seg) {
    const T uu = nu[0], xx = nx[0], zz = nz[0], gy = ng[0], dzp = nq[0];
    float h[SL];
    unpack(nh, h);
    const int first = seg - phase;  // the segment whose start state was saved
    if (phase == 0) { phase = p.save_every; --saved; }
    --phase;
    T r = from_f<T>(0.f);
    if (seg > 0) {
      r = bcl.fetch(p, -1);
      load_owned(wu, seg - 1, p.L, ln, true, nu);
      load_owned(wd, seg - 1, p.L, ln, true, nx);
      load_owned(wz, seg - 1, p.L, ln, true, nz);
      load_owned(wg, seg - 1, p.L, ln, true, ng);
      load_owned(wdzp, seg - 1, p.L, ln, d > 0, nq);
      nh = load_state(p, b, d, saved, ln);
    }
    for (int c = first; c < seg; ++c) advance<T>(p, b, d, c, ln, bias, A2, h);
    const float* cur = bc[seg & 1];
    float* rs = red[seg & 1];
    // The owner's step: delta, delta u, g = dy silu(z), d delta / d(delta + bias), sigmoid(z).
    const int s = seg * K + ln.q;
    const float x = to_f(xx) + bias, z = to_f(zz), u = to_f(uu), dy = to_f(gy);
    const float dt_o = softplus(x) * (s < p.L ? 1.f : 0.f), du_o = dt_o * u;
    const float sp = x > 20.f ? 1.f : sigmoid(x), sig = sigmoid(z), g_o = dy * z * sig;
    // Forward through the segment: keep a_s and a_s h_{s-1}, form dC_s and this lane's part of C_s h_s.
    float dts[K], dus[K], gs[K], a[K][SL], ah[K][SL], acc[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      dts[i] = from_owner(dt_o, i); dus[i] = from_owner(du_o, i); gs[i] = from_owner(g_o, i);
      float Bv[SL], Cv[SL], v[SL];
      unpack(read_bc(cur, i, 0, ln), Bv);
      unpack(read_bc(cur, i, 1, ln), Cv);
#pragma unroll
      for (int j = 0; j < SL; ++j) {
        a[i][j] = ex2(dts[i] * A2[j]);
        ah[i][j] = a[i][j] * h[j];
        h[j] = fmaf(dus[i], Bv[j], ah[i][j]);
        v[j] = h[j] * gs[i];
      }
      acc[i] = fmaf(Cv[0], h[0], Cv[1] * h[1]) + fmaf(Cv[2], h[2], Cv[3] * h[3]);
      const float dC = channel_sum(v);
      if (ln.writes_sums()) rs[((i * 2 + 1) * WARPS + ln.warp) * NS + 4 * ln.q + ln.m] = dC;
    }
    const float yssm = quad_sum(acc, ln.q) + Dv * u;
    if (s < p.L && ln.active)
      *wdz.ptr(0) = from_f<T>(dy * yssm * sig * (1.f + z * (1.f - sig)) + to_f(dzp));
    wdz.move();
    // Backward through the segment: dh_s = C_s g_s + a_{s+1} dh_{s+1}; dB_s, dA, and this
    // lane's parts of the sums over states for ddelta_s and du_s.
    float sw[K], dhB[K];
#pragma unroll
    for (int i = K - 1; i >= 0; --i) {
      float Bv[SL], Cv[SL], v[SL];
      unpack(read_bc(cur, i, 0, ln), Bv);
      unpack(read_bc(cur, i, 1, ln), Cv);
      sw[i] = dhB[i] = 0.f;
#pragma unroll
      for (int j = 0; j < SL; ++j) {
        dh[j] = fmaf(i == K - 1 ? a_after[j] : a[i + 1][j], dh[j], Cv[j] * gs[i]);
        const float w = dh[j] * ah[i][j];  // gradient w.r.t. a_s, times a_s
        dA[j] = fmaf(w, dts[i], dA[j]);
        sw[i] = fmaf(w, A2[j], sw[i]);
        dhB[i] = fmaf(dh[j], Bv[j], dhB[i]);
        v[j] = dh[j] * dus[i];
      }
      const float dB = channel_sum(v);
      if (ln.writes_sums()) rs[((i * 2) * WARPS + ln.warp) * NS + 4 * ln.q + ln.m] = dB;
    }
#pragma unroll
    for (int j = 0; j < SL; ++j) a_after[j] = a[0][j];
    const float dhBs = quad_sum(dhB, ln.q);
    const float ddt = (LN2 * quad_sum(sw, ln.q) + dhBs * u) * sp;  // d a_s / d delta_s = A a_s
    dbias += ddt;
    dD = fmaf(g_o, u, dD);
    if (s < p.L && ln.active) {
      *wdu.ptr(0) = from_f<T>(dhBs * dt_o + Dv * g_o);
      *wddl.ptr(0) = from_f<T>(ddt);
    }
    wdu.move();
    wddl.move();
    if (seg > 0) store_bc<T, K>(bc[(seg - 1) & 1], r);
    __syncthreads();
    // The block's sums over its warps, one partial per block: (E blocks, batch, L, ND, B/C, N).
    if (tid < K * 32) {
      const int i = tid >> 5, kind = (tid >> 4) & 1, n = tid & 15, st = seg * K + i;
      if (st < p.L && n < p.N) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += rs[((i * 2 + kind) * WARPS + w) * NS + n];
        const int64_t t = time_of(p, d, st);
        p.dBC[((((int64_t)cb * p.batch + b) * p.L + t) * p.ND + d) * 2 * p.N + kind * p.N + n] = sum;
      }
    }
  }
  if (ln.active) {
#pragma unroll
    for (int j = 0; j < SL; ++j) {
      const int n = ln.state(j);
      if (n < p.N) p.dA[b * p.per_b + ((int64_t)d * p.E + ln.e) * p.N + n] = dA[j];
    }
  }
  // the channel's sums over its owners
  dD += __shfl_xor_sync(FULL, dD, 1);
  dD += __shfl_xor_sync(FULL, dD, 2);
  dbias += __shfl_xor_sync(FULL, dbias, 1);
  dbias += __shfl_xor_sync(FULL, dbias, 2);
  if (ln.active && ln.q == 0) {
    p.dD[b * p.per_b + d * p.E + ln.e] = dD;
    p.dbias[b * p.per_b + d * p.E + ln.e] = dbias;
  }
}

// ---- the backward pass's sums ------------------------------------------------------------------------
// One launch finishes what the backward kernels leave as partial sums, each in a fixed order (no
// atomics, so results do not change between runs): dB and dC over the blocks of channels,
// (blocks, batch, L, ND, 2, N) -> (batch, L, ND, N) in B's type; dA, dD and dbias over the batch.
template <typename T>
__global__ void finish_bwd_kernel(const float* __restrict__ dBC, int n_blocks, int64_t rows, int N, T* dB, T* dC,
                                  const float* __restrict__ per_channel, float* dA, int64_t n_A, float* dD,
                                  float* dbias, int64_t n_D, int batch) {
  const int64_t n_BC = rows * 2 * N, i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n_BC) {  // dBC element (row, kind, n), row = (b, t, d)
    float sum = 0.f;
    for (int k = 0; k < n_blocks; ++k) sum += __ldg(dBC + k * n_BC + i);
    const int64_t row = i / (2 * N);
    const int kind = (int)(i / N) & 1, n = (int)(i % N);
    (kind ? dC : dB)[row * N + n] = from_f<T>(sum);
    return;
  }
  // per-channel gradients: dA (batch, ND, E, N), then dD and dbias (batch, ND, E), one buffer
  const int64_t j = i - n_BC, per_b = n_A + 2 * n_D;
  if (j >= per_b) return;
  float sum = 0.f;
  for (int b = 0; b < batch; ++b) sum += __ldg(per_channel + b * per_b + j);
  if (j < n_A) dA[j] = sum;
  else if (j < n_A + n_D) dD[j - n_A] = sum;
  else dbias[j - n_A - n_D] = sum;
}

// ---- host side --------------------------------------------------------------------------------------------
// One configuration, tuned on the H100 at DiS's shapes (BENCHMARKS.md): the forward pass in
// segments of 8 steps, 64 channels (256 threads) per block, capped at 64 registers; the backward
// pass in segments of 4 steps (QUAD), BWD_THREADS / 4 channels per block, capped at 128 registers.
constexpr int FWD_SEGMENT = 8, FWD_THREADS = 256, FWD_MIN_BLOCKS = 4;
constexpr int BWD_THREADS = 256, BWD_MIN_BLOCKS = 2;
constexpr int BWD_CHANNELS = BWD_THREADS / QUAD;  // per block: the partial sums of dB and dC

// Tests set this so that every buffer the extension allocates starts as NaN, and an element the
// kernels fail to write shows in the results.
bool poison_outputs = false;

torch::Tensor new_buffer(c10::IntArrayRef sizes, const torch::TensorOptions& options) {
  auto t = torch::empty(sizes, options);
  if (poison_outputs) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

torch::Tensor unit_stride(const torch::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

torch::Tensor param(const torch::Tensor& x) {  // skips torch's dispatcher when x is already as read
  return x.scalar_type() == torch::kFloat && x.is_contiguous() ? x : x.to(torch::kFloat).contiguous();
}

c10::optional<torch::Tensor> param(const c10::optional<torch::Tensor>& x) {
  if (!x) return c10::nullopt;
  return param(*x);
}

// The inputs as the kernels read them (kept alive by the caller until the launches are queued):
// u, delta, z, dy with unit stride along E, A, D and bias as contiguous float32.
struct Inputs {
  torch::Tensor u, delta, A, B, C, z;
  c10::optional<torch::Tensor> D, bias;
  Inputs(const torch::Tensor& u_, const torch::Tensor& delta_, const torch::Tensor& A_, const torch::Tensor& B_,
         const torch::Tensor& C_, const c10::optional<torch::Tensor>& D_, const torch::Tensor& z_,
         const c10::optional<torch::Tensor>& bias_)
      : u(unit_stride(u_)), delta(unit_stride(delta_)), A(param(A_)), B(B_), C(C_),
        z(unit_stride(z_)), D(param(D_)), bias(param(bias_)) {}
};

Params common_params(const Inputs& in, int64_t save_every) {
  const torch::Tensor &u = in.u, &delta = in.delta, &A = in.A, &B = in.B, &C = in.C, &z = in.z;
  const auto t = u.scalar_type();
  TORCH_CHECK(delta.scalar_type() == t && B.scalar_type() == t && C.scalar_type() == t && z.scalar_type() == t,
              "scan_cuda: u, delta, B, C and z must have one dtype (scan_cuda.supports says which calls fit)");
  Params p{};
  p.u = u.data_ptr(); p.dl = delta.data_ptr(); p.B = B.data_ptr(); p.C = C.data_ptr();
  p.z = z.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = in.D ? in.D->data_ptr<float>() : nullptr;
  p.bias = in.bias ? in.bias->data_ptr<float>() : nullptr;
  p.su_b = u.stride(0); p.su_l = u.stride(1); p.su_d = u.stride(2);
  p.sd_b = delta.stride(0); p.sd_l = delta.stride(1); p.sd_d = delta.stride(2);
  p.sB_b = B.stride(0); p.sB_l = B.stride(1); p.sB_d = B.stride(2); p.sB_n = B.stride(3);
  p.sC_b = C.stride(0); p.sC_l = C.stride(1); p.sC_d = C.stride(2); p.sC_n = C.stride(3);
  p.sz_b = z.stride(0); p.sz_l = z.stride(1);
  p.batch = u.size(0); p.L = u.size(1); p.ND = u.size(2); p.E = u.size(3); p.N = A.size(2);
  p.save_every = save_every;
  p.n_saved = ((p.L + QUAD - 1) / QUAD + save_every - 1) / save_every;  // a state per chunk of QUAD steps
  return p;
}

template <typename T>
void launch_fwd(const Params& p) {
  constexpr int channels = FWD_THREADS / QUAD;
  const dim3 grid((p.E + channels - 1) / channels, p.batch);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  scan_fwd_kernel<T, 0, FWD_SEGMENT, FWD_THREADS, FWD_MIN_BLOCKS><<<grid, FWD_THREADS, 0, stream>>>(p);
  if (p.ND > 1) scan_fwd_kernel<T, 1, FWD_SEGMENT, FWD_THREADS, FWD_MIN_BLOCKS><<<grid, FWD_THREADS, 0, stream>>>(p);
}

// The outputs of the backward pass's sums (finish_bwd_kernel).
struct Sums {
  torch::Tensor dB, dC, dA, dD, dbias;
};

// The backward pass's last, partial wave of blocks runs latency-bound: a block alone on an SM
// still takes about 0.6 of a full wave's time (BENCHMARKS.md, session 16). When those blocks are
// at most one per SM, they run as a second launch of the kernel compiled for one block per SM,
// without the register cap (no spills, about 14% fewer instructions per segment).
template <typename T, int d>
void launch_bwd_direction(const Params& p, int n_blocks, cudaStream_t stream) {
  auto capped = scan_bwd_kernel<T, d, BWD_THREADS, BWD_MIN_BLOCKS>;
  // blocks of the capped kernel in one wave on this device, and its SMs: asked once per device
  // and kernel (these statics are per instantiation), not at every call
  static std::mutex mutex;
  static std::map<int, std::pair<int, int>> waves;
  int wave, sms;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const int device = c10::cuda::current_device();
    auto known = waves.find(device);
    if (known == waves.end()) {
      int per_sm = 0, n_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, capped, BWD_THREADS, 0));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device));
      known = waves.emplace(device, std::make_pair(per_sm * n_sm, n_sm)).first;
    }
    std::tie(wave, sms) = known->second;
  }
  const int total = n_blocks * p.batch, tail = wave > 0 ? total % wave : 0;
  Params q = p;
  q.blk0 = 0;
  if (total > wave && tail > 0 && tail <= sms) {
    capped<<<total - tail, BWD_THREADS, 0, stream>>>(q);
    q.blk0 = total - tail;
    scan_bwd_kernel<T, d, BWD_THREADS, 1><<<tail, BWD_THREADS, 0, stream>>>(q);
  } else {
    capped<<<total, BWD_THREADS, 0, stream>>>(q);
  }
}

template <typename T>
void launch_bwd(const Params& p, const Sums& out) {
  const int n_blocks = (p.E + BWD_CHANNELS - 1) / BWD_CHANNELS;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  launch_bwd_direction<T, 0>(p, n_blocks, stream);
  if (p.ND > 1) launch_bwd_direction<T, 1>(p, n_blocks, stream);
  const int64_t rows = (int64_t)p.batch * p.L * p.ND, n_A = (int64_t)p.ND * p.E * p.N, n_D = (int64_t)p.ND * p.E;
  const int64_t total = rows * 2 * p.N + p.per_b, threads = 256;
  finish_bwd_kernel<T><<<(total + threads - 1) / threads, threads, 0, stream>>>(
      p.dBC, n_blocks, rows, p.N, (T*)out.dB.data_ptr(), (T*)out.dC.data_ptr(), p.dA, out.dA.data_ptr<float>(), n_A,
      out.dD.data_ptr<float>(), out.dbias.data_ptr<float>(), n_D, p.batch);
}

template <typename F>
void by_dtype(const torch::Tensor& u, F&& f) {
  switch (u.scalar_type()) {
    case torch::kFloat: f(float{}); break;
    case torch::kBFloat16: f(__nv_bfloat16{}); break;
    case torch::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, "scan_cuda: unsupported dtype ", u.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The kernels compute DiS's mixer: delta = softplus(delta + bias), output gated by silu(z).
// Returns y (batch, L, E) in u's dtype and the states (batch, ND, saved, E, 16) float32 the
// backward pass starts from (saved = 0 without save_states).
std::vector<torch::Tensor> scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                    torch::Tensor C, c10::optional<torch::Tensor> D, torch::Tensor z,
                                    c10::optional<torch::Tensor> bias, bool save_states, int64_t save_every) {
  const c10::cuda::CUDAGuard guard(u.device());
  const Inputs in(u, delta, A, B, C, D, z, bias);
  Params p = common_params(in, save_every);
  auto y = new_buffer({p.batch, p.L, p.E}, u.options());
  auto states = new_buffer({p.batch, p.ND, save_states ? p.n_saved : 0, p.E, NS}, u.options().dtype(torch::kFloat));
  p.y = y.data_ptr(); p.sy_b = y.stride(0); p.sy_l = y.stride(1);
  p.save_states = save_states;
  p.states = save_states ? states.data_ptr<float>() : nullptr;
  by_dtype(u, [&](auto t) { launch_fwd<decltype(t)>(p); });
  return {y, states};
}

// Returns du, ddelta (batch, L, ND, E), dA (ND, E, N) in A's dtype, dB, dC (batch, L, ND, N), dD,
// dbias (ND, E) float32, dz (batch, L, E): all contiguous.
std::vector<torch::Tensor> scan_bwd(torch::Tensor dy, torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                    torch::Tensor B, torch::Tensor C, c10::optional<torch::Tensor> D,
                                    torch::Tensor z, c10::optional<torch::Tensor> bias, torch::Tensor states,
                                    int64_t save_every) {
  const c10::cuda::CUDAGuard guard(u.device());
  const Inputs in(u, delta, A, B, C, D, z, bias);
  const torch::Tensor dy_ = unit_stride(dy);
  Params p = common_params(in, save_every);
  const auto f32 = u.options().dtype(torch::kFloat);
  auto du = new_buffer(u.sizes(), u.options()), ddelta = new_buffer(delta.sizes(), delta.options());
  auto dz = new_buffer(z.sizes(), z.options());
  // partial sums: dB and dC per block of channels, the per-channel parameters' per batch element
  const int n_blocks = (p.E + BWD_CHANNELS - 1) / BWD_CHANNELS;
  auto dBC = new_buffer({n_blocks, p.batch, p.L, p.ND, 2, p.N}, f32);
  p.per_b = (int64_t)p.ND * p.E * (p.N + 2);
  auto per_channel = new_buffer({p.batch, p.per_b}, f32);
  const Sums out{new_buffer({p.batch, p.L, p.ND, p.N}, B.options()), new_buffer({p.batch, p.L, p.ND, p.N}, C.options()),
                 new_buffer({p.ND, p.E, p.N}, f32), new_buffer({p.ND, p.E}, f32), new_buffer({p.ND, p.E}, f32)};
  p.dy = dy_.data_ptr(); p.sy_b = dy_.stride(0); p.sy_l = dy_.stride(1);
  p.states = states.data_ptr<float>();
  p.du = du.data_ptr(); p.ddl = ddelta.data_ptr(); p.dz = dz.data_ptr();
  p.dBC = dBC.data_ptr<float>();
  p.dA = per_channel.data_ptr<float>();
  p.dD = p.dA + (int64_t)p.ND * p.E * p.N;
  p.dbias = p.dD + (int64_t)p.ND * p.E;
  by_dtype(u, [&](auto t) { launch_bwd<decltype(t)>(p, out); });
  return {du, ddelta, out.dA.to(A.scalar_type()), out.dB, out.dC, out.dD, dz, out.dbias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("chunk") = QUAD;  // the steps between saved states
  m.def("scan_fwd", &scan_fwd, "DiS selective scan, forward (both directions)");
  m.def("scan_bwd", &scan_bwd, "DiS selective scan, backward (both directions)");
  m.def("poison_outputs", [](bool on) { poison_outputs = on; }, "fill every buffer allocated here with NaN (tests)");
}
