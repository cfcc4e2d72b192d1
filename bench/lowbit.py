"""Prototype: a 2-bit weight kernel for CPU decoding (AVX-512 VNNI), what ternary/int2 need to beat int8.

PyTorch has no kernel that reads fewer than 4 bits per weight, and its int4 op is compute-bound at batch 1
on this CPU, so ternary and int2 models widened to int8 read as many bytes per token as int8 models. This
C++ extension (built on first use with torch.utils.cpp_extension) keeps codes in [-2, 1] packed 4 per byte
(ternary uses 3 of the 4 levels), quantizes each token's activations to int8 (symmetric, per token, as
XTC's and QuantGPT's A8 do), and computes integer dot products with `vpdpbusd`:
    sum_i (u_i - 2) * xq_i = sum_i u_i * xq_i - 2 * sum_i xq_i,   u = code + 2 in [0, 3]
four output rows at a time so the dependent accumulations overlap. Per-row scales; `in` % 64 == 0.
It is a measured prototype kept in bench/, not part of the package (it needs a compiler and AVX-512 VNNI).

    flock /tmp/lmc-heavy.lock python bench/lowbit.py --out bench/results/lowbit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
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
  std::vector<int8_t> xq(M * K);
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
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq.data() + m * K;
        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                          _mm512_setzero_si512()};
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const __m512i xv = _mm512_loadu_si512((const void*)(xr + ch * 64));
          for (int r = 0; r < 4; ++r)
            if (r < rows)
              acc[r] = _mm512_dpbusd_epi32(acc[r], unpack64(wp + (n0 + r) * rowbytes + ch * 16, shifts, mask), xv);
        }
        for (int r = 0; r < rows; ++r) {
          const int32_t dot = _mm512_reduce_add_epi32(acc[r]) - 2 * sumx[m];
          yp[m * N + n0 + r] = (float)dot * sx[m] * sp[n0 + r];
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

_EXT = None


def extension():
    """Build (once, cached by torch) and return the extension module."""
    global _EXT
    if _EXT is None:
        from torch.utils.cpp_extension import load_inline

        _EXT = load_inline("lmc_lowbit2", cpp_sources=[SOURCE], with_cuda=False, verbose=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return _EXT


class Lowbit2Rows:
    """A kernel (same interface as lmcompress.infer.kernels) for codes in [-2, 1] with per-row scales."""

    name = "lowbit2-avx512"

    def __init__(self, weight, bias=None):
        codes, scale, offset = weight.signed()
        if offset is not None or not weight.per_row or int(codes.min()) < -2 or int(codes.max()) > 1:
            raise ValueError("Lowbit2Rows takes symmetric codes in [-2, 1] with per-row scales")
        self.out_features, self.in_features = codes.shape
        self.packed = extension().pack2(codes.contiguous())
        self.scale = scale[:, 0].contiguous()
        self.bias = None if bias is None else bias.float()

    def __call__(self, x):
        y = extension().mm2(x.float(), self.packed, self.scale)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel() * 4


def to_lowbit(model, weights) -> int:
    """Give every PackedLinear of `model` built from a 2-bit / ternary / binary IntWeight in `weights`
    ({name: IntWeight}, per-row scales, in % 64 == 0) the Lowbit2Rows kernel; returns how many."""
    swapped = 0
    for name, weight in weights.items():
        module = model.get_submodule(name)
        if hasattr(module, "kernel") and weight.bits <= 2 and weight.per_row and weight.in_features % 64 == 0:
            module.kernel = Lowbit2Rows(weight, getattr(module.kernel, "bias", None))
            swapped += 1
    return swapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from kernels import SHAPES, timeit

    from lmcompress.infer.convert import rtn_weight
    from lmcompress.infer.kernels import FbgemmRows, Int4Groups

    t0 = time.perf_counter()
    extension()
    print(f"extension built/loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for tokens in (1, 16):
        for shape_name, (out_f, in_f) in SHAPES.items():
            weight = rtn_weight(torch.randn(out_f, in_f) * 0.02, "ternary")
            x = torch.randn(tokens, in_f)
            ref = x @ weight.dequantize().t()
            row = {"tokens": tokens, "shape": shape_name}
            for cls in (FbgemmRows, Int4Groups, Lowbit2Rows):
                kernel = cls(weight)
                err = float((kernel(x) - ref).abs().max() / ref.abs().max())
                best, median = timeit(lambda k=kernel, x=x: k(x))
                row[cls.name] = {"best_us": best * 1e6, "median_us": median * 1e6, "rel_err": err,
                                 "nbytes": kernel.nbytes}
            rows.append(row)
            print(f"tokens={tokens:3d} {shape_name:18s} " + "  ".join(
                f"{k} {v['best_us']:8.1f} us ({v['nbytes'] / 1e6:.2f} MB, err {v['rel_err']:.1e})"
                for k, v in row.items() if isinstance(v, dict)), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
