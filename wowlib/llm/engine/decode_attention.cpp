// One decoding step of cascade attention on a CPU, fused: each row's query attends to its group's
// shared prompt head and to its own tokens (prompt tail + generated, padding skipped) in one pass,
// with an online softmax (running max, running sum), so the two parts need no merge afterwards.
//
// Why a kernel: at 240 rows a SmolLM2 decoding step spent ~40% of its time in attention split into
// ~25 small torch calls per layer (one per group's head, plus the own tokens), each dominated by
// per-call and per-(row, head) overhead; the FLOPs are small. Built by wowlib/llm/decode_kernel.py
// with g++ -O3 -march=native -fopenmp (loaded through ctypes: no torch headers, builds in ~3-4 s).
//
// Where the CPU has AMX (Sapphire Rapids and later) and the model runs in bf16 with head dim 64,
// scores and weighted sums are AMX tile products (16 queries x 16 keys x 32 dims per instruction),
// transposed so that the online softmax is one vector op per key across 16 queries; the softmax
// then dominates. The same block function prefills a prompt head's causal self-attention
// (wow_causal_prefill). Measured alternatives that did not pay: AVX512-BF16 dot products
// (vdpbf16ps: 0.92-1.06x; one per cycle where FMAs issue two) and tiles with queries as rows
// (horizontal max and sum per query and block: the head part was 1.5x slower than transposed).
//
// Layouts (row-major, d = head dim, P = query heads per KV head):
//   q     [B, n_kv, P, d]                      the step's queries (one token per row)
//   k, v  element (b, h, j, e) at b * row_stride + h * head_stride + j * d + e   (own-token cache)
//   mask  [B, mask_stride] bytes, 1 = attend (own tokens only; null = all)
//   head_k[g]  [n_kv, blocks, d, KB]  group g's shared prompt head keys, in blocks of KB keys,
//              each block transposed (zero past the head's end); head_v[g]  [n_kv, head_len[g], d]
//   except where the head is read by AMX tiles (wow_paired(dtype, d) == 1: bf16, d = 64, a CPU with
//   AMX), zero-padded to whole blocks:
//   head_k[g]  [n_kv, blocks * KB, d]      keys as rows
//   head_v[g]  [n_kv, blocks, d, KB]       values in blocks of KB keys, each block transposed
//   out   [B, n_kv, P, d]
// Rows are sorted by group: live group i owns rows [first[i], first[i] + count[i]).
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define WOW_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define WOW_AMX 0
#endif

namespace {

constexpr int KB = 64;             // keys per block: scores of a block are 4 AVX-512 vectors

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return wow::widen(x); }
inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, uint16_t* dst) { *dst = wow::round_bf16(x); }    // outputs are finite (softmax averages)

struct Args {
    const void* q;
    const void* k;
    const void* v;
    int64_t row_stride, head_stride;
    const uint8_t* mask;
    int64_t mask_stride;
    int own_len;                                  // own-token slots in the cache (keys [start, own_len))
    const int* first;
    const int* count;
    const int* own_start;
    const int* group;                             // live group i is group[i] of the head arrays
    const void* const* head_k;
    const void* const* head_v;
    const int* head_len;
    int n_kv, P;
    float scale;
    void* out;
};

// The running softmax state of one query.
struct State {
    float max = -3.0e38f, sum = 0.0f;
};

#if defined(__AVX512F__)
// 16 values as fp32 (bf16: widen to 32 bits and shift into the high half).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return wow::widen16(p); }
#endif

// Scores of one query against a block of head keys stored transposed (kt[e * KB + j]), fp32.
template <int D>
void scores_transposed(const float* __restrict__ q, const float* __restrict__ kt, float* __restrict__ s) {
#if defined(__AVX512F__)
    static_assert(KB == 64);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int e = 0; e < D; ++e) {
        const __m512 qe = _mm512_set1_ps(q[e]);
        const float* row = kt + e * KB;
        s0 = _mm512_fmadd_ps(qe, load16(row), s0);
        s1 = _mm512_fmadd_ps(qe, load16(row + 16), s1);
        s2 = _mm512_fmadd_ps(qe, load16(row + 32), s2);
        s3 = _mm512_fmadd_ps(qe, load16(row + 48), s3);
    }
    _mm512_storeu_ps(s, s0);
    _mm512_storeu_ps(s + 16, s1);
    _mm512_storeu_ps(s + 32, s2);
    _mm512_storeu_ps(s + 48, s3);
#else
    for (int j = 0; j < KB; ++j) s[j] = 0.0f;
    for (int e = 0; e < D; ++e)
        for (int j = 0; j < KB; ++j) s[j] += q[e] * kt[e * KB + j];
#endif
}

// Scores of one query against n keys given by row pointers (a row's own tokens).
template <int D, typename T>
void scores_rows(const float* __restrict__ q, const T* const* keys, int n, float* __restrict__ s) {
    for (int j = 0; j < n; ++j) {
        const T* __restrict__ k = keys[j];
#if defined(__AVX512F__)
        __m512 dot = _mm512_setzero_ps();
        for (int e = 0; e < D; e += 16) dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + e), load16(k + e), dot);
        s[j] = _mm512_reduce_add_ps(dot);
#else
        float dot = 0.0f;
        for (int e = 0; e < D; ++e) dot += q[e] * to_float(k[e]);
        s[j] = dot;
#endif
    }
}

// acc[0:D] = acc * rescale + sum_j p[j] * values[j]
template <int D, typename T>
void accumulate(float* __restrict__ acc, float rescale, const float* p, const T* const* values, int n) {
#if defined(__AVX512F__)
    constexpr int V = D / 16;
    __m512 a[V];
    const __m512 c = _mm512_set1_ps(rescale);
    for (int u = 0; u < V; ++u) a[u] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * u), c);
    for (int j = 0; j < n; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int u = 0; u < V; ++u) a[u] = _mm512_fmadd_ps(pj, load16(values[j] + 16 * u), a[u]);
    }
    for (int u = 0; u < V; ++u) _mm512_storeu_ps(acc + 16 * u, a[u]);
#else
    for (int e = 0; e < D; ++e) acc[e] *= rescale;
    for (int j = 0; j < n; ++j)
        for (int e = 0; e < D; ++e) acc[e] += p[j] * to_float(values[j][e]);
#endif
}

// Fold a block's n scores into a query's running max and sum: s becomes the block's weights
// e^(s - new max); returns the factor the output so far is multiplied by.
inline float softmax_update(float* __restrict__ s, int n, State& st) {
    float block_max = -3.0e38f;
    int i = 0;
#if defined(__AVX512F__)
    __m512 top = _mm512_set1_ps(-3.0e38f);
    for (; i + 16 <= n; i += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + i));
    block_max = _mm512_reduce_max_ps(top);
#endif
    for (; i < n; ++i) block_max = std::max(block_max, s[i]);
    const float new_max = std::max(st.max, block_max);
    const float rescale = wow::exp_poly(st.max - new_max);
    float sum = 0.0f;
    int j = 0;
#if defined(__AVX512F__)
    __m512 total = _mm512_setzero_ps();
    const __m512 shift = _mm512_set1_ps(new_max);
    for (; j + 16 <= n; j += 16) {
        const __m512 w = wow::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift));
        _mm512_storeu_ps(s + j, w);
        total = _mm512_add_ps(total, w);
    }
    sum = _mm512_reduce_add_ps(total);
#endif
    for (; j < n; ++j) {
        s[j] = wow::exp_poly(s[j] - new_max);
        sum += s[j];
    }
    st.max = new_max;
    st.sum = st.sum * rescale + sum;
    return rescale;
}

// Fold a block's n scores and their value rows into a query's running softmax and output.
template <int D, typename T>
void fold(float* __restrict__ s, const T* const* values, int n, State& st, float* __restrict__ acc) {
    const float rescale = softmax_update(s, n, st);
    accumulate<D>(acc, rescale, s, values, n);
}

// QB queries (q, acc: stride D) against one block of head keys (kt, transposed) and values (vb,
// rows), fp32: QB independent FMA chains per loaded vector (one query alone is latency-bound).
template <int D, int QB>
void head_block(const float* __restrict__ q, const float* __restrict__ kt, const float* __restrict__ vb, int n,
                State* st, float* __restrict__ acc) {
    alignas(64) float s[QB][KB];
    float rescale[QB];
#if defined(__AVX512F__)
    static_assert(KB == 64 && D % 16 == 0);
    constexpr int V = D / 16;
    {
        __m512 sc[QB][4];
        for (int x = 0; x < QB; ++x)
            for (int u = 0; u < 4; ++u) sc[x][u] = _mm512_setzero_ps();
        for (int e = 0; e < D; ++e) {
            const float* row = kt + e * KB;
            const __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + 16),
                         k2 = _mm512_loadu_ps(row + 32), k3 = _mm512_loadu_ps(row + 48);
            for (int x = 0; x < QB; ++x) {
                const __m512 qe = _mm512_set1_ps(q[x * D + e]);
                sc[x][0] = _mm512_fmadd_ps(qe, k0, sc[x][0]);
                sc[x][1] = _mm512_fmadd_ps(qe, k1, sc[x][1]);
                sc[x][2] = _mm512_fmadd_ps(qe, k2, sc[x][2]);
                sc[x][3] = _mm512_fmadd_ps(qe, k3, sc[x][3]);
            }
        }
        for (int x = 0; x < QB; ++x)
            for (int u = 0; u < 4; ++u) _mm512_storeu_ps(&s[x][16 * u], sc[x][u]);
    }
    for (int x = 0; x < QB; ++x) rescale[x] = softmax_update(s[x], n, st[x]);
    __m512 a[QB][V];
    for (int x = 0; x < QB; ++x)
        for (int u = 0; u < V; ++u) a[x][u] = _mm512_mul_ps(_mm512_loadu_ps(acc + x * D + 16 * u), _mm512_set1_ps(rescale[x]));
    for (int j = 0; j < n; ++j) {
        __m512 v[V];
        for (int u = 0; u < V; ++u) v[u] = _mm512_loadu_ps(vb + j * D + 16 * u);
        for (int x = 0; x < QB; ++x) {
            const __m512 pj = _mm512_set1_ps(s[x][j]);
            for (int u = 0; u < V; ++u) a[x][u] = _mm512_fmadd_ps(pj, v[u], a[x][u]);
        }
    }
    for (int x = 0; x < QB; ++x)
        for (int u = 0; u < V; ++u) _mm512_storeu_ps(acc + x * D + 16 * u, a[x][u]);
#else
    const float* rows[KB];
    for (int j = 0; j < n; ++j) rows[j] = vb + j * D;
    for (int x = 0; x < QB; ++x) {
        scores_transposed<D>(q + x * D, kt, s[x]);
        fold<D>(s[x], rows, n, st[x], acc + x * D);
    }
    (void)rescale;
#endif
}

#if WOW_AMX
bool amx_enabled = false;           // set by amx_permitted() once the kernel may use AMX tiles

// Linux hands out the AMX tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA;
// torch's oneDNN asks for it too): asked once.
bool amx_permitted() {
    static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    amx_enabled = permitted;
    return permitted;
}

// Every tile 16 rows x 64 bytes: 16 rows of 32 bf16 (A: keys, or values transposed), 16 rows of 16
// pairs of bf16 (B: queries, or weights, in pairs), 16 x 16 fp32 (C).
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
const TileConfig tile_config;         // the one configuration every tile product here uses

// The running state of 16 queries (one per lane) read by tile products: output transposed
// (o[d][query], not yet divided by the sum), running max and sum.
struct Lanes {
    alignas(64) float o[64][16] = {};
    __m512 max = _mm512_set1_ps(-3.0e38f), sum = _mm512_setzero_ps();
};

// 16 queries (qp: dims in pairs, [32][16][2] bf16) against one block of n <= 64 keys (kr: rows of
// 64 bf16, zero past n) and values (vt: [64 dims][64 keys] bf16), D = 64, by AMX tile products,
// transposed so that every softmax step is one vector op per key across the 16 queries (no
// horizontal max or sum): S^T = K Q^T, then O^T += V^T P^T. The weights P are rounded to bf16 for
// the values' sum (as torch's bf16 flash attention does); scores, max and sums stay fp32. With
// ``last`` (causal prefill), query lane i sees keys up to position last[i]; the block starts at key0.
// Tiles 0-1: A, 2-3: B, 4-7: C; tile numbers are literals (GCC pastes them into the instruction).
#define WOW_SCORES(c, tile)                                                           \
    _tile_zero(tile);                                                                  \
    _tile_loadd(0, kr + size_t(c) * 16 * 64, 128);                                     \
    _tile_dpbf16ps(tile, 0, 2);                                                        \
    _tile_loadd(1, kr + size_t(c) * 16 * 64 + 32, 128);                                \
    _tile_dpbf16ps(tile, 1, 3);                                                        \
    _tile_stored(tile, &s[16 * c][0], 64);
#define WOW_SUM(u, tile)                                                              \
    _tile_loadd(tile, &t.o[16 * u][0], 64);                                            \
    _tile_loadd(0, vt + size_t(u) * 16 * 64, 128);                                     \
    _tile_dpbf16ps(tile, 0, 2);                                                        \
    _tile_loadd(1, vt + size_t(u) * 16 * 64 + 32, 128);                                \
    _tile_dpbf16ps(tile, 1, 3);                                                        \
    _tile_stored(tile, &t.o[16 * u][0], 64);

void block_amx(const uint16_t* __restrict__ qp, const uint16_t* __restrict__ kr, const uint16_t* __restrict__ vt,
               int n, float scale, Lanes& t, const int* last = nullptr, int key0 = 0) {
    alignas(64) float s[64][16];
    alignas(64) uint16_t pp[32][16][2];
    _tile_loadd(2, qp, 64);
    _tile_loadd(3, qp + 16 * 32, 64);
    WOW_SCORES(0, 4)
    if (n > 16) { WOW_SCORES(1, 5) }
    if (n > 32) { WOW_SCORES(2, 6) }
    if (n > 48) { WOW_SCORES(3, 7) }
    const __m512 c = _mm512_set1_ps(scale), floor = _mm512_set1_ps(-3.0e38f);
    const __m512i seen = last ? _mm512_loadu_si512(last) : _mm512_set1_epi32(0x7fffffff);
    __m512 top = t.max;
    for (int j = 0; j < n; ++j) {
        const __mmask16 live = _mm512_cmpge_epi32_mask(seen, _mm512_set1_epi32(key0 + j));
        const __m512 x = _mm512_mask_blend_ps(live, floor, _mm512_mul_ps(_mm512_load_ps(s[j]), c));
        _mm512_store_ps(s[j], x);
        top = _mm512_max_ps(top, x);
    }
    const __m512 rescale = wow::exp16(_mm512_sub_ps(t.max, top));
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < n; ++j) {
        const __mmask16 live = _mm512_cmpge_epi32_mask(seen, _mm512_set1_epi32(key0 + j));
        const __m512 w = _mm512_maskz_mov_ps(live, wow::exp16(_mm512_sub_ps(_mm512_load_ps(s[j]), top)));
        _mm512_store_ps(s[j], w);
        sum = _mm512_add_ps(sum, w);
    }
    t.max = top;
    t.sum = _mm512_fmadd_ps(t.sum, rescale, sum);
    // P^T in pairs of keys: [key pair][query][2]
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512 zero = _mm512_setzero_ps();
    for (int k = 0; k < 32; ++k) {
        const __m512 even = 2 * k < n ? _mm512_load_ps(s[2 * k]) : zero;
        const __m512 odd = 2 * k + 1 < n ? _mm512_load_ps(s[2 * k + 1]) : zero;
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);      // [even x 16, odd x 16]
        _mm512_store_si512(pp[k], _mm512_permutexvar_epi16(interleave, both));
    }
    for (int d = 0; d < 64; ++d) _mm512_store_ps(t.o[d], _mm512_mul_ps(_mm512_load_ps(t.o[d]), rescale));
    _tile_loadd(2, &pp[0][0][0], 64);
    _tile_loadd(3, &pp[16][0][0], 64);
    WOW_SUM(0, 4) WOW_SUM(1, 5) WOW_SUM(2, 6) WOW_SUM(3, 7)
}
#undef WOW_SCORES
#undef WOW_SUM

// Queries in pairs for block_amx: qp[e][i] = dims 2e, 2e+1 of query i (rows of 64 bf16 at q,
// `stride` apart), zero past nq.
void pair_queries(const uint16_t* q, size_t stride, int nq, uint16_t (*qp)[16][2]) {
    std::memset(qp, 0, 32 * 16 * 2 * sizeof(uint16_t));
    for (int i = 0; i < nq; ++i)
        for (int e = 0; e < 32; ++e) std::memcpy(qp[e][i], q + i * stride + 2 * e, 4);
}

// A row's own tokens (slots [j0, end) of one KV head, keys and values rows of D = 64 bf16 at k and v)
// for its P <= 4 queries (qp: [32 dim pairs][16][2] bf16, zero past P), by AMX: the scores of 16 slots x
// 16 queries are the tile product of the slots' keys as they lie in the cache (A) and the queries
// in pairs (B, qp); masked slots get weight 0. The values' sum stays fp32 on AVX-512, each value
// row widened once for all P queries (the scores were the costly part: a horizontal sum per key and
// query, ~13 ns per query and key).
template <int P>
void own_amx(const uint16_t* __restrict__ qp, const uint16_t* k, const uint16_t* v, const uint8_t* m,
             int j0, int end, int64_t capacity, float scale, State* st, float* __restrict__ acc) {
    constexpr int D = 64;
    alignas(64) float c[16][16];
    alignas(64) float s[P][16];
    alignas(64) uint16_t tail[16][D];
    __m512 a[P][4];
    for (int p = 0; p < P; ++p)
        for (int u = 0; u < 4; ++u) a[p][u] = _mm512_loadu_ps(acc + p * D + 16 * u);
    _tile_loadd(2, qp, 64);                       // query pairs of dims 0-31
    _tile_loadd(3, qp + 16 * 32, 64);             // and 32-63
    const __m512 c_scale = _mm512_set1_ps(scale);
    for (int j = j0; j < end; j += 16) {
        const int n = std::min(16, end - j);
        const uint16_t* rows = k + size_t(j) * D;
        if (j + 16 > capacity) {                  // never read past the cache: a zero-padded copy
                                                  // (slots past `end` inside it are read, then not live)
            std::memset(tail, 0, sizeof tail);
            std::memcpy(tail, rows, size_t(n) * D * sizeof(uint16_t));
            rows = &tail[0][0];
        }
        _tile_zero(4);
        _tile_loadd(0, rows, D * 2);
        _tile_dpbf16ps(4, 0, 2);
        _tile_loadd(1, rows + 32, D * 2);
        _tile_dpbf16ps(4, 1, 3);
        _tile_stored(4, &c[0][0], 64);
        // live slots (mask), as a lane mask; the scores of query p are column p of c
        __mmask16 live = n == 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
        if (m) live &= _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(live, m + j), _mm_setzero_si128());
        if (!live) continue;
        for (int p = 0; p < P; ++p) {
            const __m512 col = _mm512_i32gather_ps(_mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160,
                                                                     176, 192, 208, 224, 240), &c[0][p], 4);
            _mm512_store_ps(s[p], _mm512_mask_blend_ps(live, _mm512_set1_ps(-3.0e38f), _mm512_mul_ps(col, c_scale)));
            const float rescale = softmax_update(s[p], 16, st[p]);
            _mm512_store_ps(s[p], _mm512_maskz_mov_ps(live, _mm512_load_ps(s[p])));     // masked slots weigh 0
            const __m512 r = _mm512_set1_ps(rescale);
            for (int u = 0; u < 4; ++u) a[p][u] = _mm512_mul_ps(a[p][u], r);
        }
        for (int jj = 0; jj < n; ++jj) {
            if (!((live >> jj) & 1)) continue;
            const uint16_t* row = v + size_t(j + jj) * D;
            const __m512 v0 = load16(row), v1 = load16(row + 16), v2 = load16(row + 32), v3 = load16(row + 48);
            for (int p = 0; p < P; ++p) {
                const __m512 w = _mm512_set1_ps(s[p][jj]);
                a[p][0] = _mm512_fmadd_ps(w, v0, a[p][0]);
                a[p][1] = _mm512_fmadd_ps(w, v1, a[p][1]);
                a[p][2] = _mm512_fmadd_ps(w, v2, a[p][2]);
                a[p][3] = _mm512_fmadd_ps(w, v3, a[p][3]);
            }
        }
    }
    for (int p = 0; p < P; ++p)
        for (int u = 0; u < 4; ++u) _mm512_storeu_ps(acc + p * D + 16 * u, a[p][u]);
}

// The head part of a work item by AMX tiles: queries in tiles of 16.
void head_amx(const uint16_t* Q, const Args& a, int h, int r0, int rows, const uint16_t* hk, const uint16_t* hv,
              int length, State* st, float* acc) {
    constexpr int D = 64;
    const int P = a.P, nq = rows * P, blocks = (length + KB - 1) / KB;
    _tile_loadconfig(&tile_config);
    alignas(64) uint16_t qp[32][16][2];
    Lanes t;
    for (int x0 = 0; x0 < nq; x0 += 16) {
        const int n = std::min(16, nq - x0);
        // query x of the item is row r0 + x / P, query head h * P + x % P: rows of Q are P * D apart
        std::memset(qp, 0, sizeof qp);
        for (int i = 0; i < n; ++i) {
            const int x = x0 + i;
            const uint16_t* q = &Q[((size_t(r0 + x / P) * a.n_kv + h) * P + x % P) * D];
            for (int e = 0; e < 32; ++e) std::memcpy(qp[e][i], q + 2 * e, 4);
        }
        t = Lanes();
        for (int blk = 0; blk < blocks; ++blk)
            block_amx(&qp[0][0][0], hk + size_t(blk) * KB * D, hv + size_t(blk) * D * KB, std::min(KB, length - blk * KB),
                      a.scale, t);
        alignas(64) float m[16], l[16];
        _mm512_store_ps(m, t.max);
        _mm512_store_ps(l, t.sum);
        for (int i = 0; i < n; ++i) {
            st[x0 + i].max = m[i];
            st[x0 + i].sum = l[i];
            for (int e = 0; e < D; ++e) acc[size_t(x0 + i) * D + e] = t.o[e][i];
        }
    }
    _tile_release();              // leave the tiles as torch's own AMX kernels expect them: unconfigured
}

// Causal self-attention of one sequence (a prompt head's prefill), D = 64, bf16, by AMX tiles:
// queries q [n_kv, L, P, D] (a query per position and query head of a KV head, in tiles of 16),
// keys kp [n_kv, blocks * KB, D] (rows, zero-padded), values vp [n_kv, blocks, D, KB] (blocks
// transposed), out [L, n_kv * P, D]. Query (t, p) attends to keys 0..t. torch's CPU flash attention took ~2 ms per SmolLM2 layer at 450 tokens (~60 GFLOP/s).
void causal_prefill(const uint16_t* q, const uint16_t* kp, const uint16_t* vp, int L, int n_kv, int P,
                    float scale, uint16_t* out, int threads) {
    constexpr int D = 64;
    const int rows = L * P, tiles = (rows + 15) / 16, blocks = (L + KB - 1) / KB;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int w = 0; w < n_kv * tiles; ++w) {
        const int h = w / tiles, x0 = (w % tiles) * 16, nq = std::min(16, rows - x0);
        alignas(64) uint16_t qp[32][16][2];
        alignas(64) int last[16];
        pair_queries(q + (size_t(h) * rows + x0) * D, D, nq, qp);
        for (int i = 0; i < 16; ++i) last[i] = (x0 + std::min(i, nq - 1)) / P;    // the query's position
        _tile_loadconfig(&tile_config);
        Lanes t;
        const int upto = std::min(last[nq - 1] / KB + 1, blocks);          // blocks any query sees
        for (int blk = 0; blk < upto; ++blk)
            block_amx(&qp[0][0][0], kp + (size_t(h) * blocks + blk) * KB * D, vp + (size_t(h) * blocks + blk) * D * KB,
                      std::min(KB, L - blk * KB), scale, t, last, blk * KB);
        _tile_release();
        alignas(64) float l[16];
        _mm512_store_ps(l, t.sum);
        for (int i = 0; i < nq; ++i) {
            const int t_pos = (x0 + i) / P, p = (x0 + i) % P;
            const float norm = 1.0f / l[i];
            uint16_t* o = out + (size_t(t_pos) * n_kv * P + size_t(h) * P + p) * D;
            for (int e = 0; e < D; ++e) store(t.o[e][i] * norm, o + e);
        }
    }
}
#endif

// n values as fp32: the data itself, or widened from bf16 into buf.
inline const float* widen(const float* x, int, std::vector<float>&) { return x; }
inline const float* widen(const uint16_t* x, int n, std::vector<float>& buf) {
    buf.resize(n);
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(buf.data() + i, load16(x + i));
#endif
    for (; i < n; ++i) buf[i] = to_float(x[i]);
    return buf.data();
}

// One work item: KV head h of live group i, rows [r0, r1) of it.
template <int D, typename T>
void item(const Args& a, int i, int h, int r0, int r1) {
    const int P = a.P, rows = r1 - r0, nq = rows * P;
    thread_local std::vector<float> q, acc;
    thread_local std::vector<State> st;
    thread_local std::vector<const T*> kp, vp;
    thread_local std::vector<float> kf, vf;
    alignas(64) float s[KB];
    q.resize(size_t(nq) * D);
    acc.assign(size_t(nq) * D, 0.0f);
    st.assign(nq, State());
    kp.resize(KB);
    vp.resize(KB);
    const T* Q = static_cast<const T*>(a.q);
#if WOW_AMX
    const bool amx = std::is_same_v<T, uint16_t> && D == 64 && amx_enabled;   // tiles read the bf16 queries
#else
    const bool amx = false;
#endif
    for (int r = 0; r < rows && !(amx && P <= 4); ++r)
        for (int p = 0; p < P; ++p)
            for (int e = 0; e < D; ++e)
                q[(size_t(r) * P + p) * D + e] =
                    to_float(Q[((size_t(r0 + r) * a.n_kv + h) * P + p) * D + e]) * a.scale;
    // the group's head, read once for all its rows' queries: keys in blocks of KB, transposed
    const int g = a.group[i], length = a.head_len[g], blocks = (length + KB - 1) / KB;
    const T* hk = static_cast<const T*>(a.head_k[g]) + size_t(h) * blocks * D * KB;
    const T* hv = static_cast<const T*>(a.head_v[g]) + size_t(h) * length * D;
    bool tiles = false, tiles_own = false;
#if WOW_AMX
    if constexpr (std::is_same_v<T, uint16_t> && D == 64) {
        if (amx) {
            head_amx(Q, a, h, r0, rows, hk, static_cast<const T*>(a.head_v[g]) + size_t(h) * blocks * KB * D, length,
                     st.data(), acc.data());
            tiles = true;
        }
    }
#endif
    for (int blk = 0; blk < blocks && !tiles; ++blk) {
        const int n = std::min(KB, length - blk * KB);
        // a bf16 block is widened to fp32 once, for all the group's queries
        const float* kt = widen(hk + size_t(blk) * D * KB, D * KB, kf);
        const float* vb = widen(hv + size_t(blk) * KB * D, n * D, vf);
        int x = 0;
        for (; x + 4 <= nq; x += 4) head_block<D, 4>(&q[size_t(x) * D], kt, vb, n, &st[x], &acc[size_t(x) * D]);
        for (; x < nq; ++x) head_block<D, 1>(&q[size_t(x) * D], kt, vb, n, &st[x], &acc[size_t(x) * D]);
    }
    // each row's own tokens, masked slots skipped
    const T* K = static_cast<const T*>(a.k);
    const T* V = static_cast<const T*>(a.v);
#if WOW_AMX
    if constexpr (std::is_same_v<T, uint16_t> && D == 64) {
        if (amx && P <= 4) {
            _tile_loadconfig(&tile_config);
            alignas(64) uint16_t qp[32][16][2];   // [dim pair][query][2], zero past the row's P queries
            for (int r = 0; r < rows; ++r) {
                pair_queries(&Q[(size_t(r0 + r) * a.n_kv + h) * P * D], D, P, qp);
                const int64_t b = r0 + r;
                const size_t base = size_t(b * a.row_stride + h * a.head_stride);
                const uint8_t* m = a.mask ? a.mask + b * a.mask_stride : nullptr;
                const int64_t capacity = a.head_stride / D;    // slots of this row and head in the buffer
                State* rs = &st[size_t(r) * P];
                float* ra = &acc[size_t(r) * P * D];
                switch (P) {
                    case 1: own_amx<1>(&qp[0][0][0], K + base, V + base, m, a.own_start[g], a.own_len, capacity, a.scale, rs, ra); break;
                    case 2: own_amx<2>(&qp[0][0][0], K + base, V + base, m, a.own_start[g], a.own_len, capacity, a.scale, rs, ra); break;
                    case 3: own_amx<3>(&qp[0][0][0], K + base, V + base, m, a.own_start[g], a.own_len, capacity, a.scale, rs, ra); break;
                    default: own_amx<4>(&qp[0][0][0], K + base, V + base, m, a.own_start[g], a.own_len, capacity, a.scale, rs, ra);
                }
            }
            _tile_release();
            tiles_own = true;
        }
    }
#endif
    for (int r = 0; r < rows && !tiles_own; ++r) {
        const int64_t b = r0 + r;
        const size_t base = size_t(b * a.row_stride + h * a.head_stride);
        const uint8_t* m = a.mask ? a.mask + b * a.mask_stride : nullptr;
        int j = a.own_start[g];
        while (j < a.own_len) {
            int n = 0;
            for (; j < a.own_len && n < KB; ++j)
                if (!m || m[j]) {
                    kp[n] = K + base + size_t(j) * D;
                    vp[n] = V + base + size_t(j) * D;
                    ++n;
                }
            if (n == 0) break;
            for (int p = 0; p < P; ++p) {
                const size_t x = size_t(r) * P + p;
                scores_rows<D>(&q[x * D], kp.data(), n, s);
                fold<D>(s, vp.data(), n, st[x], &acc[x * D]);
            }
        }
    }
    T* O = static_cast<T*>(a.out);
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < P; ++p) {
            const size_t x = size_t(r) * P + p;
            const float norm = st[x].sum > 0.0f ? 1.0f / st[x].sum : 0.0f;
            for (int e = 0; e < D; ++e)
                store(acc[x * D + e] * norm, &O[((size_t(r0 + r) * a.n_kv + h) * P + p) * D + e]);
        }
}

template <int D, typename T>
void run(const Args& a, int n_live, int chunk, int threads) {
    struct Work { int i, h, r0, r1; };
    std::vector<Work> work;
    for (int i = 0; i < n_live; ++i)
        for (int r0 = a.first[i]; r0 < a.first[i] + a.count[i]; r0 += chunk)
            for (int h = 0; h < a.n_kv; ++h)
                work.push_back({i, h, r0, std::min(r0 + chunk, a.first[i] + a.count[i])});
    // OpenMP: the library is linked against libgomp.so.1, which resolves to the copy torch has already
    // loaded, so these threads are torch's own warm pool (separate threads competed with its
    // spinning workers and gained nothing at 2 threads)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (size_t w = 0; w < work.size(); ++w) item<D, T>(a, work[w].i, work[w].h, work[w].r0, work[w].r1);
}

template <typename T>
int dispatch(const Args& a, int d, int n_live, int chunk, int threads) {
    switch (d) {
        case 16: run<16, T>(a, n_live, chunk, threads); return 0;
        case 32: run<32, T>(a, n_live, chunk, threads); return 0;
        case 64: run<64, T>(a, n_live, chunk, threads); return 0;
        case 128: run<128, T>(a, n_live, chunk, threads); return 0;
        default: return 2;                         // head dim not compiled in
    }
}

}  // namespace

extern "C" {

int wow_abi_version() { return 2; }

// 1 where heads of this dtype (0 = float32, 1 = bfloat16) and head dim are read by AMX tiles, so
// decode_kernel.HeadTable lays them out in pairs (layouts above); 0 elsewhere.
// Causal prefill attention (causal_prefill above); 0, or 3 where AMX is not in use (wow_paired).
int wow_causal_prefill(const void* q, const void* kp, const void* vp, int L, int n_kv, int P, float scale,
                       void* out, int threads) {
#if WOW_AMX
    if (!amx_permitted()) return 3;
    causal_prefill(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(kp), static_cast<const uint16_t*>(vp),
                   L, n_kv, P, scale, static_cast<uint16_t*>(out), threads);
    return 0;
#else
    (void)q, (void)kp, (void)vp, (void)L, (void)n_kv, (void)P, (void)scale, (void)out, (void)threads;
    return 3;
#endif
}

int wow_paired(int dtype, int d) {
#if WOW_AMX
    return amx_permitted() && dtype == 1 && d == 64;
#else
    (void)dtype;
    (void)d;
    return 0;
#endif
}

// 1 where the AVX-512 paths were compiled in; the portable loops are correct but not faster than torch.
int wow_vectorised() {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

// dtype: 0 = float32, 1 = bfloat16. Returns 0, or 1 (bad dtype), 2 (head dim not supported).
int wow_cascade_decode(int dtype, const void* q, const void* k, const void* v, int64_t row_stride,
                       int64_t head_stride, const uint8_t* mask, int64_t mask_stride, int own_len, int n_live,
                       const int* first, const int* count, const int* own_start, const int* group,
                       const void* const* head_k, const void* const* head_v, const int* head_len, int n_kv, int P,
                       int d, float scale, void* out, int chunk, int threads) {
    const Args a{q, k, v, row_stride, head_stride, mask, mask_stride, own_len, first, count, own_start, group,
                 head_k, head_v, head_len, n_kv, P, scale, out};
    if (dtype == 0) return dispatch<float>(a, d, n_live, chunk, threads);
    if (dtype == 1) return dispatch<uint16_t>(a, d, n_live, chunk, threads);
    return 1;
}

}
