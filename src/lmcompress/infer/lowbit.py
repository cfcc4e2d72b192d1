"""A 2-bit weight kernel for CPU decoding (AVX-512 VNNI C++ extension, built on first use).

PyTorch has no kernel that reads fewer than 4 bits per weight, and its int4 op is compute-bound at
batch 1 on this class of CPU, so ternary, binary and int2 weights widened to int8 read as many bytes per
token as int8 weights. `Lowbit2Rows` keeps codes in [-2, 1] packed four per byte (2 bits; ternary and
binary use 3 and 2 of the 4 levels), quantizes each token's activations to int8 (symmetric, per token:
the A8 of XTC and QuantGPT), and computes integer dot products with `vpdpbusd`:

    sum_i c_i * xq_i = sum_i u_i * xq_i - 2 * sum_i xq_i,   u = c + 2 in [0, 3] (unsigned operand)

four output rows at a time so that the dependent accumulations overlap. y = dot * s_x * s_w. Exact for
the weights; activations are rounded to int8 per token. Per-row scales, `in` % 64 == 0.

It needs a C++ compiler and a CPU with AVX-512 VNNI; `available()` says whether it can be used. The
extension is compiled by torch.utils.cpp_extension on first use (about a minute) and cached.
"""

from __future__ import annotations

import functools
import shutil

import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.infer.kernels import Kernel, cpu_flags, register_kernel
from lmcompress.quant.codes import IntWeight

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

// codes int8 [N, K] in [-2, 1], K % 64 == 0 -> uint8 [N, K / 4]; byte j of each 16-byte chunk holds the
// codes of elements j, j+16, j+32, j+48 (+2) at bit offsets 0, 2, 4, 6.
torch::Tensor pack2(torch::Tensor codes) {
  TORCH_CHECK(codes.dtype() == torch::kInt8 && codes.dim() == 2 && codes.size(1) % 64 == 0);
  auto c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  auto out = torch::empty({N, K / 4}, torch::kUInt8);
  const int8_t* src = c.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t ch = 0; ch < K / 64; ++ch)
      for (int j = 0; j < 16; ++j) {
        uint8_t b = 0;
        for (int s = 0; s < 4; ++s)
          b |= (uint8_t)(((src[n * K + ch * 64 + s * 16 + j] + 2) & 3) << (2 * s));
        dst[n * (K / 4) + ch * 16 + j] = b;
      }
  return out;
}

static inline __m512i unpack64(const uint8_t* p, __m512i shifts, __m512i mask) {
  __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), mask);
}

// x fp32 [M, K], packed uint8 [N, K/4], scale fp32 [N] -> y fp32 [M, N]
torch::Tensor mm2(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = packed.size(0);
  TORCH_CHECK(packed.size(1) * 4 == K && K % 64 == 0);
  // per-token symmetric int8 activations
  std::vector<int8_t> xq((M + 3) * K, 0);  // 3 zero rows: the 4-token tiles may read past M
  std::vector<float> sx(M);
  std::vector<int32_t> sumx(M);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xp[m * K + k]));
    const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int q = (int)std::nearbyint(xp[m * K + k] * inv);
      xq[m * K + k] = (int8_t)q;
      sum += q;
    }
    sx[m] = s;
    sumx[m] = sum;
  }
  auto y = torch::empty({M, N}, torch::kFloat);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const int64_t chunks = K / 64, rowbytes = K / 4;
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t b0, int64_t b1) {
    const __m512i mask = _mm512_set1_epi8(3);
    const __m512i shifts = _mm512_set_epi16(6,6,6,6,6,6,6,6, 4,4,4,4,4,4,4,4, 2,2,2,2,2,2,2,2, 0,0,0,0,0,0,0,0);
    std::vector<int8_t> wbuf(M > 1 ? 4 * K : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, N - n0);
      if (M == 1) {  // decode: unpack on the fly, 4 independent row accumulators
        const int8_t* xr = xq.data();
        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                          _mm512_setzero_si512()};
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const __m512i xv = _mm512_loadu_si512((const void*)(xr + ch * 64));
          for (int r = 0; r < rows; ++r)
            acc[r] = _mm512_dpbusd_epi32(acc[r], unpack64(wp + (n0 + r) * rowbytes + ch * 16, shifts, mask), xv);
        }
        for (int r = 0; r < rows; ++r)
          yp[n0 + r] = (float)(_mm512_reduce_add_epi32(acc[r]) - 2 * sumx[0]) * sx[0] * sp[n0 + r];
        continue;
      }
      // several tokens: unpack the 4 rows once (zeros past N), then 4-row x 4-token tiles of accumulators
      std::fill(wbuf.begin(), wbuf.end(), 0);
      for (int r = 0; r < rows; ++r)
        for (int64_t ch = 0; ch < chunks; ++ch)
          _mm512_storeu_si512((void*)(wbuf.data() + r * K + ch * 64),
                              unpack64(wp + (n0 + r) * rowbytes + ch * 16, shifts, mask));
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        __m512i acc[4][4];
        for (int r = 0; r < 4; ++r)
          for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_si512();
        for (int64_t ch = 0; ch < chunks; ++ch) {
          __m512i xv[4], wv[4];
          for (int t = 0; t < 4; ++t) xv[t] = _mm512_loadu_si512((const void*)(xq.data() + (m0 + t) * K + ch * 64));
          for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_si512((const void*)(wbuf.data() + r * K + ch * 64));
          for (int r = 0; r < 4; ++r)
            for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], wv[r], xv[t]);
        }
        for (int t = 0; t < 4 && m0 + t < M; ++t)
          for (int r = 0; r < rows; ++r) {
            const int32_t dot = _mm512_reduce_add_epi32(acc[r][t]) - 2 * sumx[m0 + t];
            yp[(m0 + t) * N + n0 + r] = (float)dot * sx[m0 + t] * sp[n0 + r];
          }
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack2", &pack2);
  m.def("mm2", &mm2);
}
"""


@functools.cache
def available() -> bool:
    """A C++ compiler, ninja (torch.utils.cpp_extension builds with it) and AVX-512 BW + VNNI are present."""
    flags = cpu_flags()
    return ("avx512_vnni" in flags and "avx512bw" in flags and shutil.which("c++") is not None
            and shutil.which("ninja") is not None)


@functools.cache
def extension():
    """Build (once; cached by torch under ~/.cache/torch_extensions) and return the extension module."""
    if not available():
        raise LmcompressError("the lowbit2 kernel needs a C++ compiler and a CPU with AVX-512 VNNI")
    # torch's C++ extension builder (and the compiler it runs) is needed only when this kernel is used.
    from torch.utils.cpp_extension import load_inline

    return load_inline("lmc_lowbit2", cpp_sources=[SOURCE], with_cuda=False, verbose=False,
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])


@register_kernel("lowbit2", fallback=True)
class Lowbit2Rows(Kernel):
    """Codes in [-2, 1] (ternary, binary, symmetric int2) with per-row scales, 2 bits resident."""

    name = "lowbit2-avx512"

    @staticmethod
    def supports(weight: IntWeight) -> bool:
        if not (weight.per_row and weight.zero is None and weight.bits <= 2 and weight.in_features % 64 == 0):
            return False
        codes = weight.codes
        return codes.numel() == 0 or (int(codes.min()) >= -2 and int(codes.max()) <= 1)

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None):
        if not self.supports(weight):
            raise LmcompressError(f"Lowbit2Rows takes symmetric per-row codes in [-2, 1] with in % 64 == 0; got "
                                  f"a {weight.scheme} {weight.bits}-bit {tuple(weight.codes.shape)} weight")
        codes, scale, _ = weight.signed()
        self.out_features, self.in_features = codes.shape
        self.packed = extension().pack2(codes.contiguous())
        self.scale = scale[:, 0].contiguous()
        self.bias = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = extension().mm2(x.float(), self.packed, self.scale)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel() * 4
