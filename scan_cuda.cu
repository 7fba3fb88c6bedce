// The selective scan of DiS's bidirectional Mamba mixer as CUDA kernels, forward and backward,
// in token-major layout (batch, L, directions, E), direction 1 walking the same memory
// backwards; the gate z and the output y are shared by the directions. The readable definition
// is scan.py's selective_scan_ref, which the tests compare against.
//
// Device code only, with no #include: scan_cuda.py compiles this file at run time with NVRTC
// (one program per dtype of the inputs and of the saved states, the kernels instantiated through
// name expressions), allocates the outputs and launches the kernels.
//
// Each thread (a lane) holds one channel e of one batch element, its 16 states in registers, and
// computes its own steps' delta (through softplus), delta u and gated dy; the sums over states (y
// forward; the gradients of u and delta backward) stay in the lane. A block of THREADS channels
// walks time in chunks of 4 steps (the forward pass in segments of K steps, whole chunks); each
// chunk's B and C are staged in shared memory as float32. The forward and backward kernels
// compute one direction, d a template parameter: the host launches direction 0, then direction 1,
// which adds its output (y forward, dz backward) onto the first's. The states-only forward pass,
// with no output the directions share, runs both in one launch.
//
// The gradients of B and C are sums over channels: per step, a reduce-scatter over the warp's 32
// lanes, then a sum over the block's warps in shared memory, then over the blocks in a last
// kernel, each in a fixed order (no atomics). Lane e % 32 keeps state r ^ perm(e) in its register
// r (perm(e) = (e >> 1) & 15), so that the reduce-scatter needs no selects (group_sum), and reads
// B and C in that order from one of four copies of each step's values (read_group).
//
// Training: the forward pass saves the state at the start of every save_every-th chunk
// ((batch, directions, saved, E, 16) in register order, float32 or the inputs' 16-bit type), or,
// run again without y just before the backward pass, every chunk's (scan_cuda.py's save_every = 0:
// no state is held between the passes). The backward pass walks the chunks last to first: from the
// saved state it takes the chunk four states at a time: it recomputes them forwards, keeping
// a_s = exp(delta_s A) and a_s h_{s-1} per step in registers and forming the terms of
// dC_s = sum_e g_s h_s (g = dy silu(z)) on the way, then runs the adjoint backwards,
// dh_s = C_s g_s + q_s with q_{s-1} = a_s dh_s, forming the terms of dB_s = sum_e dh_s delta_s u_s
// and the per-channel gradients. Steps past the end of the sequence run with delta = u = g = 0,
// which leaves every state and sum alone.
namespace dis {

typedef long long i64;

constexpr int NS = 16;       // states per channel, padded with zero states
constexpr int CHUNK = 4;     // steps between the states the forward pass saves
constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;

// The arguments of the scan kernels, passed by value; scan_cuda.py's Params mirrors this layout
// (and appends static_asserts on it to this source when it compiles it).
struct Params {
  const void *u, *dl, *B, *C, *z, *dy;
  const float *A, *D, *bias;
  void *y, *du, *ddl, *dz;
  void* states;  // float32, or u's 16-bit type (the template parameter S of the kernels)
  float *dBC, *dA, *dD, *dbias;
  i64 su_b, su_l, su_d, sd_b, sd_l, sd_d;
  i64 sB_b, sB_l, sB_d, sB_n, sC_b, sC_l, sC_d, sC_n;
  i64 sz_b, sz_l, sy_b, sy_l;  // z; y (forward) or dy (backward)
  i64 per_b;  // backward: the batch stride of dA, dD, dbias (one buffer of partial sums)
  int batch, L, E, ND, N, save_every, n_saved;
  bool save_states;
};

// ---- 16-bit storage types ----------------------------------------------------------------------------
// bfloat16 and float16 as bits: all arithmetic is in float32, these types are only loaded, stored
// and converted (with no header, so that NVRTC compiles this file as it is).
struct bf16 {
  unsigned short bits;
};
struct f16 {
  unsigned short bits;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __uint_as_float((unsigned)x.bits << 16); }
__device__ __forceinline__ float to_f(f16 x) {
  float y;
  asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(x.bits));
  return y;
}

// float32 -> bfloat16 rounded to nearest, ties to even, by integer arithmetic: adding 0x7fff
// plus the lowest kept bit carries into the kept bits exactly when the dropped half is above one
// half, or one half with an odd kept part. Infinities stay infinite; a NaN is kept a NaN (its
// top mantissa bit set), which the carry could turn into an infinity.
__device__ __forceinline__ unsigned short bf16_rne(float x) {
  const unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The same rounding in one instruction where the GPU has it (sm_80 and later).
__device__ __forceinline__ unsigned short bf16_bits(float x) {
#if __CUDA_ARCH__ >= 800
  unsigned short y;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(y) : "f"(x));
  return y;
#else
  return bf16_rne(x);
#endif
}

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return bf16{bf16_bits(x)}; }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) {
  f16 y;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(y.bits) : "f"(x));
  return y;
}

// A load through the read-only data cache.
__device__ __forceinline__ float ldg(const float* p) { return __ldg(p); }
template <typename T> __device__ __forceinline__ T ldg(const T* p) {
  return T{__ldg(reinterpret_cast<const unsigned short*>(p))};
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The approximate reciprocal, flushing denormals to zero like ex2 above: the intrinsics __expf and
// __fdividef keep denormals, at a few instructions each to rescale them.
__device__ __forceinline__ float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sigmoid(float x) { return rcp(1.f + ex2(-x * LOG2E)); }

// torch's softplus, log(1 + e^x) (x itself above the threshold 20, which this formula rounds to),
// as max(x, 0) + log1p(w) with w = e^-|x| in (0, 1], and log1p(w) = w Q(w) with Q a polynomial
// fitted to log1p(w) / w on [0, 1] (relative error 1.3e-7 at most): one exponential, where
// a logarithm and a reciprocal would take two more turns of the special-function unit, whose
// rate bounds the scan (BENCHMARKS.md). slope: its derivative sigmoid(x), 1 / (1 + w) for x >= 0
// and w / (1 + w) below.
__device__ __forceinline__ float log1p_unit(float w) {
  constexpr float Q[] = {0.9999998807907104f, -0.4999889135360718f, 0.333092600107193f, -0.2477501779794693f,
                         0.18863964080810547f, -0.1318223625421524f, 0.07283879071474075f,
                         -0.026326842606067657f, 0.004464552737772465f};  // Q(w) = sum Q[k] w^k
  float q = Q[8];
#pragma unroll
  for (int k = 7; k >= 0; --k) q = fmaf(q, w, Q[k]);
  return w * q;
}
__device__ __forceinline__ float softplus(float x, float& slope) {
  const float w = ex2(-fabsf(x) * LOG2E), r = rcp(1.f + w);
  slope = x >= 0.f ? r : w * r;
  return fmaxf(x, 0.f) + log1p_unit(w);
}
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1p_unit(ex2(-fabsf(x) * LOG2E)); }

// ---- which lane holds what ------------------------------------------------------------------------
// Lane e % 32 of a warp holds channel e with its 16 states in registers, register r holding
// state r ^ perm(e): a reduce-scatter over the warp's channels then needs no selects (see
// group_sum), and B and C are read in that order from one of 4 copies in shared memory.
__device__ __forceinline__ int perm_of(int e) { return (e >> 1) & 15; }

// The sum over the warp's 32 channels of state perm(e) (in both lanes of a pair), in two parts
// for code that holds one group of four registers (4 j .. 4 j + 3) at a time. A lane's partner
// across lane bit k + 1 has perm bit k flipped, so its register r ^ (1 << k) holds the state of
// this lane's register r: each step adds a partner's register to one of its own, with no
// selects. group_sum sums a group across lane bits 2 and 1 (register bits 1 and 0) into one
// value, and, for the groups in the order 0, 2, 1, 3 (jj = 0..3), pairs groups j and j + 2 across
// lane bit 4 into p[0] (groups 0 and 2) and p[1] (1 and 3); groups_sum ends with lane bit 3 (p[0]
// and p[1]) and lane bit 0, which does not change perm: it adds the pair's two halves. v is
// clobbered.
__device__ __forceinline__ void group_sum(float (&v)[4], float (&p)[2], int jj) {
  v[0] += __shfl_xor_sync(FULL, v[2], 4);
  v[1] += __shfl_xor_sync(FULL, v[3], 4);
  v[0] += __shfl_xor_sync(FULL, v[1], 2);
  if (jj == 0 || jj == 2) p[jj >> 1] = v[0];
  else p[jj >> 1] += __shfl_xor_sync(FULL, v[0], 16);
}
__device__ __forceinline__ float groups_sum(float (&p)[2]) {
  p[0] += __shfl_xor_sync(FULL, p[1], 8);
  return p[0] + __shfl_xor_sync(FULL, p[0], 1);
}

// ---- B and C of a chunk, staged in shared memory ------------------------------------------------
// Layout per buffer: [step K][B, C][copy 4][COPY floats]; copy c holds X[4 (n / 4) + (n % 4 ^ c)]
// at element n. Register r = 4 g + j of the lane with perm = 4 hi + m holds state
// 4 (g ^ hi) + (j ^ m), which is element 4 (g ^ hi) + j of copy m: one 16-byte read per four
// registers. A copy takes 20 floats rather than 16 so that the eight lanes of an access phase,
// which read four different copies, fall in different banks. A chunk's K * 32 values are loaded
// by the block's threads, value idx: step i = idx / 32, B or C, state n, through a pointer that
// moves one chunk along per call.
constexpr int COPY = 20;
template <int K> __host__ __device__ constexpr int bc_floats() { return K * 2 * 4 * COPY; }

__device__ __forceinline__ int time_of(const Params& p, int d, int s) { return d ? p.L - 1 - s : s; }

template <typename T, int K>
struct BCLoader {
  const T* at;    // this thread's value in the chunk `seg`
  i64 step;       // one chunk along, in the direction of travel
  int seg, i;     // which chunk comes next, which of its steps this thread loads
  bool on;        // a thread with a value to load (n < N)
  BCLoader() = default;
  __device__ BCLoader(const Params& p, int b, int d, int seg0, int dir, int idx) : seg(seg0) {
    const int kind = (idx >> 4) & 1, n = idx & 15;
    i = idx >> 5;
    on = n < p.N;
    const i64 sb = kind ? p.sC_b : p.sB_b, sl = kind ? p.sC_l : p.sB_l, sd = kind ? p.sC_d : p.sB_d,
              sn = kind ? p.sC_n : p.sB_n;
    const int s = seg0 * K + i;
    at = (const T*)(kind ? p.C : p.B) + b * sb + d * sd + n * sn + (i64)time_of(p, d, s) * sl;
    step = (d ? -sl : sl) * K * dir;
  }
  // Loaded values stay in their own type until used: converting them right away would make the
  // thread wait for the load there (the compiler places the conversion next to the load).
  __device__ T fetch(const Params& p, int dir) {
    const T v = on && seg * K + i < p.L ? ldg(at) : from_f<T>(0.f);
    at += step;
    seg += dir;
    return v;
  }
};

// The values a block's threads fetch per chunk, PER each: thread tid has values tid + j * THREADS.
template <typename T, int K, int THREADS>
struct BCStage {
  static constexpr int PER = K * 32 / THREADS;
  static_assert(K * 32 % THREADS == 0, "a chunk's B and C are whole values per thread");
  BCLoader<T, K> ld[PER];
  T r[PER];
  __device__ BCStage(const Params& p, int b, int d, int seg0, int dir) {
#pragma unroll
    for (int j = 0; j < PER; ++j) ld[j] = BCLoader<T, K>(p, b, d, seg0, dir, threadIdx.x + j * THREADS);
  }
  __device__ void fetch(const Params& p, int dir) {
#pragma unroll
    for (int j = 0; j < PER; ++j) r[j] = ld[j].fetch(p, dir);
  }
  __device__ void store(float* buf) const {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int idx = threadIdx.x + j * THREADS, i = idx >> 5, kind = (idx >> 4) & 1, n = idx & 15;
      const float v = to_f(r[j]);
#pragma unroll
      for (int c = 0; c < 4; ++c) buf[((i * 2 + kind) * 4 + c) * COPY + (n & ~3) + ((n & 3) ^ c)] = v;
    }
  }
};

// Where the lane with perm reads its registers 4 j .. 4 j + 3 in a staged step's B or C: copy
// perm & 3, element 4 (j ^ (perm >> 2)). Formed once per thread, so that a read's address is a
// register plus a constant.
struct GroupsAt {
  int at[NS / 4];
  __device__ explicit GroupsAt(int perm) {
#pragma unroll
    for (int j = 0; j < NS / 4; ++j) at[j] = (perm & 3) * COPY + 4 * (j ^ (perm >> 2));
  }
};

// Registers 4 j .. 4 j + 3 of step i's B (kind 0) or C (kind 1) of a staged chunk.
__device__ __forceinline__ float4 read_group(const float* buf, int i, int kind, const GroupsAt& g, int j) {
  return *reinterpret_cast<const float4*>(buf + (i * 2 + kind) * 4 * COPY + g.at[j]);
}

// Step i's B (kind 0) or C (kind 1) of a staged chunk, all 16 registers.
__device__ __forceinline__ void read_states(const float* buf, int i, int kind, const GroupsAt& g, float (&x)[NS]) {
#pragma unroll
  for (int j = 0; j < NS / 4; ++j) {
    const float4 v = read_group(buf, i, kind, g, j);
    x[4 * j] = v.x; x[4 * j + 1] = v.y; x[4 * j + 2] = v.z; x[4 * j + 3] = v.w;
  }
}

// ---- per-channel pieces -----------------------------------------------------------------------------
// One per-channel (batch, L, ...) tensor as a direction walks it: step s of the direction is at
// at + s * step, `at` moving one chunk (K steps) along per load or store, forwards (dir 1) or
// backwards (dir -1) in the direction's own order.
template <typename T, int K>
struct Walk {
  T* at;  // step K * seg0 of the direction
  i64 step, move;
  __device__ Walk(const void* base, i64 offset, i64 stride_l, const Params& p, int d, int seg0, int dir)
      : at((T*)base + offset + (d ? (i64)(p.L - 1) * stride_l : 0)), step(d ? -stride_l : stride_l) {
    at += (i64)seg0 * K * step;
    move = dir * K * step;
  }
};

// The K values of chunk seg; zero past the end and when not `on`; then the walk moves on.
template <typename T, int K>
__device__ __forceinline__ void load_steps(Walk<const T, K>& w, int seg, int L, bool on, T (&x)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) x[k] = on && seg * K + k < L ? ldg(w.at + k * w.step) : from_f<T>(0.f);
  w.at += w.move;
}

// Direction d's A times log2(e) in register order (exp(delta A) = exp2(delta A2)); zero past N.
__device__ __forceinline__ void direction_A2(const Params& p, int d, int e, bool on, float (&A2)[NS]) {
  const int perm = perm_of(e);
#pragma unroll
  for (int r = 0; r < NS; ++r) {
    const int n = r ^ perm;
    A2[r] = on && n < p.N ? p.A[((i64)d * p.E + e) * p.N + n] * LOG2E : 0.f;
  }
}

// ---- saved states ----------------------------------------------------------------------------------
// (batch, ND, saved, E, 16) in S (float32 or u's 16-bit type), each channel's 16 in register order.
template <typename S>
__device__ __forceinline__ S* saved_state(const Params& p, int b, int d, int k, int e) {
  return (S*)p.states + ((((i64)b * p.ND + d) * p.n_saved + k) * p.E + e) * NS;
}
__device__ __forceinline__ i64 saved_step(const Params& p) { return (i64)p.E * NS; }

// A channel's 16 states as stored: four 16-byte words in float32, two in 16 bits.
template <typename S> struct Stored {
  uint4 w[NS * sizeof(S) / 16];
};
template <typename S> __device__ __forceinline__ Stored<S> get_states(const S* at, bool on) {
  Stored<S> s;
#pragma unroll
  for (int j = 0; j < NS * (int)sizeof(S) / 16; ++j) s.w[j] = on ? reinterpret_cast<const uint4*>(at)[j] : make_uint4(0, 0, 0, 0);
  return s;
}
__device__ __forceinline__ void unpack_states(const Stored<float>& s, float (&h)[NS]) {
#pragma unroll
  for (int j = 0; j < NS / 4; ++j) {
    h[4 * j] = __uint_as_float(s.w[j].x); h[4 * j + 1] = __uint_as_float(s.w[j].y);
    h[4 * j + 2] = __uint_as_float(s.w[j].z); h[4 * j + 3] = __uint_as_float(s.w[j].w);
  }
}
template <typename S> __device__ __forceinline__ void unpack_states(const Stored<S>& s, float (&h)[NS]) {
#pragma unroll
  for (int j = 0; j < NS / 8; ++j) {
    const unsigned u[4] = {s.w[j].x, s.w[j].y, s.w[j].z, s.w[j].w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      h[8 * j + 2 * k] = to_f(S{(unsigned short)(u[k] & 0xffffu)});
      h[8 * j + 2 * k + 1] = to_f(S{(unsigned short)(u[k] >> 16)});
    }
  }
}
__device__ __forceinline__ void put_states(float* at, const float (&h)[NS]) {
#pragma unroll
  for (int j = 0; j < NS; j += 4) *reinterpret_cast<float4*>(at + j) = make_float4(h[j], h[j + 1], h[j + 2], h[j + 3]);
}
template <typename S> __device__ __forceinline__ void put_states(S* at, const float (&h)[NS]) {
  unsigned w[NS / 2];
#pragma unroll
  for (int j = 0; j < NS / 2; ++j) w[j] = from_f<S>(h[2 * j]).bits | (unsigned)from_f<S>(h[2 * j + 1]).bits << 16;
  reinterpret_cast<uint4*>(at)[0] = make_uint4(w[0], w[1], w[2], w[3]);
  reinterpret_cast<uint4*>(at)[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

// ---- forward ----------------------------------------------------------------------------------------------
// Direction d; grid (E / THREADS, batch). Direction 1 adds its gated output onto direction 0's.
// T: the type of u, delta, B, C, z and y; S: the type of the saved states. Without y (WITH_Y
// false, scan_states_kernel) the pass only saves the states: the backward pass's recomputation of
// them (save_every = 0).
template <typename T, typename S, int d, int K, int THREADS, bool WITH_Y>
__device__ __forceinline__ void scan_fwd(const Params& p, float (*bc)[bc_floats<K>()]) {
  static_assert(K % CHUNK == 0, "a segment is whole chunks (the steps between saved states)");
  const int e = blockIdx.x * THREADS + threadIdx.x, b = blockIdx.y, n_seg = (p.L + K - 1) / K, perm = perm_of(e);
  const bool on = e < p.E;
  const GroupsAt groups(perm);
  float A2[NS];
  direction_A2(p, d, e, on, A2);
  const float bias = p.bias && on ? p.bias[d * p.E + e] : 0.f;
  const float Dv = p.D && on ? p.D[d * p.E + e] : 0.f;
  // the inputs, loaded one segment ahead; y written at the current one. Direction 0's y (wyp) may
  // go through the read-only cache: an earlier launch wrote it, and this kernel reads each value
  // once, before the same thread overwrites it.
  Walk<const T, K> wu(p.u, b * p.su_b + d * p.su_d + e, p.su_l, p, d, 0, 1);
  Walk<const T, K> wd(p.dl, b * p.sd_b + d * p.sd_d + e, p.sd_l, p, d, 0, 1);
  Walk<const T, K> wz(p.z, b * p.sz_b + e, p.sz_l, p, d, 0, 1);
  Walk<const T, K> wyp(p.y, b * p.sy_b + e, p.sy_l, p, d, 0, 1);
  Walk<T, K> wy(p.y, b * p.sy_b + e, p.sy_l, p, d, 0, 1);
  BCStage<T, K, THREADS> bcs(p, b, d, 0, 1);
  S* saved = p.save_states ? saved_state<S>(p, b, d, 0, e) : nullptr;
  float h[NS];
#pragma unroll
  for (int n = 0; n < NS; ++n) h[n] = 0.f;
  T nu[K], nx[K], nz[K], ny[K];
  load_steps(wu, 0, p.L, on, nu);
  load_steps(wd, 0, p.L, on, nx);
  load_steps(wz, 0, p.L, on && WITH_Y, nz);
  load_steps(wyp, 0, p.L, on && WITH_Y && d > 0, ny);
  bcs.fetch(p, 1);
  bcs.store(bc[0]);
  __syncthreads();
  int phase = 0;  // which chunk of CHUNK steps: c % save_every
  for (int seg = 0; seg < n_seg; ++seg) {
    T uu[K], xx[K], zz[K], yp[K];
#pragma unroll
    for (int k = 0; k < K; ++k) { uu[k] = nu[k]; xx[k] = nx[k]; zz[k] = nz[k]; yp[k] = ny[k]; }
    if (seg + 1 < n_seg) {
      bcs.fetch(p, 1);
      load_steps(wu, seg + 1, p.L, on, nu);
      load_steps(wd, seg + 1, p.L, on, nx);
      load_steps(wz, seg + 1, p.L, on && WITH_Y, nz);
      load_steps(wyp, seg + 1, p.L, on && WITH_Y && d > 0, ny);
    }
    const float* cur = bc[seg & 1];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int s = seg * K + i;
      if (i % CHUNK == 0) {  // the start of a chunk: its state is saved every save_every-th chunk
        if (p.save_states && phase == 0 && on && s < p.L) put_states(saved, h);
        if (++phase == p.save_every) {
          phase = 0;
          if (p.save_states) saved += saved_step(p);
        }
      }
      const float dt = softplus(to_f(xx[i]) + bias) * (s < p.L ? 1.f : 0.f), du = dt * to_f(uu[i]);
      float Bv[NS];
      read_states(cur, i, 0, groups, Bv);
#pragma unroll
      for (int r = 0; r < NS; ++r) h[r] = fmaf(ex2(dt * A2[r]), h[r], du * Bv[r]);
      if (WITH_Y) {
        float Cv[NS], acc[4];
        read_states(cur, i, 1, groups, Cv);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] = Cv[j] * h[j];
#pragma unroll
        for (int r = 4; r < NS; ++r) acc[r % 4] = fmaf(Cv[r], h[r], acc[r % 4]);
        const float u = to_f(uu[i]), z = to_f(zz[i]);
        const float out = ((acc[0] + acc[1]) + (acc[2] + acc[3]) + Dv * u) * z * sigmoid(z) + to_f(yp[i]);
        if (on && s < p.L) wy.at[i * wy.step] = from_f<T>(out);
      }
    }
    if (WITH_Y) wy.at += wy.move;
    if (seg + 1 < n_seg) bcs.store(bc[(seg + 1) & 1]);
    __syncthreads();
  }
}

template <typename T, typename S, int d, int K, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_fwd_kernel(Params p) {
  __shared__ __align__(16) float bc[2][bc_floats<K>()];
  scan_fwd<T, S, d, K, THREADS, true>(p, bc);
}

// The states only (no y), of both directions in one launch: grid (E / THREADS, batch, ND). With
// no output shared by the directions they need no order, and one launch of twice the blocks
// leaves less of the GPU idle in its last wave than two.
template <typename T, typename S, int K, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_states_kernel(Params p) {
  __shared__ __align__(16) float bc[2][bc_floats<K>()];
  if (blockIdx.z == 0) scan_fwd<T, S, 0, K, THREADS, false>(p, bc);
  else scan_fwd<T, S, 1, K, THREADS, false>(p, bc);
}

// ---- backward ---------------------------------------------------------------------------------------------
// The state after chunk c from the state before it (the chunks between a saved state and the
// one being differentiated, when save_every > 1), reading the inputs and B straight from global
// memory.
template <typename T>
__device__ void advance(const Params& p, int b, int d, int c, int e, bool on, float bias, const float (&A2)[NS],
                        float (&h)[NS]) {
  const int perm = perm_of(e);
  for (int i = 0; i < CHUNK; ++i) {
    const i64 t = time_of(p, d, c * CHUNK + i);
    const float dt = on ? softplus(to_f(ldg((const T*)p.dl + b * p.sd_b + t * p.sd_l + d * p.sd_d + e)) + bias) : 0.f;
    const float du = on ? dt * to_f(ldg((const T*)p.u + b * p.su_b + t * p.su_l + d * p.su_d + e)) : 0.f;
#pragma unroll
    for (int r = 0; r < NS; ++r) {
      const int n = r ^ perm;
      const float Bn = n < p.N ? to_f(ldg((const T*)p.B + b * p.sB_b + t * p.sB_l + d * p.sB_d + n * p.sB_n)) : 0.f;
      h[r] = fmaf(ex2(dt * A2[r]), h[r], du * Bn);
    }
  }
}

// Direction d, walking time backwards one chunk (CHUNK steps) at a time; a 1-D grid of blocks of
// THREADS channels of one batch element. Direction 1 adds its dz onto direction 0's.
// ADVANCE: with the recomputation of the chunks between two saved states (save_every > 1).
template <typename T, typename S, int d, int THREADS, bool ADVANCE>
__device__ __forceinline__ void scan_bwd(const Params& p, float (*bc)[bc_floats<CHUNK>()],
                                         float (*red)[CHUNK * 2 * (THREADS / 32) * NS]) {
  constexpr int K = CHUNK, WARPS = THREADS / 32;
  constexpr float LN2 = 0.6931471805599453f;  // sw sums w A2 = w A log2(e)
  // a 1-D grid: block (channels cb, batch b), numbered batch-major
  const int n_cb = (p.E + THREADS - 1) / THREADS, cb = (int)blockIdx.x % n_cb, b = (int)blockIdx.x / n_cb;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, e = cb * THREADS + tid, perm = perm_of(e);
  const bool on = e < p.E;
  const GroupsAt groups(perm);
  const int last = (p.L + K - 1) / K - 1;
  float A2[NS];
  direction_A2(p, d, e, on, A2);
  const float bias = p.bias && on ? p.bias[d * p.E + e] : 0.f;
  const float Dv = p.D && on ? p.D[d * p.E + e] : 0.f;
  // the inputs, loaded one chunk ahead (walking backwards); outputs at the current one
  Walk<const T, K> wu(p.u, b * p.su_b + d * p.su_d + e, p.su_l, p, d, last, -1);
  Walk<const T, K> wd(p.dl, b * p.sd_b + d * p.sd_d + e, p.sd_l, p, d, last, -1);
  Walk<const T, K> wz(p.z, b * p.sz_b + e, p.sz_l, p, d, last, -1);
  Walk<const T, K> wg(p.dy, b * p.sy_b + e, p.sy_l, p, d, last, -1);
  // dz, du, ddelta: contiguous; direction 0's dz (wdzp) is read as its y is forward
  Walk<const T, K> wdzp(p.dz, (i64)b * p.L * p.E + e, p.E, p, d, last, -1);
  Walk<T, K> wdz(p.dz, (i64)b * p.L * p.E + e, p.E, p, d, last, -1);
  Walk<T, K> wdu(p.du, ((i64)b * p.L * p.ND + d) * p.E + e, p.ND * p.E, p, d, last, -1);
  Walk<T, K> wddl(p.ddl, ((i64)b * p.L * p.ND + d) * p.E + e, p.ND * p.E, p, d, last, -1);
  BCStage<T, K, THREADS> bcs(p, b, d, last, -1);
  float q[NS], dA[NS];  // q: the gradient reaching the state before the chunk's next step, a_{s+1} dh_{s+1}
#pragma unroll
  for (int r = 0; r < NS; ++r) q[r] = dA[r] = 0.f;
  float dD = 0.f, dbias = 0.f;
  T nu[K], nx[K], nz[K], ng[K], nq[K];
  load_steps(wu, last, p.L, on, nu);
  load_steps(wd, last, p.L, on, nx);
  load_steps(wz, last, p.L, on, nz);
  load_steps(wg, last, p.L, on, ng);
  load_steps(wdzp, last, p.L, on && d > 0, nq);
  int phase = last % p.save_every, saved = last / p.save_every;  // seg % save_every, seg / save_every
  const S* at_state = saved_state<S>(p, b, d, saved, e);  // the saved state `saved`
  Stored<S> nh = get_states(at_state, on);
  bcs.fetch(p, -1);
  bcs.store(bc[last & 1]);
  // where thread tid < K * 32 writes the block's partial sum of dB or dC (step i, state n) of
  // chunk `seg`: (blocks, batch, L, ND, B/C, N), one chunk further per loop (t moves by K)
  const int s_i = tid >> 5, s_kind = (tid >> 4) & 1, s_n = tid & 15;
  float* at_dBC = p.dBC + ((((i64)cb * p.batch + b) * p.L + time_of(p, d, last * K + s_i)) * p.ND + d) * 2 * p.N +
                  s_kind * p.N + s_n;
  const i64 dBC_step = (i64)(d ? K : -K) * p.ND * 2 * p.N;
  __syncthreads();
  for (int seg = last; seg >= 0; --seg, at_dBC += dBC_step) {
    T uu[K], xx[K], zz[K], gy[K], dzp[K];
#pragma unroll
    for (int k = 0; k < K; ++k) { uu[k] = nu[k]; xx[k] = nx[k]; zz[k] = nz[k]; gy[k] = ng[k]; dzp[k] = nq[k]; }
    float h[NS];
    unpack_states(nh, h);
    const int first = seg - phase;  // the chunk whose start state was saved
    if (phase == 0) { phase = p.save_every; --saved; at_state -= saved_step(p); }
    --phase;
    if (seg > 0) {
      bcs.fetch(p, -1);
      load_steps(wu, seg - 1, p.L, on, nu);
      load_steps(wd, seg - 1, p.L, on, nx);
      load_steps(wz, seg - 1, p.L, on, nz);
      load_steps(wg, seg - 1, p.L, on, ng);
      load_steps(wdzp, seg - 1, p.L, on && d > 0, nq);
      nh = get_states(at_state, on && saved >= 0);
    }
    if (ADVANCE)
      for (int c = first; c < seg; ++c) advance<T>(p, b, d, c, e, on, bias, A2, h);
    const float* cur = bc[seg & 1];
    float* rs = red[seg & 1];
    // Per step: delta and its slope d delta / d(delta + bias), delta u, g = dy silu(z), u, and
    // dy silu'(z), the factor dz_s takes of C_s h_s + D u_s.
    float dt[K], sp[K], du[K], g[K], u[K], dsilu[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const float z = to_f(zz[i]), sig = sigmoid(z), dy = to_f(gy[i]);
      u[i] = to_f(uu[i]);
      dt[i] = softplus(to_f(xx[i]) + bias, sp[i]) * (seg * K + i < p.L ? 1.f : 0.f);
      du[i] = dt[i] * u[i];
      g[i] = dy * z * sig;
      dsilu[i] = dy * sig * (1.f + z * (1.f - sig));
    }
    // The chunk four states at a time (a group: registers 4 j .. 4 j + 3), forwards then backwards,
    // with the group's a_s and a_s h_{s-1} in registers. Forwards: h_s, dC's terms g_s h_s and
    // y's C_s h_s. Backwards: dh_s = C_s g_s + q_s, q_{s-1} = a_s dh_s, dB's terms dh_s delta_s u_s,
    // dA, and the sums over states for ddelta_s and du_s. The sums of dB and dC over the warp's
    // channels start within each group (group_sum) and end once all groups are done (groups_sum).
    float yc[K], sw[K], dhB[K], pC[K][2], pB[K][2];
#pragma unroll
    for (int i = 0; i < K; ++i) yc[i] = sw[i] = dhB[i] = 0.f;
#pragma unroll
    for (int jj = 0; jj < NS / 4; ++jj) {
      const int j = (jj >> 1) | ((jj & 1) << 1);  // groups 0, 2, 1, 3: pairs across lane bit 4 first
      float a[K][4], ah[K][4], v[4];
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const float4 B4 = read_group(cur, i, 0, groups, j), C4 = read_group(cur, i, 1, groups, j);
        const float Bv[4] = {B4.x, B4.y, B4.z, B4.w}, Cv[4] = {C4.x, C4.y, C4.z, C4.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int r = 4 * j + k;
          a[i][k] = ex2(dt[i] * A2[r]);
          ah[i][k] = a[i][k] * h[r];
          h[r] = fmaf(du[i], Bv[k], ah[i][k]);
          v[k] = h[r] * g[i];
          yc[i] = fmaf(Cv[k], h[r], yc[i]);
        }
        group_sum(v, pC[i], jj);
      }
#pragma unroll
      for (int i = K - 1; i >= 0; --i) {
        const float4 B4 = read_group(cur, i, 0, groups, j), C4 = read_group(cur, i, 1, groups, j);
        const float Bv[4] = {B4.x, B4.y, B4.z, B4.w}, Cv[4] = {C4.x, C4.y, C4.z, C4.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int r = 4 * j + k;
          const float dh = fmaf(Cv[k], g[i], q[r]);
          const float w = dh * ah[i][k];  // the gradient with respect to a_s, times a_s
          dA[r] = fmaf(w, dt[i], dA[r]);
          sw[i] = fmaf(w, A2[r], sw[i]);
          dhB[i] = fmaf(dh, Bv[k], dhB[i]);
          v[k] = dh * du[i];
          q[r] = a[i][k] * dh;
        }
        group_sum(v, pB[i], jj);
      }
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const float dC = groups_sum(pC[i]), dB = groups_sum(pB[i]);
      rs[((i * 2 + (lane & 1)) * WARPS + warp) * NS + perm] = lane & 1 ? dC : dB;
      const bool inside = on && seg * K + i < p.L;
      if (inside) wdz.at[i * wdz.step] = from_f<T>(dsilu[i] * (yc[i] + Dv * u[i]) + to_f(dzp[i]));
      const float ddt = (LN2 * sw[i] + dhB[i] * u[i]) * sp[i];  // d a_s / d delta_s = A a_s
      dbias += ddt;
      dD = fmaf(g[i], u[i], dD);
      if (inside) {
        wdu.at[i * wdu.step] = from_f<T>(dhB[i] * dt[i] + Dv * g[i]);
        wddl.at[i * wddl.step] = from_f<T>(ddt);
      }
    }
    wdz.at += wdz.move;
    wdu.at += wdu.move;
    wddl.at += wddl.move;
    if (seg > 0) bcs.store(bc[(seg - 1) & 1]);
    __syncthreads();
    // The block's sums over its warps, one partial per block: (E blocks, batch, L, ND, B/C, N).
    if (tid < K * 32 && seg * K + s_i < p.L && s_n < p.N) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) sum += rs[((s_i * 2 + s_kind) * WARPS + w) * NS + s_n];
      *at_dBC = sum;
    }
  }
  if (on) {
#pragma unroll
    for (int r = 0; r < NS; ++r) {
      const int n = r ^ perm;
      if (n < p.N) p.dA[b * p.per_b + ((i64)d * p.E + e) * p.N + n] = dA[r];
    }
    p.dD[b * p.per_b + d * p.E + e] = dD;
    p.dbias[b * p.per_b + d * p.E + e] = dbias;
  }
}

// The code without the recomputation between saved states is a path of its own: the registers
// that path needs are then not held through the loop when every chunk's state is saved.
template <typename T, typename S, int d, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_bwd_kernel(Params p) {
  static_assert(CHUNK * 32 <= THREADS && THREADS % 32 == 0, "a chunk's dB and dC sums are one value per thread");
  __shared__ __align__(16) float bc[2][bc_floats<CHUNK>()];
  __shared__ float red[2][CHUNK * 2 * (THREADS / 32) * NS];  // [step][B, C][warp][state]: per-warp channel sums
  if (p.save_every > 1) scan_bwd<T, S, d, THREADS, true>(p, bc, red);
  else scan_bwd<T, S, d, THREADS, false>(p, bc, red);
}

// ---- the backward pass's sums ------------------------------------------------------------------------
// One launch finishes what the backward kernels leave as partial sums, each in a fixed order (no
// atomics, so results do not change between runs): dB and dC over the blocks of channels,
// (blocks, batch, L, ND, 2, N) -> (batch, L, ND, N) in B's type; dA, dD and dbias over the batch.
// The arguments of finish_bwd_kernel (scan_cuda.py's Sums mirrors them).
struct Sums {
  const float* dBC;          // (n_blocks, rows, 2, N): partial sums of dB and dC
  const float* per_channel;  // (batch, n_A + 2 n_D): partial sums of dA, dD and dbias
  void *dB, *dC;             // (rows, N) in T
  float *dA, *dD, *dbias;    // (n_A,), (n_D,), (n_D,)
  i64 rows, n_A, n_D;        // rows = batch * L * ND
  int n_blocks, N, batch;
};

template <typename T>
__global__ void finish_bwd_kernel(Sums a) {
  const float* __restrict__ dBC = a.dBC;
  const float* __restrict__ per_channel = a.per_channel;
  T *dB = (T*)a.dB, *dC = (T*)a.dC;
  float *dA = a.dA, *dD = a.dD, *dbias = a.dbias;
  const i64 rows = a.rows, n_A = a.n_A, n_D = a.n_D;
  const int n_blocks = a.n_blocks, N = a.N, batch = a.batch;
  const i64 n_BC = rows * 2 * N, i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n_BC) {  // dBC element (row, kind, n), row = (b, t, d)
    float sum = 0.f;
    for (int k = 0; k < n_blocks; ++k) sum += __ldg(dBC + k * n_BC + i);
    const i64 row = i / (2 * N);
    const int kind = (int)(i / N) & 1, n = (int)(i % N);
    (kind ? dC : dB)[row * N + n] = from_f<T>(sum);
    return;
  }
  // per-channel gradients: dA (batch, ND, E, N), then dD and dbias (batch, ND, E), one buffer
  const i64 j = i - n_BC, per_b = n_A + 2 * n_D;
  if (j >= per_b) return;
  float sum = 0.f;
  for (int b = 0; b < batch; ++b) sum += __ldg(per_channel + b * per_b + j);
  if (j < n_A) dA[j] = sum;
  else if (j < n_A + n_D) dD[j - n_A] = sum;
  else dbias[j - n_A - n_D] = sum;
}

}  // namespace dis
