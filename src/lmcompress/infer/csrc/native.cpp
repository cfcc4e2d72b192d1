// lmcompress native CPU runtime: low-bit matrix kernels that read packed codes, and one decode step for
// LLaMA-family blocks (RMSNorm, rotary positions, grouped-query attention, SwiGLU) over a static KV cache.
//
// Weights. A quantized linear holds unsigned codes u in [0, 2^bits) for bits in {1, 2, 4, 8}; the level is
// c = a * u - b (binary: a=2, b=1; ternary: a=1, b=1; ...), and W[o, i] = scale[o, g] * c + offset[o, g]
// for i in group g. Rows are padded to a multiple of 64 codes (CHUNK) and laid out per 64-code chunk:
//   8 bits: 64 bytes, byte j = u[j]
//   4 bits: 32 bytes, byte j = u[j] | u[j + 32] << 4
//   2 bits: 16 bytes, byte j = u[j] | u[j + 16] << 2 | u[j + 32] << 4 | u[j + 48] << 6
//   1 bit :  8 bytes, bit i of the little-endian 64-bit word = u[i]
// so that one chunk widens to 64 bytes with a few shifts and masks, and the whole weight is never widened.
//
// Activations are quantized per token to int8 (symmetric, scale max|x| / 127: the A8 of XTC and QuantGPT)
// and the products are integer: sum_i c_i x_i = a * sum_i u_i x_i - b * sum_i x_i, with u unsigned and x
// signed, which is what `vpdpbusd` (AVX-512 VNNI) and `vpmaddubsw` (AVX2) multiply. Every instruction path
// computes the same int32 dot products; only the order of the float sums over groups differs.
//
// Instruction paths: AVX-512 with AMX tiles for prefill (Sapphire Rapids and later), AVX-512 VNNI, AVX2 and
// portable C++, compiled side by side with target attributes and chosen at run time (`set_isa` forces one:
// tests run every path the machine has).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 64;

// AMX is AVX-512 VNNI plus Intel's tile matrix unit (Sapphire Rapids and later), used for prefill only
enum Isa { PORTABLE = 0, AVX2 = 1, AVX512 = 2, AMX = 3 };

// AMX-TILE and AMX-INT8 in CPUID leaf 7, and the kernel's permission to use the tile state (Linux asks
// each process to request it: without it the first tile instruction faults)
bool amx_usable() {
#if defined(__linux__) && defined(__x86_64__)
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
  if (!tile || !int8) return false;
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return amx_usable() ? AMX : AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return PORTABLE;
}

int g_isa = -1;

int isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

// functions compiled for one instruction set each, called only after `isa()` says the CPU has it
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma")))
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,amx-tile,amx-int8")))

const char* isa_name(int i) {
  return i == AMX ? "avx512-amx" : i == AVX512 ? "avx512-vnni" : i == AVX2 ? "avx2" : "portable";
}

// ---------------------------------------------------------------------------------------------------
// Weights

struct QLinear {
  int64_t out = 0, in = 0, kpad = 0, group = 0, ngroups = 1;
  int bits = 0;  // 0: float weight (`weight`), else codes in `data`
  int a = 1, b = 0;
  torch::Tensor data;    // uint8 [out, kpad * bits / 8]
  torch::Tensor scale;   // f32 [out, ngroups]
  torch::Tensor offset;  // f32 [out, ngroups] or undefined
  torch::Tensor bias;    // f32 [out] or undefined
  torch::Tensor weight;  // f32 [out, in] when bits == 0

  int64_t rowbytes() const { return kpad * bits / 8; }
  int64_t chunks_per_group() const { return group / CHUNK; }
  int64_t nbytes() const {
    auto n = [](const torch::Tensor& t) { return t.defined() ? t.numel() * (int64_t)t.element_size() : 0; };
    return n(data) + n(scale) + n(offset) + n(bias) + n(weight);
  }
};

using QLinearPtr = std::shared_ptr<QLinear>;

int64_t padded(int64_t in) { return (in + CHUNK - 1) / CHUNK * CHUNK; }

// u uint8 [out, in] -> packed uint8 [out, kpad * bits / 8] (padding codes are 0)
torch::Tensor pack_codes(torch::Tensor u, int64_t bits) {
  TORCH_CHECK(u.dtype() == torch::kUInt8 && u.dim() == 2, "pack_codes: expected uint8 [out, in]");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "pack_codes: bits must be 1, 2, 4 or 8");
  auto uc = u.contiguous();
  const int64_t out = uc.size(0), in = uc.size(1), kpad = padded(in), rowbytes = kpad * bits / 8;
  auto dst = torch::zeros({out, rowbytes}, torch::kUInt8);
  const uint8_t* src = uc.data_ptr<uint8_t>();
  uint8_t* d = dst.data_ptr<uint8_t>();
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    std::vector<uint8_t> row(kpad, 0);
    for (int64_t o = o0; o < o1; ++o) {
      std::memcpy(row.data(), src + o * in, in);
      uint8_t* r = d + o * rowbytes;
      for (int64_t ch = 0; ch < kpad / CHUNK; ++ch) {
        const uint8_t* c = row.data() + ch * CHUNK;
        if (bits == 8) {
          std::memcpy(r + ch * 64, c, 64);
        } else if (bits == 4) {
          for (int j = 0; j < 32; ++j) r[ch * 32 + j] = (uint8_t)((c[j] & 15) | (c[j + 32] & 15) << 4);
        } else if (bits == 2) {
          for (int j = 0; j < 16; ++j)
            r[ch * 16 + j] = (uint8_t)((c[j] & 3) | (c[j + 16] & 3) << 2 | (c[j + 32] & 3) << 4 | (c[j + 48] & 3) << 6);
        } else {
          uint64_t word = 0;
          for (int j = 0; j < 64; ++j) word |= (uint64_t)(c[j] & 1) << j;
          std::memcpy(r + ch * 8, &word, 8);
        }
      }
    }
  });
  return dst;
}

// packed row chunk -> 64 unsigned codes (portable; also used to widen row tiles for prefill)
inline void unpack_chunk(const uint8_t* p, int bits, uint8_t* u) {
  if (bits == 8) {
    std::memcpy(u, p, 64);
  } else if (bits == 4) {
    for (int j = 0; j < 32; ++j) { u[j] = p[j] & 15; u[j + 32] = p[j] >> 4; }
  } else if (bits == 2) {
    for (int j = 0; j < 16; ++j) {
      u[j] = p[j] & 3; u[j + 16] = (p[j] >> 2) & 3; u[j + 32] = (p[j] >> 4) & 3; u[j + 48] = p[j] >> 6;
    }
  } else {
    uint64_t word;
    std::memcpy(&word, p, 8);
    for (int j = 0; j < 64; ++j) u[j] = (word >> j) & 1;
  }
}

QLinearPtr make_linear(torch::Tensor data, torch::Tensor scale, std::optional<torch::Tensor> offset,
                       std::optional<torch::Tensor> bias, int64_t in, int64_t group, int64_t bits, int64_t a,
                       int64_t b) {
  auto L = std::make_shared<QLinear>();
  L->in = in;
  L->kpad = padded(in);
  L->bits = (int)bits;
  L->a = (int)a;
  L->b = (int)b;
  TORCH_CHECK(data.dtype() == torch::kUInt8 && data.dim() == 2 && data.is_contiguous(),
              "make_linear: data must be contiguous uint8 [out, rowbytes]");
  L->out = data.size(0);
  TORCH_CHECK(data.size(1) == L->rowbytes(), "make_linear: data rows hold ", data.size(1), " bytes, expected ",
              L->rowbytes());
  L->group = group <= 0 || group >= L->kpad ? L->kpad : group;
  TORCH_CHECK(L->group % CHUNK == 0, "make_linear: group size must be a multiple of 64, got ", group);
  L->ngroups = (L->in + L->group - 1) / L->group;
  TORCH_CHECK(scale.dtype() == torch::kFloat && scale.dim() == 2 && scale.size(0) == L->out &&
                  scale.size(1) == L->ngroups && scale.is_contiguous(),
              "make_linear: scale must be contiguous f32 [out, ngroups]");
  L->data = data;
  L->scale = scale;
  if (offset) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->dtype() == torch::kFloat && offset->is_contiguous(),
                "make_linear: offset must be contiguous f32 shaped like scale");
    L->offset = *offset;
  }
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == L->out && bias->dtype() == torch::kFloat, "make_linear: bias");
    L->bias = bias->contiguous();
  }
  return L;
}

QLinearPtr make_float_linear(torch::Tensor weight, std::optional<torch::Tensor> bias) {
  auto L = std::make_shared<QLinear>();
  TORCH_CHECK(weight.dim() == 2 && weight.dtype() == torch::kFloat, "make_float_linear: f32 [out, in]");
  L->weight = weight.contiguous();
  L->out = weight.size(0);
  L->in = weight.size(1);
  L->kpad = L->in;
  if (bias) L->bias = bias->contiguous().to(torch::kFloat);
  return L;
}

// ---------------------------------------------------------------------------------------------------
// Activations: int8 per token, zero-padded to kpad, with zero rows past M for the token tiles.

constexpr int64_t AMX_TOKENS = 32;  // tokens per AMX pass (two 16-row tiles)

struct Acts {
  int64_t M = 0, kpad = 0;
  std::vector<int8_t> q;
  std::vector<float> s;
  std::vector<int32_t> csum;  // [M, kpad / 64]: sum of the int8 values of each chunk
  std::vector<int32_t> tiled;  // the prefill kernel's layout of q (tile_activations), when it runs
};

// one token: q = round(x * (1 / s)) (nearest, ties to even) with s = max|x| / 127; returns s. Chunk sums go
// to csum. The AVX-512 path computes exactly the same values.
float quantize_row_portable(const float* x, int64_t in, int64_t kpad, int8_t* q, int32_t* csum) {
  float amax = 0.f;
  for (int64_t k = 0; k < in; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
  for (int64_t k = 0; k < in; ++k) q[k] = (int8_t)std::nearbyint(x[k] * inv);
  for (int64_t ch = 0; ch < kpad / CHUNK; ++ch) {
    int32_t sum = 0;
    for (int j = 0; j < CHUNK; ++j) sum += q[ch * CHUNK + j];
    csum[ch] = sum;
  }
  return s;
}

TARGET_AVX512 float quantize_row_avx512(const float* x, int64_t in, int64_t kpad, int8_t* q, int32_t* csum) {
  // four independent max chains (one would wait on vmaxps' latency every 16 values)
  __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
  int64_t k = 0;
  for (; k + 64 <= in; k += 64) {
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(x + k + 16)));
    m2 = _mm512_max_ps(m2, _mm512_abs_ps(_mm512_loadu_ps(x + k + 32)));
    m3 = _mm512_max_ps(m3, _mm512_abs_ps(_mm512_loadu_ps(x + k + 48)));
  }
  __m512 mx = _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3));
  for (; k + 16 <= in; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  if (k < in) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps((__mmask16)((1u << (in - k)) - 1), x + k)));
  const float amax = _mm512_reduce_max_ps(mx);
  const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
  const __m512 vinv = _mm512_set1_ps(inv);
  // the 4 x 16 int32 of a chunk -> 64 int8 in order: two saturating packs interleave them per 128-bit lane
  // (dword 4L + j holds vector j's elements 4L..4L+3), one dword permutation undoes that
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (int64_t ch = 0; ch < kpad / CHUNK; ++ch) {
    const int64_t at = ch * CHUNK;
    __m512i qi[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t from = at + v * 16;
      const __m512 xv = from + 16 <= in ? _mm512_loadu_ps(x + from)
                        : _mm512_maskz_loadu_ps(from >= in ? 0 : (__mmask16)((1u << (in - from)) - 1), x + from);
      qi[v] = _mm512_cvtps_epi32(_mm512_mul_ps(xv, vinv));
    }
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(qi[0], qi[1]), _mm512_add_epi32(qi[2], qi[3]));
    const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(qi[0], qi[1]), _mm512_packs_epi32(qi[2], qi[3]));
    _mm512_storeu_si512((void*)(q + at), _mm512_permutexvar_epi32(order, bytes));
    csum[ch] = _mm512_reduce_add_epi32(sum);
  }
  return s;
}

void quantize_acts(const float* x, int64_t M, int64_t in, int64_t ldx, int64_t kpad, Acts& A) {
  A.M = M;
  A.kpad = kpad;
  const int64_t nch = kpad / CHUNK;
  A.q.assign(std::max(M + 3, (M + AMX_TOKENS - 1) / AMX_TOKENS * AMX_TOKENS) * kpad, 0);  // whole AMX token tiles
  A.s.assign(M, 1.f);
  A.csum.assign(M * nch, 0);
  const bool simd = isa() >= AVX512;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* q = A.q.data() + m * kpad;
      int32_t* cs = A.csum.data() + m * nch;
      A.s[m] = simd ? quantize_row_avx512(x + m * ldx, in, kpad, q, cs) : quantize_row_portable(x + m * ldx, in, kpad, q, cs);
    }
  });
}

// y = sx * (sum_g scale_g * a * dot_g - sum_g (scale_g * bterm - offset_g) * xsum_g) + bias, where dot_g is
// sum (u - shift) x over group g (shift = 128 on the AVX2 8-bit path, else 0) and bterm = b - a * shift.
// Built once per call: raw pointers and each token's per-group activation sums, so that the per-output
// work is a few multiply-adds.
struct Epilogue {
  const float* scale = nullptr;
  const float* offset = nullptr;
  const float* bias = nullptr;
  const float* sx = nullptr;
  int64_t ngroups = 1;
  float a = 1.f;
  std::vector<float> xsum;  // [M, ngroups]

  Epilogue(const QLinear& L, const Acts& A)
      : scale(L.scale.data_ptr<float>()), offset(L.offset.defined() ? L.offset.data_ptr<float>() : nullptr),
        bias(L.bias.defined() ? L.bias.data_ptr<float>() : nullptr), sx(A.s.data()), ngroups(L.ngroups),
        a((float)L.a), xsum(A.M * L.ngroups, 0.f) {
    const int64_t nch = A.kpad / CHUNK, cpg = L.chunks_per_group();
    for (int64_t m = 0; m < A.M; ++m)
      for (int64_t ch = 0; ch < nch; ++ch) xsum[m * ngroups + std::min(ch / cpg, ngroups - 1)] += (float)A.csum[m * nch + ch];
  }

  // sum_g (scale_g * bterm - offset_g) * xsum_g of row o, token m
  inline float correction(int64_t o, int64_t m, int bterm) const {
    const float* sc = scale + o * ngroups;
    const float* xs = xsum.data() + m * ngroups;
    float corr = 0.f;
    if (offset) {
      const float* off = offset + o * ngroups;
      for (int64_t g = 0; g < ngroups; ++g) corr += (sc[g] * (float)bterm - off[g]) * xs[g];
    } else {
      for (int64_t g = 0; g < ngroups; ++g) corr += sc[g] * xs[g];
      corr *= (float)bterm;
    }
    return corr;
  }

  inline float operator()(int64_t o, int64_t m, float scaled_dot, int bterm) const {
    const float y = sx[m] * (a * scaled_dot - correction(o, m, bterm));
    return bias ? y + bias[o] : y;
  }
};

// ---- portable -------------------------------------------------------------------------------------

void rows_portable(const QLinear& L, const Acts& A, const Epilogue& E, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  const int64_t nch = L.kpad / CHUNK, cpg = L.chunks_per_group(), rb = L.rowbytes(), cb = CHUNK * L.bits / 8;
  const uint8_t* w = L.data.data_ptr<uint8_t>();
  uint8_t u[CHUNK];
  for (int64_t o = o0; o < o1; ++o) {
    const float* sc = E.scale + o * L.ngroups;
    for (int64_t m = 0; m < A.M; ++m) {
      const int8_t* x = A.q.data() + m * A.kpad;
      float acc = 0.f;
      for (int64_t g = 0; g < L.ngroups; ++g) {
        int32_t dot = 0;
        for (int64_t ch = g * cpg; ch < std::min(nch, (g + 1) * cpg); ++ch) {
          unpack_chunk(w + o * rb + ch * cb, L.bits, u);
          for (int j = 0; j < CHUNK; ++j) dot += (int32_t)u[j] * x[ch * CHUNK + j];
        }
        acc += sc[g] * (float)dot;
      }
      y[m * ldy + o] = E(o, m, acc, L.b);
    }
  }
}

// ---- AVX-512 VNNI ---------------------------------------------------------------------------------


// acc += u8 a . s8 b in place. The intrinsic returns a new value, and with many accumulators GCC then copies
// (and spills) them around every instruction; the asm keeps each accumulator in its register.
TARGET_AVX512 inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// The decode kernels skip the shifts: the chunk's bytes are broadcast to every lane that needs them and
// each lane keeps its own bit field in place, so lane s of a 2-bit chunk holds u * 4^s (4-bit: the upper
// half holds u * 16). Products stay in range (192 * 127 * 4 per vpdpbusd lane) and every lane's integer sum
// is a multiple of its factor, so shifting the int32 sums right (`lane_unshift`) before any float work is exact.
template <int BITS>
TARGET_AVX512 inline __m512i fields512(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512((const void*)p);
  } else if constexpr (BITS == 4) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_and_si512(v, _mm512_inserti64x4(_mm512_set1_epi8(0x0F), _mm256_set1_epi8((char)0xF0), 1));
  } else if constexpr (BITS == 2) {
    const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));
    return _mm512_and_si512(v, _mm512_set_epi32(0xC0C0C0C0, 0xC0C0C0C0, 0xC0C0C0C0, 0xC0C0C0C0, 0x30303030,
                                                 0x30303030, 0x30303030, 0x30303030, 0x0C0C0C0C, 0x0C0C0C0C,
                                                 0x0C0C0C0C, 0x0C0C0C0C, 0x03030303, 0x03030303, 0x03030303, 0x03030303));
  } else {  // 1 bit: the chunk's 64-bit word is a byte mask
    uint64_t word;
    std::memcpy(&word, p, 8);
    return _mm512_maskz_mov_epi8((__mmask64)word, _mm512_set1_epi8(1));
  }
}

// the lanes' factors removed by right shifts of their int32 sums (exact: each is a multiple of its factor)
template <int BITS>
TARGET_AVX512 inline __m512i lane_unshift(__m512i v) {
  if constexpr (BITS == 4) {
    return _mm512_srav_epi32(v, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(4), 1));
  } else if constexpr (BITS == 2) {
    return _mm512_srav_epi32(v, _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0));
  } else {
    return v;
  }
}

TARGET_AVX512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// one token, ROWS rows at a time: independent accumulators overlap the dependent vpdpbusd chains (ROWS is a
// compile-time constant so that they stay in registers)
template <int BITS, int ROWS>
TARGET_AVX512 inline void tile_avx512_m1(const QLinear& L, const int8_t* x, const Epilogue& E, float* y, int64_t o,
                                         int64_t m) {
  const int64_t nch = L.kpad / CHUNK, cpg = L.chunks_per_group(), rb = L.rowbytes(), cb = CHUNK * BITS / 8;
  const uint8_t* w = L.data.data_ptr<uint8_t>() + o * rb;
  __m512 facc[ROWS];
  for (int r = 0; r < ROWS; ++r) facc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < L.ngroups; ++g) {
    __m512i acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_si512();
    const int64_t c1 = std::min(nch, (g + 1) * cpg);
    for (int64_t ch = g * cpg; ch < c1; ++ch) {
      const __m512i xv = _mm512_loadu_si512((const void*)(x + ch * CHUNK));
      for (int r = 0; r < ROWS; ++r) dpbusd(acc[r], fields512<BITS>(w + r * rb + ch * cb), xv);
    }
    for (int r = 0; r < ROWS; ++r)
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lane_unshift<BITS>(acc[r])), _mm512_set1_ps(E.scale[(o + r) * L.ngroups + g]),
                                facc[r]);
  }
  for (int r = 0; r < ROWS; ++r) y[o + r] = E(o + r, m, hsum512(facc[r]), L.b);
}

// v[r] (16 vectors) -> one vector of their 16 horizontal sums, in order: three rounds of pairwise lane
// shuffles and adds instead of 16 separate reductions. INT: the vectors hold int32 lanes (cast), summed
// as integers.
template <bool INT>
TARGET_AVX512 inline __m512 add16(__m512 a, __m512 b) {
  if constexpr (INT) return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  else return _mm512_add_ps(a, b);
}

template <bool INT = false>
TARGET_AVX512 inline __m512 reduce16(const __m512* v) {
  __m512 s1[8], s2[4];
  for (int i = 0; i < 8; ++i)
    s1[i] = add16<INT>(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // lanes of s2[i] hold rows 4i..4i+3
    s2[i] = add16<INT>(_mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0x88), _mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0xDD));
  const __m512 t0 = add16<INT>(_mm512_unpacklo_ps(s2[0], s2[1]), _mm512_unpackhi_ps(s2[0], s2[1]));
  const __m512 t1 = add16<INT>(_mm512_unpacklo_ps(s2[2], s2[3]), _mm512_unpackhi_ps(s2[2], s2[3]));
  const __m512 r = add16<INT>(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  // element 4l + j of r is row 4j + l
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), r);
}

// one token, 16 rows: two sub-tiles of 8 independent vpdpbusd chains (enough to hide its latency) per group,
// float accumulators per row, then one reduction and a vectorized epilogue. The 8 int32 accumulators are
// named variables: as an array, GCC kept them on the stack and every vpdpbusd went through a store and a
// reload (measured in an interleaved A/B: up to 1.4x slower per linear, identical results).
#define DEC_EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
template <int BITS>
TARGET_AVX512 inline void tile16_avx512_m1(const QLinear& L, const int8_t* x, const Epilogue& E, float* y, int64_t o,
                                           int64_t m) {
  const int64_t nch = L.kpad / CHUNK, cpg = L.chunks_per_group(), rb = L.rowbytes(), cb = CHUNK * BITS / 8;
  const uint8_t* w = L.data.data_ptr<uint8_t>() + o * rb;
  // the next tile is the next 16 * rb contiguous bytes: ask for it now, as this tile's rows are read
  // interleaved (several streams of small chunks), which the hardware prefetcher follows poorly
  if (o + 32 <= L.out)
    for (int64_t b = 0; b < 16 * rb; b += 64) _mm_prefetch((const char*)(w + 16 * rb + b), _MM_HINT_T0);
  // Per-row scales (one group): each row's int32 lanes are unshifted, reduced as integers (the exact dot
  // product) and scaled, corrected and biased as one vector of 16 rows. Groups: each group's sums are
  // scaled into float accumulators per row.
  const bool per_row = L.ngroups == 1;
  __m512 facc[16];
  for (int r = 0; r < 16; ++r) facc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < L.ngroups; ++g) {
    const int64_t c0 = g * cpg, c1 = std::min(nch, (g + 1) * cpg);
    for (int sub = 0; sub < 16; sub += 8) {
      const uint8_t* ws = w + sub * rb;
#define DEC_ZERO(r) __m512i acc##r = _mm512_setzero_si512();
      DEC_EACH(DEC_ZERO)
      for (int64_t ch = c0; ch < c1; ++ch) {
        const __m512i xv = _mm512_loadu_si512((const void*)(x + ch * CHUNK));
        const uint8_t* p = ws + ch * cb;
#define DEC_STEP(r) dpbusd(acc##r, fields512<BITS>(p + r * rb), xv);
        DEC_EACH(DEC_STEP)
      }
      if (per_row) {
#define DEC_ROW(r) facc[sub + r] = _mm512_castsi512_ps(lane_unshift<BITS>(acc##r));
        DEC_EACH(DEC_ROW)
      } else {
        const float* s = E.scale + (o + sub) * L.ngroups + g;
#define DEC_SCALE(r) facc[sub + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lane_unshift<BITS>(acc##r)), _mm512_set1_ps(s[r * L.ngroups]), facc[sub + r]);
        DEC_EACH(DEC_SCALE)
      }
    }
  }
  __m512 dot, corr;
  if (per_row) {
    const __m512 scale = _mm512_loadu_ps(E.scale + o);
    dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_castps_si512(reduce16<true>(facc))), scale);
    corr = _mm512_mul_ps(scale, _mm512_set1_ps((float)L.b * E.xsum[m]));
    if (E.offset) corr = _mm512_fnmadd_ps(_mm512_loadu_ps(E.offset + o), _mm512_set1_ps(E.xsum[m]), corr);
  } else {
    alignas(64) float c[16];
    for (int r = 0; r < 16; ++r) c[r] = E.correction(o + r, m, L.b);
    dot = reduce16(facc);
    corr = _mm512_load_ps(c);
  }
  __m512 out = _mm512_mul_ps(_mm512_set1_ps(E.sx[m]), _mm512_fmsub_ps(_mm512_set1_ps(E.a), dot, corr));
  if (E.bias) out = _mm512_add_ps(out, _mm512_loadu_ps(E.bias + o));
  _mm512_storeu_ps(y + o, out);
}

// one to a few tokens: the decode tiles, token after token within each 16-row tile (whose codes then stay
// in L1), so a batch of 4 reads the weights once
template <int BITS>
TARGET_AVX512 void rows_avx512_few(const QLinear& L, const Acts& A, const Epilogue& E, float* y, int64_t ldy,
                                   int64_t o0, int64_t o1) {
  const int8_t* x = A.q.data();
  int64_t o = o0;
  for (; o + 16 <= o1; o += 16)
    for (int64_t m = 0; m < A.M; ++m) tile16_avx512_m1<BITS>(L, x + m * A.kpad, E, y + m * ldy, o, m);
  for (; o + 4 <= o1; o += 4)
    for (int64_t m = 0; m < A.M; ++m) tile_avx512_m1<BITS, 4>(L, x + m * A.kpad, E, y + m * ldy, o, m);
  for (; o < o1; ++o)
    for (int64_t m = 0; m < A.M; ++m) tile_avx512_m1<BITS, 1>(L, x + m * A.kpad, E, y + m * ldy, o, m);
}

// Many tokens (prefill): each 16-row block is repacked once per call into the VNNI layout -- 64 bytes per 4
// inputs, int32 lane r holding row r's 4 codes -- so that one vpdpbusd against 4 activation bytes broadcast
// to every lane advances 16 rows' dot products and no horizontal sum is ever needed. The activations are
// laid out once per call as [token tile][inputs / 4][token] int32 (`Acts::tiled`), so each broadcast reads
// base + a constant offset. Tiles of 16 rows x 12 tokens, with 12 named accumulators (an array of them ends
// up on the stack), over blocks of at most 512 inputs; each block's int32 sums are scaled into per-token
// float sums.
constexpr int MM_TOKENS = 12;
constexpr int64_t MM_BLOCK = 4096;  // inputs per block (measured: smaller blocks did not help at 576-1536 inputs)
#define MM_EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// 64 codes of one packed row chunk as bytes, in input order (the prefill repack)
template <int BITS>
TARGET_AVX512 inline __m512i codes512(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512((const void*)p);
  } else if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p), low = _mm256_set1_epi8(15);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
  } else if constexpr (BITS == 2) {  // 64-bit lanes shifted by 0, 2, 4, 6 bits per 16 bytes; bits that cross
    const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));  // bytes are masked off
    return _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0)), _mm512_set1_epi8(3));
  } else {
    uint64_t word;
    std::memcpy(&word, p, 8);
    return _mm512_maskz_mov_epi8((__mmask64)word, _mm512_set1_epi8(1));
  }
}

// 16 vectors of 16 int32 -> their transpose (out[k] lane i = r[i] lane k): unpack 32/64-bit, then two
// rounds of 128-bit lane shuffles
TARGET_AVX512 inline void transpose16(const __m512i* r, __m512i* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // lane L of t[i]: rows i, i+1 of elements 4L, 4L+1; of t[i+1]: 4L+2, 4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int q = 0; q < 16; q += 4) {  // lane L of u[q + c]: rows q..q+3 of element 4L + c
    u[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
    u[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
    u[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
    u[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // element 4L + c of rows 4q.. is lane L of u[4q + c]
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    out[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    out[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    out[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// rows r < `rows` of a 16-row block (row stride rb bytes) into the VNNI layout: per chunk, the 16 rows' 16
// int32 quads transposed so that vector k holds quad k of every row. Missing rows are zero.
template <int BITS>
TARGET_AVX512 void repack16(const uint8_t* w, int64_t rb, int64_t nch, int rows, uint8_t* packed) {
  constexpr int64_t cb = CHUNK * BITS / 8;
  for (int64_t ch = 0; ch < nch; ++ch) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? codes512<BITS>(w + i * rb + ch * cb) : _mm512_setzero_si512();
    __m512i t[16];
    transpose16(r, t);
    for (int k = 0; k < 16; ++k) _mm512_storeu_si512((void*)(packed + (ch * 16 + k) * 64), t[k]);
  }
}

// [token][inputs / 4] int32 -> [token tile][inputs / 4][token]: per tile and 16 quads, a transpose
TARGET_AVX512 void tile_activations(Acts& A) {
  const int64_t k4s = A.kpad / 4, tiles = (A.M + MM_TOKENS - 1) / MM_TOKENS;
  A.tiled.resize(tiles * k4s * MM_TOKENS);
  const int32_t* src = (const int32_t*)A.q.data();
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t m0 = tile * MM_TOKENS, live = std::min<int64_t>(MM_TOKENS, A.M - m0);
    int32_t* dst = A.tiled.data() + tile * k4s * MM_TOKENS;
    for (int64_t k0 = 0; k0 < k4s; k0 += 16) {  // kpad is a multiple of 64: k4s of 16
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < live ? _mm512_loadu_si512((const void*)(src + (m0 + i) * k4s + k0)) : _mm512_setzero_si512();
      transpose16(r, t);
      for (int k = 0; k < 16; ++k) _mm512_mask_storeu_epi32(dst + (k0 + k) * MM_TOKENS, (__mmask16)((1u << MM_TOKENS) - 1), t[k]);
    }
  }
}

// One 16-row block of a prefill: its codes in the VNNI layout (`repack16`), and per group the 16 rows'
// scales and corrections (scale * b - offset); rows past `rows` have zero scales.
struct Block16 {
  std::vector<uint8_t> packed;
  std::vector<float> scale, corr;  // [group][row]

  Block16(const QLinear& L) : packed(L.kpad / 4 * 64), scale(L.ngroups * 16), corr(L.ngroups * 16) {}

  TARGET_AVX512 void load(const QLinear& L, const Epilogue& E, int64_t o, int rows) {
    const int64_t rb = L.rowbytes(), nch = L.kpad / CHUNK, G = L.ngroups;
    const uint8_t* w = L.data.data_ptr<uint8_t>() + o * rb;
    switch (L.bits) {
      case 1: repack16<1>(w, rb, nch, rows, packed.data()); break;
      case 2: repack16<2>(w, rb, nch, rows, packed.data()); break;
      case 4: repack16<4>(w, rb, nch, rows, packed.data()); break;
      default: repack16<8>(w, rb, nch, rows, packed.data());
    }
    std::fill(scale.begin(), scale.end(), 0.f);
    std::fill(corr.begin(), corr.end(), 0.f);
    for (int r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        scale[g * 16 + r] = E.scale[(o + r) * G + g];
        corr[g * 16 + r] = scale[g * 16 + r] * (float)L.b - (E.offset ? E.offset[(o + r) * G + g] : 0.f);
      }
  }

  // y[m, o + r] for every token m from facc ([token][16 rows]: sum over groups of scale * integer dot)
  TARGET_AVX512 void store(const Epilogue& E, const float* facc, int64_t M, int64_t o, int rows, float* y,
                           int64_t ldy) const {
    const __mmask16 keep = (__mmask16)(rows >= 16 ? 0xFFFF : (1u << rows) - 1);
    const __m512 bias = E.bias ? _mm512_maskz_loadu_ps(keep, E.bias + o) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m) {
      __m512 c = _mm512_setzero_ps();
      for (int64_t g = 0; g < E.ngroups; ++g)
        c = _mm512_fmadd_ps(_mm512_loadu_ps(corr.data() + g * 16), _mm512_set1_ps(E.xsum[m * E.ngroups + g]), c);
      const __m512 out = _mm512_fmadd_ps(_mm512_set1_ps(E.sx[m]),
                                         _mm512_fmsub_ps(_mm512_set1_ps(E.a), _mm512_loadu_ps(facc + m * 16), c), bias);
      _mm512_mask_storeu_ps(y + m * ldy + o, keep, out);
    }
  }
};

TARGET_AVX512 void rows_avx512_mm(const QLinear& L, const Acts& A, const Epilogue& E, float* y, int64_t ldy,
                                  int64_t o0, int64_t o1) {
  const int64_t k4s = L.kpad / 4, G = L.ngroups, k4_per_group = L.group / 4, M = A.M;
  Block16 B(L);
  std::vector<float> facc_all((M + MM_TOKENS) * 16);  // [token][row] float sums over the blocks done
  for (int64_t o = o0; o < o1; o += 16) {
    const int rows = (int)std::min<int64_t>(16, o1 - o);
    B.load(L, E, o, rows);
    std::fill(facc_all.begin(), facc_all.end(), 0.f);
    // blocks of at most MM_BLOCK inputs within one scale group: the block's codes and each token tile's
    // activations for it stay in L1 while every token tile passes
    for (int64_t g = 0; g < G; ++g) {
      const __m512 s = _mm512_loadu_ps(B.scale.data() + g * 16);
      const int64_t g1 = std::min(k4s, (g + 1) * k4_per_group);
      for (int64_t b0 = g * k4_per_group; b0 < g1; b0 += MM_BLOCK / 4) {
        const int64_t b1 = std::min(g1, b0 + MM_BLOCK / 4);
        for (int64_t m0 = 0; m0 < M; m0 += MM_TOKENS) {
          const int32_t* xt = A.tiled.data() + (m0 / MM_TOKENS) * k4s * MM_TOKENS;
#define MM_ZERO(i) __m512i acc##i = _mm512_setzero_si512();
          MM_EACH(MM_ZERO)
          for (int64_t k4 = b0; k4 < b1; ++k4) {
            const __m512i wv = _mm512_loadu_si512((const void*)(B.packed.data() + k4 * 64));
            const int32_t* xk = xt + k4 * MM_TOKENS;
#define MM_STEP(i) asm("vpdpbusd %2, %1, %0" : "+v"(acc##i) : "v"(wv), "v"(_mm512_set1_epi32(xk[i])));
            MM_EACH(MM_STEP)
          }
          float* f = facc_all.data() + m0 * 16;
#define MM_SCALE(i) _mm512_storeu_ps(f + 16 * i, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc##i), s, _mm512_loadu_ps(f + 16 * i)));
          MM_EACH(MM_SCALE)
        }
      }
    }
    B.store(E, facc_all.data(), M, o, rows, y, ldy);
  }
}

// ---- AMX ------------------------------------------------------------------------------------------
// Prefill on the tile unit: `tdpbsud` multiplies a 16 x 64 int8 tile (16 tokens' activations, 64 inputs)
// by a 16 x 64 uint8 tile in the VNNI layout (64 inputs of 16 rows: exactly `repack16`'s chunk) into 16 x 16
// int32 sums, 16K multiply-adds per instruction. Blocks of 32 rows (two repacked 16-row blocks) x 32 tokens
// keep four accumulator tiles (tmm0-3), two activation tiles (tmm4-5) and two weight tiles (tmm6-7) busy;
// at the end of each scale group the sums go to memory and are scaled into per-token float sums.

struct TileConfig {  // the 64-byte operand of `ldtilecfg`
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TARGET_AMX void rows_amx_mm(const QLinear& L, const Acts& A, const Epilogue& E, float* y, int64_t ldy,
                            int64_t o0, int64_t o1) {
  const int64_t K = L.kpad, G = L.ngroups, cpg = L.chunks_per_group(), nch = K / CHUNK, M = A.M;
  const int64_t Mt = (M + AMX_TOKENS - 1) / AMX_TOKENS * AMX_TOKENS;  // A.q holds zero rows up to Mt
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
  Block16 B0(L), B1(L);
  std::vector<float> facc0(Mt * 16), facc1(Mt * 16);  // [token][row] of each 16-row block
  alignas(64) int32_t sums[4][16 * 16];
  for (int64_t o = o0; o < o1; o += 32) {
    const int rows0 = (int)std::min<int64_t>(16, o1 - o), rows1 = (int)std::clamp<int64_t>(o1 - o - 16, 0, 16);
    B0.load(L, E, o, rows0);
    if (rows1) B1.load(L, E, o + 16, rows1);
    std::fill(facc0.begin(), facc0.end(), 0.f);
    std::fill(facc1.begin(), facc1.end(), 0.f);
    // (blocking the inputs so that a block's weight tiles stay in L1 across token tiles measured no faster)
    for (int64_t m0 = 0; m0 < M; m0 += AMX_TOKENS) {
      const int8_t* x0 = A.q.data() + m0 * K;
      const int8_t* x1 = x0 + 16 * K;
      for (int64_t g = 0; g < G; ++g) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t ch = g * cpg; ch < std::min(nch, (g + 1) * cpg); ++ch) {
          _tile_loadd(4, x0 + ch * CHUNK, K);
          _tile_loadd(5, x1 + ch * CHUNK, K);
          _tile_loadd(6, B0.packed.data() + ch * 16 * 64, 64);
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 5, 6);
          if (rows1) {
            _tile_loadd(7, B1.packed.data() + ch * 16 * 64, 64);
            _tile_dpbsud(2, 4, 7);
            _tile_dpbsud(3, 5, 7);
          }
        }
        _tile_stored(0, sums[0], 64); _tile_stored(1, sums[1], 64);
        if (rows1) { _tile_stored(2, sums[2], 64); _tile_stored(3, sums[3], 64); }
        const int live = (int)std::min<int64_t>(AMX_TOKENS, M - m0);
        const __m512 s0 = _mm512_loadu_ps(B0.scale.data() + g * 16), s1 = _mm512_loadu_ps(B1.scale.data() + g * 16);
        for (int t = 0; t < live; ++t) {  // token m0 + t is row t % 16 of tile t / 16 (+2 for block 1)
          float* f0 = facc0.data() + (m0 + t) * 16;
          _mm512_storeu_ps(f0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[t / 16] + (t % 16) * 16)), s0,
                                               _mm512_loadu_ps(f0)));
          if (rows1) {
            float* f1 = facc1.data() + (m0 + t) * 16;
            _mm512_storeu_ps(f1, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[2 + t / 16] + (t % 16) * 16)),
                                                 s1, _mm512_loadu_ps(f1)));
          }
        }
      }
    }
    B0.store(E, facc0.data(), M, o, rows0, y, ldy);
    if (rows1) B1.store(E, facc1.data(), M, o + 16, rows1, y, ldy);
  }
  _tile_release();
}

// ---- AVX2 -----------------------------------------------------------------------------------------

// 32 codes (half h of a chunk) as unsigned bytes; 8-bit codes come back signed (u - 128), see `dot32`
template <int BITS>
TARGET_AVX2 inline __m256i widen256(const uint8_t* p, int h) {
  if constexpr (BITS == 8) {
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + 32 * h)), _mm256_set1_epi8((char)0x80));
  } else if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p), m = _mm256_set1_epi8(15);
    return h == 0 ? _mm256_and_si256(v, m) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  } else if constexpr (BITS == 2) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
    const __m256i shifts = h == 0 ? _mm256_set_epi64x(2, 2, 0, 0) : _mm256_set_epi64x(6, 6, 4, 4);
    return _mm256_and_si256(_mm256_srlv_epi64(v, shifts), _mm256_set1_epi8(3));
  } else {
    uint32_t bits32;
    std::memcpy(&bits32, p + 4 * h, 4);
    // byte j takes bit j: broadcast the 4 bytes so byte j holds source byte j / 8, then test bit j % 8
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits32),
                                          _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                            0x0101010101010101LL, 0x0000000000000000LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(1));
  }
}

// sum over 32 products into 8 int32 lanes: unsigned codes (< 16) x signed activations never saturate
// vpmaddubsw's int16 pairs; 8-bit codes use |c| and sign(x, c) (|c| <= 128, |x| <= 127 fits int16)
template <int BITS>
TARGET_AVX2 inline __m256i dot32(__m256i wv, __m256i xv) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), ones);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
  }
}

TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS>
TARGET_AVX2 void rows_avx2(const QLinear& L, const Acts& A, const Epilogue& E, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  const int64_t nch = L.kpad / CHUNK, cpg = L.chunks_per_group(), rb = L.rowbytes(), cb = CHUNK * BITS / 8;
  const uint8_t* w = L.data.data_ptr<uint8_t>();
  const int bterm = BITS == 8 ? L.b - L.a * 128 : L.b;
  for (int64_t m = 0; m < A.M; ++m) {
    const int8_t* x = A.q.data() + m * A.kpad;
    for (int64_t o = o0; o < o1; o += 2) {
      const int rows = (int)std::min<int64_t>(2, o1 - o);
      __m256 facc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t g = 0; g < L.ngroups; ++g) {
        __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        const int64_t c1 = std::min(nch, (g + 1) * cpg);
        for (int64_t ch = g * cpg; ch < c1; ++ch)
          for (int h = 0; h < 2; ++h) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + ch * CHUNK + 32 * h));
            for (int r = 0; r < rows; ++r)
              acc[r] = _mm256_add_epi32(acc[r], dot32<BITS>(widen256<BITS>(w + (o + r) * rb + ch * cb, h), xv));
          }
        for (int r = 0; r < rows; ++r)
          facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]),
                                    _mm256_set1_ps(E.scale[(o + r) * L.ngroups + g]), facc[r]);
      }
      for (int r = 0; r < rows; ++r) y[m * ldy + o + r] = E(o + r, m, hsum256(facc[r]), bterm);
    }
  }
}

// ---- dispatch -------------------------------------------------------------------------------------

void rows(const QLinear& L, const Acts& A, const Epilogue& E, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  const int i = isa();
  if (i == AMX && A.M > 4) return rows_amx_mm(L, A, E, y, ldy, o0, o1);
  if (i >= AVX512) {
    if (A.M > 4) return rows_avx512_mm(L, A, E, y, ldy, o0, o1);
    switch (L.bits) {
      case 1: return rows_avx512_few<1>(L, A, E, y, ldy, o0, o1);
      case 2: return rows_avx512_few<2>(L, A, E, y, ldy, o0, o1);
      case 4: return rows_avx512_few<4>(L, A, E, y, ldy, o0, o1);
      default: return rows_avx512_few<8>(L, A, E, y, ldy, o0, o1);
    }
  }
  if (i == AVX2) {
    switch (L.bits) {
      case 1: return rows_avx2<1>(L, A, E, y, ldy, o0, o1);
      case 2: return rows_avx2<2>(L, A, E, y, ldy, o0, o1);
      case 4: return rows_avx2<4>(L, A, E, y, ldy, o0, o1);
      default: return rows_avx2<8>(L, A, E, y, ldy, o0, o1);
    }
  }
  rows_portable(L, A, E, y, ldy, o0, o1);
}

// y[m, :out] (row stride ldy) = x[m, :in] (row stride ldx) @ W.T (+ bias), for a quantized or float linear
void linear_into(const QLinear& L, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, Acts& A) {
  if (L.bits == 0) {
    auto xt = torch::from_blob(const_cast<float*>(x), {M, L.in}, {ldx, 1}, torch::kFloat);
    auto yt = torch::from_blob(y, {M, L.out}, {ldy, 1}, torch::kFloat);
    yt.copy_(L.bias.defined() ? torch::addmm(L.bias, xt, L.weight.t()) : torch::mm(xt, L.weight.t()));
    return;
  }
  if (A.M != M || A.kpad != L.kpad) {
    quantize_acts(x, M, L.in, ldx, L.kpad, A);
    A.tiled.clear();
  }
  if (isa() == AVX512 && M > 4 && A.tiled.empty()) tile_activations(A);  // the VNNI prefill's layout
  const Epilogue E(L, A);
  const int64_t blocks = (L.out + 15) / 16;  // 16-row tiles (the AVX-512 decode and prefill tile)
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    rows(L, A, E, y, ldy, b0 * 16, std::min(L.out, b1 * 16));
  });
}

torch::Tensor linear(const QLinear& L, torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.in, "linear: expected x [tokens, ", L.in, "], got ", x.sizes());
  auto xc = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({xc.size(0), L.out}, torch::kFloat);
  Acts A;
  A.M = -1;
  linear_into(L, xc.data_ptr<float>(), xc.size(0), L.in, y.data_ptr<float>(), L.out, A);
  return y;
}

// rows `ids` of the weight as floats (an embedding lookup from a tied head's codes): scale * (a * u - b) + offset
torch::Tensor lookup_rows(const QLinear& L, torch::Tensor ids) {
  TORCH_CHECK(L.bits > 0, "lookup_rows: a float linear holds its own weight");
  auto flat = ids.to(torch::kLong).contiguous().view(-1);
  const int64_t n = flat.size(0), nch = L.kpad / CHUNK, cpg = L.chunks_per_group(), rb = L.rowbytes(),
                cb = CHUNK * L.bits / 8;
  auto out = torch::empty({n, L.in}, torch::kFloat);
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < L.out, "lookup_rows: id ", id[i], " is outside 0..", L.out - 1);
  const uint8_t* w = L.data.data_ptr<uint8_t>();
  const float* sc = L.scale.data_ptr<float>();
  const float* off = L.offset.defined() ? L.offset.data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    uint8_t u[CHUNK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = id[i];
      for (int64_t ch = 0; ch < nch; ++ch) {
        unpack_chunk(w + row * rb + ch * cb, L.bits, u);
        const int64_t g = std::min(ch / cpg, L.ngroups - 1);
        const float s = sc[row * L.ngroups + g], o = off ? off[row * L.ngroups + g] : 0.f;
        for (int j = 0; j < CHUNK && ch * CHUNK + j < L.in; ++j)
          y[i * L.in + ch * CHUNK + j] = s * (float)(L.a * (int)u[j] - L.b) + o;
      }
    }
  });
  return out.view([&] { auto s = ids.sizes().vec(); s.push_back(L.in); return s; }());
}

// ---------------------------------------------------------------------------------------------------
// LLaMA-family decode step

#define VECTORIZE __attribute__((target_clones("avx512f", "arch=haswell", "default")))

VECTORIZE void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / (float)n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

// x[:half] * cos - x[half:] * sin | x[half:] * cos + x[:half] * sin  (transformers' rotate_half form)
VECTORIZE void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t h = hd / 2;
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + h] = x2 * cos[i + h] + x1 * sin[i + h];
  }
}

// Attention of the G query heads that share one kv head (grouped-query attention) against cached positions
// 0..n-1: out[g] = softmax(q[g] . K * scale) V. Each cached row is read once for all G queries. The cache
// holds float or IEEE half (`Half` = uint16_t storage) rows of hd values. Explicit SIMD paths: a
// per-position call to a generic function (or libm's scalar expf) costs more than the arithmetic at decode.
using Half = uint16_t;

inline float load1(const float* p) { return *p; }
inline float load1(const Half* p) { return (float)c10::Half(*p, c10::Half::from_bits()); }

template <typename T>
void attend_portable(const float* q, int64_t G, const T* K, const T* V, int64_t n, int64_t hd, float scale,
                     float* score, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float* sc = score + g * n;
    float mx = -INFINITY;
    for (int64_t p = 0; p < n; ++p) {
      float s = 0.f;
      for (int64_t i = 0; i < hd; ++i) s += q[g * hd + i] * load1(K + p * hd + i);
      sc[p] = s * scale;
      mx = std::max(mx, sc[p]);
    }
    float sum = 0.f;
    for (int64_t p = 0; p < n; ++p) sum += (sc[p] = std::exp(sc[p] - mx));
    float* o = out + g * hd;
    std::fill(o, o + hd, 0.f);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t i = 0; i < hd; ++i) o[i] += sc[p] / sum * load1(V + p * hd + i);
  }
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * e^r with n = round(x / ln2), r = x - n ln2
// (ln2 split in two for exactness), e^r by its degree-6 Taylor polynomial (relative error ~2e-7). One
// function per vector width below; these are the numbers they share.
constexpr float EXP_FLOOR = -87.f, LOG2E = 1.44269504f, LN2_HI = 0.693145752f, LN2_LO = 1.42860677e-6f;
constexpr float EXP_TAYLOR[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};  // highest power first

TARGET_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x));
  __m512 p = _mm512_set1_ps(EXP_TAYLOR[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_TAYLOR[i]));
  return _mm512_scalef_ps(p, n);
}

TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TARGET_AVX512 inline __m512 load16(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// softmax of G rows of n scores (row stride `stride`, padded to a multiple of 16 with -inf) in place
TARGET_AVX512 void softmax_rows512(float* score, int64_t G, int64_t n, int64_t stride) {
  const int64_t full = (n + 15) / 16 * 16;
  for (int64_t g = 0; g < G; ++g) {
    float* sc = score + g * stride;
    for (int64_t p = n; p < full; ++p) sc[p] = -INFINITY;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t p = 0; p < full; p += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sc + p));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t p = 0; p < full; p += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + p), top));
      _mm512_storeu_ps(sc + p, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t p = 0; p < full; p += 16) _mm512_storeu_ps(sc + p, _mm512_mul_ps(_mm512_loadu_ps(sc + p), inv));
  }
}

// VECS = hd / 16 (4 for head_dim 64, 8 for 128); G <= 8 queries per kv head
template <int VECS, typename T>
TARGET_AVX512 void attend_avx512(const float* q, int64_t G, const T* K, const T* V, int64_t n, float scale,
                                 float* score, float* out) {
  constexpr int64_t hd = VECS * 16;
  const int64_t stride = (n + 15) / 16 * 16;
  for (int64_t p = 0; p < n; ++p) {
    __m512 k[VECS];
    for (int v = 0; v < VECS; ++v) k[v] = load16(K + p * hd + 16 * v);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * hd), k[0]);
      for (int v = 1; v < VECS; ++v) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * hd + 16 * v), k[v], acc);
      score[g * stride + p] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  softmax_rows512(score, G, n, stride);
  for (int64_t g0 = 0; g0 < G; g0 += 2) {  // two query heads at a time: 2 * VECS accumulators
    const int64_t gs = std::min<int64_t>(2, G - g0);
    __m512 o[2][VECS];
    for (int g = 0; g < 2; ++g)
      for (int v = 0; v < VECS; ++v) o[g][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
      const __m512 w0 = _mm512_set1_ps(score[g0 * stride + p]);
      const __m512 w1 = _mm512_set1_ps(gs > 1 ? score[(g0 + 1) * stride + p] : 0.f);
      for (int v = 0; v < VECS; ++v) {
        const __m512 vv = load16(V + p * hd + 16 * v);
        o[0][v] = _mm512_fmadd_ps(w0, vv, o[0][v]);
        o[1][v] = _mm512_fmadd_ps(w1, vv, o[1][v]);
      }
    }
    for (int64_t g = 0; g < gs; ++g)
      for (int v = 0; v < VECS; ++v) _mm512_storeu_ps(out + (g0 + g) * hd + 16 * v, o[g][v]);
  }
}

#define TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

TARGET_AVX2_F16C inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(EXP_FLOOR));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x));
  __m256 p = _mm256_set1_ps(EXP_TAYLOR[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_TAYLOR[i]));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

TARGET_AVX2_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TARGET_AVX2_F16C inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// as attend_avx512, 8 lanes; VECS = hd / 8 (8 for head_dim 64, 16 for 128)
template <int VECS, typename T>
TARGET_AVX2_F16C void attend_avx2(const float* q, int64_t G, const T* K, const T* V, int64_t n, float scale,
                                  float* score, float* out) {
  constexpr int64_t hd = VECS * 8;
  const int64_t stride = (n + 15) / 16 * 16, full = (n + 7) / 8 * 8;
  for (int64_t p = 0; p < n; ++p) {
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q + g * hd), load8(K + p * hd));
      for (int v = 1; v < VECS; ++v) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + 8 * v), load8(K + p * hd + 8 * v), acc);
      score[g * stride + p] = hsum256(acc) * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sc = score + g * stride;
    for (int64_t p = n; p < full; ++p) sc[p] = -INFINITY;
    float top = -INFINITY;
    for (int64_t p = 0; p < n; ++p) top = std::max(top, sc[p]);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t p = 0; p < full; p += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + p), _mm256_set1_ps(top)));
      _mm256_storeu_ps(sc + p, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum256(sum));
    __m256 o[VECS];
    for (int v = 0; v < VECS; ++v) o[v] = _mm256_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
      const __m256 wp = _mm256_set1_ps(sc[p]);
      for (int v = 0; v < VECS; ++v) o[v] = _mm256_fmadd_ps(wp, load8(V + p * hd + 8 * v), o[v]);
    }
    for (int v = 0; v < VECS; ++v) _mm256_storeu_ps(out + g * hd + 8 * v, _mm256_mul_ps(o[v], inv));
  }
}

template <typename T>
void attend(const float* q, int64_t G, const T* K, const T* V, int64_t n, int64_t hd, float scale, float* score,
            float* out) {
  if (isa() >= AVX512 && hd == 64) return attend_avx512<4>(q, G, K, V, n, scale, score, out);
  if (isa() >= AVX512 && hd == 128) return attend_avx512<8>(q, G, K, V, n, scale, score, out);
  if (isa() >= AVX2 && hd == 64) return attend_avx2<8>(q, G, K, V, n, scale, score, out);
  if (isa() >= AVX2 && hd == 128) return attend_avx2<16>(q, G, K, V, n, scale, score, out);
  attend_portable(q, G, K, V, n, hd, scale, score, out);
}

VECTORIZE void swiglu(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

struct Layer {
  torch::Tensor attn_norm, mlp_norm;
  std::vector<QLinearPtr> qkv, gate_up;  // parts whose outputs are concatenated: fused or separate
  QLinearPtr o, down;
};

struct Decoder {
  int64_t hidden, heads, kv_heads, head_dim, intermediate;
  float eps;
  std::vector<Layer> layers;
  torch::Tensor cos, sin;      // [max_positions, head_dim]
  torch::Tensor kcache, vcache;  // [layers, batch, kv_heads, max_len, head_dim]

  Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
          torch::Tensor cos, torch::Tensor sin)
      : hidden(hidden), heads(heads), kv_heads(kv_heads), head_dim(head_dim), intermediate(intermediate),
        eps((float)eps), cos(cos.to(torch::kFloat).contiguous()), sin(sin.to(torch::kFloat).contiguous()) {
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "Decoder: heads must be a multiple of kv_heads");
    TORCH_CHECK(this->cos.dim() == 2 && this->cos.size(1) == head_dim && this->sin.sizes() == this->cos.sizes(),
                "Decoder: cos/sin must be [positions, head_dim]");
  }

  void add_layer(torch::Tensor attn_norm, std::vector<QLinearPtr> qkv, QLinearPtr o, torch::Tensor mlp_norm,
                 std::vector<QLinearPtr> gate_up, QLinearPtr down) {
    auto out_sum = [](const std::vector<QLinearPtr>& parts) {
      int64_t n = 0;
      for (auto& p : parts) n += p->out;
      return n;
    };
    TORCH_CHECK(out_sum(qkv) == (heads + 2 * kv_heads) * head_dim, "add_layer: q/k/v rows do not match the heads");
    TORCH_CHECK(out_sum(gate_up) == 2 * intermediate, "add_layer: gate/up rows do not match intermediate size");
    TORCH_CHECK(o->out == hidden && down->out == hidden && down->in == intermediate, "add_layer: o/down shapes");
    layers.push_back({attn_norm.to(torch::kFloat).contiguous(), mlp_norm.to(torch::kFloat).contiguous(), qkv,
                      gate_up, o, down});
  }

  void set_cache(torch::Tensor k, torch::Tensor v) {
    TORCH_CHECK(k.dim() == 5 && k.size(0) == (int64_t)layers.size() && k.size(2) == kv_heads &&
                    k.size(4) == head_dim && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous() &&
                    (k.dtype() == torch::kFloat || k.dtype() == torch::kHalf) && v.dtype() == k.dtype(),
                "set_cache: expected contiguous f32 or f16 [layers, batch, kv_heads, max_len, head_dim] k and v");
    TORCH_CHECK(k.size(3) <= cos.size(0), "set_cache: max_len ", k.size(3), " exceeds the rotary table (",
                cos.size(0), " positions)");
    kcache = k;
    vcache = v;
  }

  // x [B, T, hidden] (the embedded tokens at positions pos..pos+T-1) -> the last block's output, in place
  torch::Tensor forward(torch::Tensor x, int64_t pos) {
    TORCH_CHECK(kcache.defined(), "forward: call set_cache first");
    TORCH_CHECK(x.dim() == 3 && x.size(2) == hidden && x.dtype() == torch::kFloat && x.is_contiguous(),
                "forward: expected contiguous f32 [batch, tokens, hidden]");
    const int64_t B = x.size(0), T = x.size(1), N = B * T, maxlen = kcache.size(3);
    TORCH_CHECK(B == kcache.size(1), "forward: batch ", B, " but the cache holds ", kcache.size(1));
    TORCH_CHECK(pos >= 0 && pos + T <= maxlen, "forward: positions ", pos, "..", pos + T, " exceed the cache (",
                maxlen, ")");
    const int64_t qw = heads * head_dim, kw = kv_heads * head_dim, qkvw = qw + 2 * kw;
    float* xs = x.data_ptr<float>();
    std::vector<float> h(N * hidden), qkv(N * qkvw), att(N * qw), gu(N * 2 * intermediate), act(N * intermediate);
    Acts A;
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& ly = layers[l];
      for (int64_t n = 0; n < N; ++n)
        rmsnorm(xs + n * hidden, ly.attn_norm.data_ptr<float>(), eps, hidden, h.data() + n * hidden);
      A.M = -1;
      int64_t col = 0;
      for (auto& p : ly.qkv) {
        linear_into(*p, h.data(), N, hidden, qkv.data() + col, qkvw, A);
        col += p->out;
      }
      const int64_t layer_at = l * B * kv_heads * maxlen * head_dim;
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t b = n / T, p = pos + n % T;
          const float* c = cos.data_ptr<float>() + p * head_dim;
          const float* s = sin.data_ptr<float>() + p * head_dim;
          float* row = qkv.data() + n * qkvw;
          for (int64_t hh = 0; hh < heads + kv_heads; ++hh) rope(row + hh * head_dim, c, s, head_dim);
          for (int64_t kh = 0; kh < kv_heads; ++kh) {
            const int64_t at = layer_at + ((b * kv_heads + kh) * maxlen + p) * head_dim;
            store_row(kcache, at, row + qw + kh * head_dim);
            store_row(vcache, at, row + qw + kw + kh * head_dim);
          }
        }
      });
      if (kcache.dtype() == torch::kHalf)
        attention(qkv.data(), qkvw, (const Half*)kcache.data_ptr<at::Half>() + layer_at,
                  (const Half*)vcache.data_ptr<at::Half>() + layer_at, B, T, pos, maxlen, att.data());
      else
        attention(qkv.data(), qkvw, kcache.data_ptr<float>() + layer_at, vcache.data_ptr<float>() + layer_at, B, T,
                  pos, maxlen, att.data());
      A.M = -1;
      std::vector<float> proj(N * hidden);
      linear_into(*ly.o, att.data(), N, qw, proj.data(), hidden, A);
      for (int64_t i = 0; i < N * hidden; ++i) xs[i] += proj[i];
      for (int64_t n = 0; n < N; ++n)
        rmsnorm(xs + n * hidden, ly.mlp_norm.data_ptr<float>(), eps, hidden, h.data() + n * hidden);
      A.M = -1;
      col = 0;
      for (auto& p : ly.gate_up) {
        linear_into(*p, h.data(), N, hidden, gu.data() + col, 2 * intermediate, A);
        col += p->out;
      }
      for (int64_t n = 0; n < N; ++n)
        swiglu(gu.data() + n * 2 * intermediate, gu.data() + n * 2 * intermediate + intermediate,
               act.data() + n * intermediate, intermediate);
      A.M = -1;
      linear_into(*ly.down, act.data(), N, intermediate, proj.data(), hidden, A);
      for (int64_t i = 0; i < N * hidden; ++i) xs[i] += proj[i];
    }
    return x;
  }

  void store_row(torch::Tensor& cache, int64_t at, const float* row) {
    if (cache.dtype() == torch::kHalf) {
      at::Half* dst = cache.data_ptr<at::Half>() + at;
      for (int64_t i = 0; i < head_dim; ++i) dst[i] = at::Half(row[i]);
    } else {
      std::memcpy(cache.data_ptr<float>() + at, row, head_dim * sizeof(float));
    }
  }

  // att[n, h * hd] for the queries in qkv (row stride qkvw) against cached keys/values 0..pos+t
  template <typename T>
  void attention(const float* qkv, int64_t qkvw, const T* kc, const T* vc, int64_t B, int64_t T_, int64_t pos,
                 int64_t maxlen, float* att) {
    const int64_t group = heads / kv_heads, qw = heads * head_dim;
    const float scale = 1.f / std::sqrt((float)head_dim);
    if (T_ > 1) {  // prefill: ATen's fused attention over the cache written so far
      auto opts = torch::TensorOptions().dtype(torch::kFloat);
      auto copts = torch::TensorOptions().dtype(std::is_same_v<T, float> ? torch::kFloat : torch::kHalf);
      auto q = torch::from_blob(const_cast<float*>(qkv), {B, T_, heads, head_dim}, {T_ * qkvw, qkvw, head_dim, 1}, opts)
                   .transpose(1, 2);
      const int64_t len = pos + T_;
      auto k = torch::from_blob((void*)kc, {B, kv_heads, maxlen, head_dim}, copts).narrow(2, 0, len).to(torch::kFloat);
      auto v = torch::from_blob((void*)vc, {B, kv_heads, maxlen, head_dim}, copts).narrow(2, 0, len).to(torch::kFloat);
      std::optional<torch::Tensor> mask;
      if (pos > 0)  // query t sees keys 0..pos+t
        mask = torch::arange(len).unsqueeze(0) <= (torch::arange(T_) + pos).unsqueeze(1);
      auto o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, pos == 0, scale, true);
      torch::from_blob(att, {B, T_, heads, head_dim}, opts).copy_(o.transpose(1, 2));
      return;
    }
    // decode: the query heads of one kv head together (their queries are adjacent in q)
    at::parallel_for(0, B * kv_heads, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> score(group * ((pos + 1 + 15) / 16 * 16));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / kv_heads, kh = i % kv_heads;
        const float* q = qkv + b * qkvw + kh * group * head_dim;
        const int64_t at = (b * kv_heads + kh) * maxlen * head_dim;
        attend(q, group, kc + at, vc + at, pos + 1, head_dim, scale, score.data(), att + b * qw + kh * group * head_dim);
      }
    });
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_codes", &pack_codes, "unsigned codes [out, in] -> packed rows (see native.cpp)");
  m.def("isa", []() { return std::string(isa_name(isa())); });
  m.def("detected_isa", []() { return std::string(isa_name(detect_isa())); });
  m.def("set_isa", [](const std::string& name) {
    const int want = name == "avx512-amx" ? AMX : name == "avx512-vnni" ? AVX512 : name == "avx2" ? AVX2
                     : name == "portable" ? PORTABLE : -2;
    TORCH_CHECK(want != -2, "set_isa: expected avx512-amx, avx512-vnni, avx2 or portable, got ", name);
    TORCH_CHECK(want <= detect_isa(), "set_isa: this CPU cannot run ", name, " (best: ", isa_name(detect_isa()), ")");
    g_isa = want;
  });
  pybind11::class_<QLinear, QLinearPtr>(m, "QLinear")
      .def_readonly("out_features", &QLinear::out)
      .def_readonly("in_features", &QLinear::in)
      .def_readonly("bits", &QLinear::bits)
      .def_readonly("group", &QLinear::group)
      .def_readonly("a", &QLinear::a)
      .def_readonly("b", &QLinear::b)
      .def_readonly("data", &QLinear::data)
      .def_readonly("scale", &QLinear::scale)
      .def_property_readonly("offset", [](const QLinear& L) { return L.offset.defined() ? std::optional<torch::Tensor>(L.offset) : std::nullopt; })
      .def_property_readonly("bias", [](const QLinear& L) { return L.bias.defined() ? std::optional<torch::Tensor>(L.bias) : std::nullopt; })
      .def_property_readonly("nbytes", &QLinear::nbytes)
      .def("__call__", &linear);
  m.def("make_linear", &make_linear);
  m.def("make_float_linear", &make_float_linear);
  m.def("lookup_rows", &lookup_rows, "rows of a quantized linear's weight as floats (tied embedding lookups)");
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, torch::Tensor, torch::Tensor>())
      .def("add_layer", &Decoder::add_layer)
      .def("set_cache", &Decoder::set_cache)
      .def("forward", &Decoder::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
