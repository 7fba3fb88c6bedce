// The selective scan of DiS's bidirectional Mamba mixer as CUDA kernels, forward and backward,
// in token-major layout (batch, L, directions, E), direction 1 walking the same memory
// backwards; the gate z and the output y are shared by the directions. The readable definition
// is scan.py's selective_scan_ref, which the tests compare against.
//
// Device code only, with no #include: scan_cuda.py compiles this file at run time with NVRTC
// (one program per dtype of the inputs and of the saved states, the kernels instantiated through
// name expressions), allocates the outputs and launches the kernels.
//
// The forward pass gives each lane one channel e of one batch element, its 16 states in
// registers: the lane computes its own steps' delta (through softplus), delta u and gate, and
// the sum over states (y) stays in the lane. A block of THREADS channels walks time in segments
// of K steps; the segment's B and C are staged in shared memory as float32 and every lane reads
// the same address. Each kernel computes one direction, d a template parameter: the host
// launches direction 0, then direction 1, which adds its output (y forward, dz backward) onto
// the first's.
//
// The backward pass gives four lanes (a quad) one channel, each lane four of its 16 states, in
// registers: a warp holds 8 channels, and a lane needs few enough registers for 16 warps per SM
// although it keeps a chunk's intermediate values. A block of THREADS / 4 channels walks time in
// segments of 4 steps. Per step, what is one number per channel (delta through softplus,
// delta u, the gated dy) is computed once, by the step's owner, lane i % 4 of the quad for step
// i of a chunk of four steps, and broadcast to the other three with a shuffle. The sums over
// states (the gradients of u and delta, and y for dz) are partial in each lane; a chunk's four of
// them are reduce-scattered over the quad so that each owner ends with the sum of its own step,
// and writes it.
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
// steps (float32 or the inputs' 16-bit type, laid out as saved_state says), or, run again without y just before the backward pass, every chunk's (scan_cuda.py's
// save_every = 0: no state is held between the passes). The backward pass walks the chunks last
// to first: from the saved state it recomputes the chunk forwards, keeping a_s = exp(delta_s A)
// and a_s h_{s-1} per step in registers and forming dC_s = sum_e g_s h_s (g = dy silu(z)) on
// the way, then runs the adjoint dh_s = C_s g_s + a_{s+1} dh_{s+1} backwards, forming
// dB_s = sum_e dh_s delta_s u_s and the per-channel gradients. Steps past the end of the
// sequence run with delta = u = g = 0, which leaves every state and sum alone.
namespace dis {

typedef long long i64;

constexpr int NS = 16;       // states per channel, padded with zero states
constexpr int QUAD = 4;      // lanes per channel
constexpr int SL = NS / QUAD;  // states per lane
constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

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
  int blk0;  // backward: the first block of the launch (blocks are numbered batch-major)
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
// A segment's K * 32 values are loaded by the block's threads, value idx: step i = idx / 32, B or
// C, state n, through a pointer that moves one segment along per call.
template <int K> __host__ __device__ constexpr int bc_floats() { return K * 2 * 4 * NS; }

__device__ __forceinline__ int time_of(const Params& p, int d, int s) { return d ? p.L - 1 - s : s; }

template <typename T, int K>
struct BCLoader {
  const T* at;    // this thread's value in the segment `seg`
  i64 step;   // one segment along, in the direction of travel
  int seg, i;     // which segment comes next, which of its steps this thread loads
  bool on;        // a thread with a value to load (idx < K * 32, n < N)
  BCLoader() = default;
  __device__ BCLoader(const Params& p, int b, int d, int seg0, int dir, int idx) : seg(seg0) {
    const int kind = (idx >> 4) & 1, n = idx & 15;
    i = idx >> 5;
    on = idx < K * 32 && n < p.N;
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

template <typename T, int K>
__device__ __forceinline__ void store_bc(float* buf, T r, int idx = threadIdx.x) {
  const int i = idx >> 5, kind = (idx >> 4) & 1, n = idx & 15;
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
  i64 own_step, seg_step;
  __device__ Stream(const void* base, i64 offset, i64 stride_l, const Params& p, int d, int seg0, int dir,
                    const Lane& ln) {
    const i64 sl = d ? -stride_l : stride_l;
    at = (T*)base + offset + (d ? (i64)(p.L - 1) * stride_l : 0) + (i64)(seg0 * K + ln.q) * sl;
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
    x[k] = on && ln.active && s < L ? ldg(w.ptr(k)) : from_f<T>(0.f);
  }
  w.move();
}

// Direction d's A times log2(e) in register order (exp(delta A) = exp2(delta A2)); zero past N.
__device__ __forceinline__ void direction_A2(const Params& p, int d, const Lane& ln, float (&A2)[SL]) {
#pragma unroll
  for (int j = 0; j < SL; ++j) {
    const int n = ln.state(j);
    A2[j] = ln.active && n < p.N ? p.A[((i64)d * p.E + ln.e) * p.N + n] * LOG2E : 0.f;
  }
}

// The saved state k of direction d, in S (float32 or u's 16-bit type), (batch, ND, saved, E, 16)
// in the backward pass's register order (see the top of the file): this lane's four registers.
// State k + 1 is saved_step further.
template <typename S>
__device__ __forceinline__ S* saved_state(const Params& p, int b, int d, int k, const Lane& ln) {
  return (S*)p.states + ((((i64)b * p.ND + d) * p.n_saved + k) * p.E + ln.e) * NS + 4 * ln.q;
}
__device__ __forceinline__ i64 saved_step(const Params& p) { return (i64)p.E * NS; }

// Four saved states from their storage: one 16-byte load in float32, 8 bytes in 16 bits.
__device__ __forceinline__ float4 get_state(const float* at) { return *reinterpret_cast<const float4*>(at); }
template <typename S> __device__ __forceinline__ float4 get_state(const S* at) {
  const uint2 v = *reinterpret_cast<const uint2*>(at);
  return make_float4(to_f(S{(unsigned short)(v.x & 0xffffu)}), to_f(S{(unsigned short)(v.x >> 16)}),
                     to_f(S{(unsigned short)(v.y & 0xffffu)}), to_f(S{(unsigned short)(v.y >> 16)}));
}

// ---- forward ----------------------------------------------------------------------------------------------
// One lane per channel, its 16 states in registers: the sum over states (C h) stays in the lane,
// and each lane computes its own steps' delta, delta u and gate, so the forward pass needs no
// shuffles. The lane of channel e keeps its states in the order the backward pass's lanes of
// that channel do (register 4q + j: state 4q + (j ^ m), m = (e >> 1) & 3), so that it saves them
// as they are. A block of THREADS channels of one batch element walks time in segments of K
// steps, B and C staged as for the backward pass (four copies, lane e reading copy m).

// One per-channel input as direction d walks it: step s of the direction is at at + s * step;
// `at` moves one segment (K steps) along per load.
template <typename T>
struct Walk {
  T* at;
  i64 step;
  __device__ Walk(const void* base, i64 offset, i64 stride_l, const Params& p, int d)
      : at((T*)base + offset + (d ? (i64)(p.L - 1) * stride_l : 0)), step(d ? -stride_l : stride_l) {}
};

// The K values of segment seg; zero past the end and when not `on`; then the walk moves on.
template <typename T, int K>
__device__ __forceinline__ void load_steps(Walk<const T>& w, int seg, int L, bool on, T (&x)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) x[k] = on && seg * K + k < L ? ldg(w.at + k * w.step) : from_f<T>(0.f);
  w.at += K * w.step;
}

// A lane's 16 states, in register order, to the saved state at `at` (channel e's 16 values): 64
// bytes in float32, 32 in 16 bits.
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

// Step i's B (kind 0) or C (kind 1) of a staged segment, all 16 states in the register order of
// copy m.
__device__ __forceinline__ void read_states(const float* buf, int i, int kind, int m, float (&x)[NS]) {
  const float4* row = reinterpret_cast<const float4*>(buf + ((i * 2 + kind) * 4 + m) * NS);
#pragma unroll
  for (int j = 0; j < NS / 4; ++j) {
    const float4 v = row[j];
    x[4 * j] = v.x; x[4 * j + 1] = v.y; x[4 * j + 2] = v.z; x[4 * j + 3] = v.w;
  }
}

// Direction d; grid (E / THREADS, batch). Direction 1 adds its gated output onto direction 0's.
// T: the type of u, delta, B, C, z and y; S: the type of the saved states. Without y (p.y null)
// the pass only saves the states: the backward pass's recomputation of them (save_every = 0).
template <typename T, typename S, int d, int K, int THREADS, bool WITH_Y>
__device__ __forceinline__ void scan_fwd(const Params& p, float (*bc)[bc_floats<K>()]) {
  static_assert(K % QUAD == 0, "a segment is whole chunks (the steps between saved states)");
  const int e = blockIdx.x * THREADS + threadIdx.x, b = blockIdx.y, n_seg = (p.L + K - 1) / K, m = (e >> 1) & 3;
  const bool on = e < p.E;
  float A2[NS];  // A times log2(e): exp(delta A) = exp2(delta A2); zero past N
#pragma unroll
  for (int r = 0; r < NS; ++r) {
    const int n = (r & ~3) + ((r & 3) ^ m);
    A2[r] = on && n < p.N ? p.A[((i64)d * p.E + e) * p.N + n] * LOG2E : 0.f;
  }
  const float bias = p.bias && on ? p.bias[d * p.E + e] : 0.f;
  const float Dv = p.D && on ? p.D[d * p.E + e] : 0.f;
  // the inputs, loaded one segment ahead; y written at the current one. Direction 0's y (wyp) may
  // go through the read-only cache: an earlier launch wrote it, and this kernel reads each value
  // once, before the same thread overwrites it.
  Walk<const T> wu(p.u, b * p.su_b + d * p.su_d + e, p.su_l, p, d);
  Walk<const T> wd(p.dl, b * p.sd_b + d * p.sd_d + e, p.sd_l, p, d);
  Walk<const T> wz(p.z, b * p.sz_b + e, p.sz_l, p, d);
  Walk<const T> wyp(p.y, b * p.sy_b + e, p.sy_l, p, d);
  Walk<T> wy(p.y, b * p.sy_b + e, p.sy_l, p, d);
  constexpr int PER = K * 32 / THREADS;  // B and C values each thread stages per segment
  BCLoader<T, K> bcl[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) bcl[j] = BCLoader<T, K>(p, b, d, 0, 1, threadIdx.x + j * THREADS);
  S* saved = p.save_states ? (S*)p.states + (((i64)b * p.ND + d) * p.n_saved * p.E + e) * NS : nullptr;
  float h[NS];
#pragma unroll
  for (int n = 0; n < NS; ++n) h[n] = 0.f;
  T nu[K], nx[K], nz[K], ny[K];
  load_steps(wu, 0, p.L, on, nu);
  load_steps(wd, 0, p.L, on, nx);
  load_steps(wz, 0, p.L, on && WITH_Y, nz);
  load_steps(wyp, 0, p.L, on && WITH_Y && d > 0, ny);
#pragma unroll
  for (int j = 0; j < PER; ++j) store_bc<T, K>(bc[0], bcl[j].fetch(p, 1), threadIdx.x + j * THREADS);
  __syncthreads();
  int phase = 0;  // which chunk of QUAD steps: c % save_every
  for (int seg = 0; seg < n_seg; ++seg) {
    T uu[K], xx[K], zz[K], yp[K];
#pragma unroll
    for (int k = 0; k < K; ++k) { uu[k] = nu[k]; xx[k] = nx[k]; zz[k] = nz[k]; yp[k] = ny[k]; }
    T r[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) r[j] = from_f<T>(0.f);
    if (seg + 1 < n_seg) {
#pragma unroll
      for (int j = 0; j < PER; ++j) r[j] = bcl[j].fetch(p, 1);
      load_steps(wu, seg + 1, p.L, on, nu);
      load_steps(wd, seg + 1, p.L, on, nx);
      load_steps(wz, seg + 1, p.L, on && WITH_Y, nz);
      load_steps(wyp, seg + 1, p.L, on && WITH_Y && d > 0, ny);
    }
    const float* cur = bc[seg & 1];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int s = seg * K + i;
      if (i % QUAD == 0) {  // the start of a chunk: its state is saved every save_every-th chunk
        if (p.save_states && phase == 0 && on && s < p.L) put_states(saved, h);
        if (++phase == p.save_every) {
          phase = 0;
          if (p.save_states) saved += (i64)p.E * NS;
        }
      }
      const float dt = softplus(to_f(xx[i]) + bias) * (s < p.L ? 1.f : 0.f), du = dt * to_f(uu[i]);
      float Bv[NS];
      read_states(cur, i, 0, m, Bv);
#pragma unroll
      for (int n = 0; n < NS; ++n) h[n] = fmaf(ex2(dt * A2[n]), h[n], du * Bv[n]);
      if (WITH_Y) {
        float Cv[NS], acc[4];
        read_states(cur, i, 1, m, Cv);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] = Cv[j] * h[j];
#pragma unroll
        for (int n = 4; n < NS; ++n) acc[n % 4] = fmaf(Cv[n], h[n], acc[n % 4]);
        const float u = to_f(uu[i]), z = to_f(zz[i]);
        const float out = ((acc[0] + acc[1]) + (acc[2] + acc[3]) + Dv * u) * z * sigmoid(z) + to_f(yp[i]);
        if (on && s < p.L) wy.at[i * wy.step] = from_f<T>(out);
      }
    }
    if (WITH_Y) wy.at += K * wy.step;
    if (seg + 1 < n_seg)
#pragma unroll
      for (int j = 0; j < PER; ++j) store_bc<T, K>(bc[(seg + 1) & 1], r[j], threadIdx.x + j * THREADS);
    __syncthreads();
  }
}

template <typename T, typename S, int d, int K, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_fwd_kernel(Params p) {
  static_assert(K * 32 % THREADS == 0, "a segment's B and C are whole values per thread");
  __shared__ __align__(16) float bc[2][bc_floats<K>()];
  if (p.y) scan_fwd<T, S, d, K, THREADS, true>(p, bc);
  else scan_fwd<T, S, d, K, THREADS, false>(p, bc);
}

// ---- backward ---------------------------------------------------------------------------------------------
// The state after chunk c from the state before it (the chunks between a saved state and the
// one being differentiated, when save_every > 1); every lane computes each step's delta itself
// and reads its inputs and B straight from global memory.
template <typename T>
__device__ void advance(const Params& p, int b, int d, int c, const Lane& ln, float bias, const float (&A2)[SL],
                        float (&h)[SL]) {
  for (int i = 0; i < QUAD; ++i) {
    const i64 t = time_of(p, d, c * QUAD + i);
    const float dt = ln.active ? softplus(to_f(ldg((const T*)p.dl + b * p.sd_b + t * p.sd_l + d * p.sd_d + ln.e)) + bias) : 0.f;
    const float du = ln.active ? dt * to_f(ldg((const T*)p.u + b * p.su_b + t * p.su_l + d * p.su_d + ln.e)) : 0.f;
#pragma unroll
    for (int j = 0; j < SL; ++j) {
      const int n = ln.state(j);
      const float Bn = n < p.N ? to_f(ldg((const T*)p.B + b * p.sB_b + t * p.sB_l + d * p.sB_d + n * p.sB_n)) : 0.f;
      h[j] = fmaf(ex2(dt * A2[j]), h[j], du * Bn);
    }
  }
}

// The saved state k at `at`; zero before the first (k < 0) and for idle lanes.
template <typename S>
__device__ __forceinline__ float4 load_state(const S* at, int k, const Lane& ln) {
  return ln.active && k >= 0 ? get_state(at) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// Direction d, walking time backwards in segments of one chunk (QUAD steps, one owned by each
// lane of a quad); grid (E / (THREADS / 4), batch). Direction 1 adds its dz onto direction 0's.
// ADVANCE: with the recomputation of the chunks between two saved states (save_every > 1).
template <typename T, typename S, int d, int THREADS, bool ADVANCE>
__device__ __forceinline__ void scan_bwd(const Params& p, float (*bc)[bc_floats<QUAD>()],
                                         float (*red)[QUAD * 2 * (THREADS / 32) * NS]) {
  constexpr int K = QUAD, WARPS = THREADS / 32;
  // a 1-D grid, possibly split in two launches (scan_cuda.py): block (channels cb, batch b)
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
  Stream<const T, K> wdzp(p.dz, (i64)b * p.L * p.E + ln.e, p.E, p, d, last, -1, ln);
  Stream<T, K> wdz(p.dz, (i64)b * p.L * p.E + ln.e, p.E, p, d, last, -1, ln);
  Stream<T, K> wdu(p.du, ((i64)b * p.L * p.ND + d) * p.E + ln.e, p.ND * p.E, p, d, last, -1, ln);
  Stream<T, K> wddl(p.ddl, ((i64)b * p.L * p.ND + d) * p.E + ln.e, p.ND * p.E, p, d, last, -1, ln);
  BCLoader<T, K> bcl(p, b, d, last, -1, threadIdx.x);
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
  const S* at_state = saved_state<S>(p, b, d, saved, ln);  // the saved state `saved`
  float4 nh = load_state(at_state, saved, ln);
  store_bc<T, K>(bc[last & 1], bcl.fetch(p, -1));
  // where thread tid < K * 32 writes the block's partial sum of dB or dC (step i, state n) of
  // segment `seg`: (blocks, batch, L, ND, B/C, N), one segment further per loop (t moves by K)
  const int s_i = tid >> 5, s_kind = (tid >> 4) & 1, s_n = tid & 15;
  float* at_dBC = p.dBC + ((((i64)cb * p.batch + b) * p.L + time_of(p, d, last * K + s_i)) * p.ND + d) * 2 * p.N +
                  s_kind * p.N + s_n;
  const i64 dBC_step = (i64)(d ? K : -K) * p.ND * 2 * p.N;
  __syncthreads();
  for (int seg = last; seg >= 0; --seg, at_dBC += dBC_step) {
    const T uu = nu[0], xx = nx[0], zz = nz[0], gy = ng[0], dzp = nq[0];
    float h[SL];
    unpack(nh, h);
    const int first = seg - phase;  // the segment whose start state was saved
    if (phase == 0) { phase = p.save_every; --saved; at_state -= saved_step(p); }
    --phase;
    T r = from_f<T>(0.f);
    if (seg > 0) {
      r = bcl.fetch(p, -1);
      load_owned(wu, seg - 1, p.L, ln, true, nu);
      load_owned(wd, seg - 1, p.L, ln, true, nx);
      load_owned(wz, seg - 1, p.L, ln, true, nz);
      load_owned(wg, seg - 1, p.L, ln, true, ng);
      load_owned(wdzp, seg - 1, p.L, ln, d > 0, nq);
      nh = load_state(at_state, saved, ln);
    }
    if (ADVANCE)
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
    if (tid < K * 32 && seg * K + s_i < p.L && s_n < p.N) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) sum += rs[((s_i * 2 + s_kind) * WARPS + w) * NS + s_n];
      *at_dBC = sum;
    }
  }
  if (ln.active) {
#pragma unroll
    for (int j = 0; j < SL; ++j) {
      const int n = ln.state(j);
      if (n < p.N) p.dA[b * p.per_b + ((i64)d * p.E + ln.e) * p.N + n] = dA[j];
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

// The code without the recomputation between saved states is a path of its own: the registers
// that path needs are then not held through the loop when every chunk's state is saved.
template <typename T, typename S, int d, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) scan_bwd_kernel(Params p) {
  static_assert(QUAD * 32 <= THREADS, "a segment's B and C are one value per thread");
  __shared__ __align__(16) float bc[2][bc_floats<QUAD>()];
  __shared__ float red[2][QUAD * 2 * (THREADS / 32) * NS];  // [step][B, C][warp][state]: per-warp channel sums
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
