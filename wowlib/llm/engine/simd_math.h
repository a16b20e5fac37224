// bf16 conversions and e^x for the compiled decode kernel (decode_attention.cpp).
// Part of each kernel's build-cache key (decode_kernel.compiled hashes the *.h files beside a source).
#pragma once
#include <bit>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace wow {

inline float widen(uint16_t x) { return std::bit_cast<float>(uint32_t(x) << 16); }     // bf16 -> fp32
inline uint16_t round_bf16(float x) {                   // fp32 -> bf16, round to nearest even (as torch)
    uint32_t u = std::bit_cast<uint32_t>(x);
    u += 0x7fffu + ((u >> 16) & 1u);                    // finite inputs only
    return uint16_t(u >> 16);
}

// e^x for x in [-87, 88] (clamped there, where fp32 stays finite and normal): x = n ln2 + r, e^r by
// Cephes' degree-6 polynomial (relative error ~1e-7), 2^n from the exponent bits. exp16 below is
// the same on 16 lanes; GCC leaves this scalar form unvectorised (written out by hand there).
inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    constexpr float ROUND = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
    const int32_t n = int32_t((x * 1.44269504088896341f + ROUND) - ROUND);
    const float r = x - float(n) * 0.693359375f + float(n) * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * std::bit_cast<float>((n + 127) << 23);
}

#if defined(__AVX512F__)
inline __m512 widen16(const uint16_t* p) {              // 16 bf16 values as fp32
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);                                      // p * 2^n
}
#endif

}  // namespace wow
