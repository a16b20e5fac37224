// Element-wise steps of a bf16 Llama layer fused into one pass each, for CPU inference (packed.py).
//
// Why: torch's bf16 CPU element-wise ops run at a few GB/s, and a Llama layer chains many: its
// RMSNorm is 8 ops (to fp32, pow, mean, add, rsqrt, mul, to bf16, mul by the weight) and the MLP's
// SiLU(gate) * up 2 more, each writing a full tensor. Measured on SmolLM2-135M (576 wide, 1,536
// MLP), one thread: at 80 rows an RMSNorm took ~77 us and SiLU * up ~100 us, ~8% of a decoding step;
// at 1,500 prompt tokens 1.6 and 1.9 ms, ~15% of a prefill. Here each is one read and one write.
//
// Numbers: the same operations in the same precision as transformers' LlamaRMSNorm and LlamaMLP
// (fp32 arithmetic, rounded to bf16 where torch rounds), so results differ from torch only where a
// float sum's order or exp's last bit moves a value across a bf16 rounding boundary (rare, 1 ulp).
// Built by wowlib/llm/decode_kernel.py (compile) with g++ -O3 -march=native -fopenmp; loaded via ctypes.
#include <cmath>
#include <cstdint>

#include "simd_math.h"

namespace {

using wow::exp_poly, wow::exp16, wow::round_bf16, wow::widen, wow::widen16;

#if defined(__AVX512F__)
// bf16 rounding on 16 lanes (GCC leaves the scalar form unvectorised).
inline __m512i rounded16(__m512 x) {                     // bf16 bits in the low half of each lane
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}
inline __m512 round16(__m512 x) { return _mm512_castsi512_ps(_mm512_slli_epi32(rounded16(x), 16)); }
inline void store16(uint16_t* p, __m512 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded16(x)));
}
#endif

constexpr int64_t PARALLEL_FROM = 1 << 16;              // elements: below this, threads cost more than they save

}  // namespace

extern "C" {

int wow_fused_abi_version() { return 1; }

// 1 where the AVX-512 loops were compiled in (the portable ones are correct but slower than torch).
int wow_fused_vectorised() {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

// RMSNorm of `rows` vectors of `dim` bf16 values, as LlamaRMSNorm: h = bf16(x / sqrt(mean(x^2) + eps)),
// out = bf16(weight * h).
void wow_rms_norm(const uint16_t* x, const uint16_t* weight, uint16_t* out, int64_t rows, int dim, float eps,
                  int threads) {
#pragma omp parallel for num_threads(threads) if (rows * dim >= PARALLEL_FROM) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* xr = x + r * dim;
        uint16_t* o = out + r * dim;
        float squares = 0.0f;
        int e = 0;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; e + 16 <= dim; e += 16) acc = _mm512_fmadd_ps(widen16(xr + e), widen16(xr + e), acc);
        squares = _mm512_reduce_add_ps(acc);
#endif
        for (; e < dim; ++e) squares += widen(xr[e]) * widen(xr[e]);
        const float inv = 1.0f / std::sqrt(squares / float(dim) + eps);
        e = 0;
#if defined(__AVX512F__)
        for (const __m512 v = _mm512_set1_ps(inv); e + 16 <= dim; e += 16)
            store16(o + e, _mm512_mul_ps(widen16(weight + e), round16(_mm512_mul_ps(widen16(xr + e), v))));
#endif
        for (; e < dim; ++e) o[e] = round_bf16(widen(weight[e]) * widen(round_bf16(widen(xr[e]) * inv)));
    }
}

// The gated MLP's activation, as LlamaMLP with SiLU: gate_up holds each row's gate then up
// projections ([rows, 2 * width], one matmul); out[r] = bf16(bf16(silu(gate)) * up).
void wow_silu_mul(const uint16_t* gate_up, uint16_t* out, int64_t rows, int width, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= PARALLEL_FROM) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* g = gate_up + r * 2 * int64_t(width);
        const uint16_t* u = g + width;
        uint16_t* o = out + r * width;
        int e = 0;
#if defined(__AVX512F__)
        for (const __m512 one = _mm512_set1_ps(1.0f); e + 16 <= width; e += 16) {
            const __m512 a = widen16(g + e);
            const __m512 silu = _mm512_div_ps(a, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
            store16(o + e, _mm512_mul_ps(round16(silu), widen16(u + e)));
        }
#endif
        for (; e < width; ++e) {
            const float a = widen(g[e]);
            o[e] = round_bf16(widen(round_bf16(a / (1.0f + exp_poly(-a)))) * widen(u[e]));
        }
    }
}

}
