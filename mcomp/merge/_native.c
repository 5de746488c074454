/* Fused inner loops of the merge engine (PCB's balancing, drop-and-rescale and combine; the
 * order-statistic bracket scan; PCB's candidate bits), called through ctypes by
 * mcomp/merge/native.py. The NumPy chain they replace streams its block through memory once
 * per operation (about twenty for PCB's β); here each value is loaded once and every
 * intermediate stays in registers. The arithmetic is the NumPy path's, operation for
 * operation and in the same order; only exp and tanh come from glibc's vector maths library
 * (libmvec, at most 4 ulp), far inside the engine's 1e-6 relative agreement with the reference.
 *
 * No Python objects are touched: callers pass raw pointers, and ctypes releases the GIL, so
 * the engine's worker threads run these in parallel. Task vectors come as a `src_t` (float32
 * rows, or the stored base and model values, decoded here). The module init below only makes
 * this a valid extension.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build, the best vector width at run time (AVX-512, AVX2, SSE2) */
#define MC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
/* let the vectoriser call libmvec's vector exp/tanh (math.h declares these only under -ffast-math) */
extern float expf(float) __attribute__((simd("notinbranch")));
extern float tanhf(float) __attribute__((simd("notinbranch")));
#else
#define MC_CLONES
#endif

/* Set through mc_use_portable (tests): the CPU-feature dispatchers take their portable paths, so
 * that those are checked on machines that would never run them. */
static int use_portable = 0;

void mc_use_portable(int on) { use_portable = on; }

#define MC_TILE 256 /* columns per tile: n tiles of intermediates stay in L1; a multiple of 16 */

/* Every loop over a tile runs over all MC_TILE lanes of 64-byte aligned buffers (a short tile is
 * zero-padded), so the vectoriser needs no scalar prologue or epilogue: each value goes through
 * the same vector exp/tanh wherever it sits, and results do not depend on chunking or blocking. */
typedef struct {
    float *tau, *a, *norm, *hat, *beta; /* n × MC_TILE each */
} tile_t;

static int tile_alloc(tile_t *tl, int n) {
    float *p = aligned_alloc(64, sizeof(float) * (size_t)n * MC_TILE * 5);
    if (!p) return -1;
    tl->tau = p;
    tl->a = p + (size_t)n * MC_TILE;
    tl->norm = p + (size_t)2 * n * MC_TILE;
    tl->hat = p + (size_t)3 * n * MC_TILE;
    tl->beta = p + (size_t)4 * n * MC_TILE;
    return 0;
}

#define ROW(buf, i) ((float *)__builtin_assume_aligned((buf) + (size_t)(i) * MC_TILE, 64))

static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* Where a kernel reads τ: float32 rows (tau, row stride ld), or the stored values of the base
 * and of the n models (dtype 1 float16, 2 bfloat16, 3 float32; model rows are separate arrays),
 * τ_i = float(θ_i) − float(θ0) in float32, as the engine's reader computes it. Decoding here
 * saves a float32 copy of every chunk per pass. */
typedef struct {
    const float *tau;
    long ld;
    const void *base;
    const void *const *models;
    int dtype;
} src_t;

static inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float16 bits -> float32, exactly, in integer and float operations the vectoriser handles on
 * every target (GCC 12 does not vectorise _Float16 conversions): a normal value's exponent and
 * mantissa moved into place and scaled by 2^112, a subnormal one as its integer mantissa times
 * 2^-24 (no float32 subnormal on the way, so flush-to-zero modes cannot change it), Inf/NaN
 * given the float32 all-ones exponent, the sign put back. */
static inline float half_float(uint16_t h) {
    uint32_t em = h & 0x7FFFu;
    float mag = em < 0x400u ? (float)em * 0x1p-24f : bits_float(em << 13) * 0x1p112f;
    uint32_t u;
    memcpy(&u, &mag, sizeof u);
    u = em >= 0x7C00u ? (em << 13) | 0x7F800000u : u;
    return bits_float(u | ((uint32_t)(h & 0x8000u) << 16));
}

static inline float bf16_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

/* t[j] = float(m[j]) − float(b[j]) for float16 m, b over j < tw. Where the CPU has F16C (x86-64
 * since 2012), its conversion instruction does 8 values at once, several times cheaper than the
 * decoding arithmetic; both are exact, so the results are the same bits either way. (Decoding
 * θ0 once per tile instead of once per row measured no faster.) */
static inline void halves_sub_portable(const uint16_t *m, const uint16_t *b, long tw, float *t) {
    for (long j = 0; j < tw; j++) t[j] = half_float(m[j]) - half_float(b[j]);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
__attribute__((target("avx,f16c"))) static void halves_sub_f16c(const uint16_t *m, const uint16_t *b, long tw,
                                                                  float *t) {
    long j = 0;
    for (; j + 8 <= tw; j += 8) {
        __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + j)));
        __m256 y = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j)));
        _mm256_storeu_ps(t + j, _mm256_sub_ps(x, y));
    }
    halves_sub_portable(m + j, b + j, tw - j, t + j);
}

static void halves_sub(const uint16_t *m, const uint16_t *b, long tw, float *t) {
    if (!use_portable && __builtin_cpu_supports("f16c"))
        halves_sub_f16c(m, b, tw, t);
    else
        halves_sub_portable(m, b, tw, t);
}
#else
static void halves_sub(const uint16_t *m, const uint16_t *b, long tw, float *t) { halves_sub_portable(m, b, tw, t); }
#endif

/* τ_i = θ_i − θ0 for every row i at the columns col[0..tw) of 16-bit stored values (dtype 1 float16,
 * 2 bfloat16), into the tile's rows: θ0's values gathered once for all rows, each row's raw values
 * gathered, then decoded together so that the decoding vectorises. Kept out of line: inlined, its
 * buffers slowed the contiguous loads of `tile_load` by a quarter. */
MC_CLONES __attribute__((noinline)) static void gather_halves(tile_t *tl, const src_t *src, int n,
                                                              const int64_t *col, long tw) {
    uint16_t gm[MC_TILE], gb[MC_TILE];
    const uint16_t *b = src->base;
    for (long j = 0; j < tw; j++) gb[j] = b[col[j]];
    for (int i = 0; i < n; i++) {
        const uint16_t *m = src->models[i];
        float *t = ROW(tl->tau, i);
        for (long j = 0; j < tw; j++) gm[j] = m[col[j]];
        if (src->dtype == 1)
            halves_sub(gm, gb, tw, t);
        else
            for (long j = 0; j < tw; j++) t[j] = bf16_float(gm[j]) - bf16_float(gb[j]);
    }
}

/* Load columns [c, c + tw), or columns col[c..c+tw) when col is set, zero-padded to the tile. */
static inline void tile_load(tile_t *tl, const src_t *src, int n, const int64_t *col, long c, long tw) {
    if (col && !src->tau && src->dtype != 3) {
        gather_halves(tl, src, n, col + c, tw);
    } else {
        for (int i = 0; i < n; i++) {
            float *t = ROW(tl->tau, i);
            if (src->tau) {
                const float *row = src->tau + i * src->ld;
                if (col)
                    for (long j = 0; j < tw; j++) t[j] = row[col[c + j]];
                else
                    for (long j = 0; j < tw; j++) t[j] = row[c + j];
            } else if (col) {
                const float *m = src->models[i], *b = src->base;
                for (long j = 0; j < tw; j++) t[j] = m[col[c + j]] - b[col[c + j]];
            } else if (src->dtype == 1) {
                const uint16_t *m = (const uint16_t *)src->models[i] + c, *b = (const uint16_t *)src->base + c;
                halves_sub(m, b, tw, t);
            } else if (src->dtype == 2) {
                const uint16_t *m = (const uint16_t *)src->models[i] + c, *b = (const uint16_t *)src->base + c;
                for (long j = 0; j < tw; j++) t[j] = bf16_float(m[j]) - bf16_float(b[j]);
            } else {
                const float *m = (const float *)src->models[i] + c, *b = (const float *)src->base + c;
                for (long j = 0; j < tw; j++) t[j] = m[j] - b[j];
            }
        }
    }
    for (int i = 0; i < n; i++)
        for (long j = tw; j < MC_TILE; j++) ROW(tl->tau, i)[j] = 0.0f;
}

/* Whether every τ_i of the loaded tile is finite (its zero padding is); a NaN or ±Inf in θ0 or θ_i
 * makes τ_i one, as does a float32 overflow of the subtraction. */
static inline int tile_finite(const tile_t *tl, int n) {
    int bad = 0;
    for (int i = 0; i < n; i++) {
        const float *t = ROW(tl->tau, i);
#pragma omp simd reduction(| : bad)
        for (long j = 0; j < MC_TILE; j++) bad |= !(fabsf(t[j]) <= FLT_MAX);
    }
    return !bad;
}

/* One row's tile x[0:tw] against a bracket [l, u]: *below += #{x < l}; the values inside are
 * appended to out[*found...] (one spare slot needed), or, for a point bracket (l == u, a mass
 * of tied values), only counted. Hits are sparse (a narrow bracket) but land in most tiles, so
 * the copy goes 16 values at a time and runs (branchless: store every value, advance past the
 * kept ones) only in groups with a hit. */
static inline void bracket_tile_portable(const float *x, long tw, float l, float u, int64_t *below, float *out,
                                         int64_t *found) {
    int cnt = 0, any = 0;
#pragma omp simd reduction(+ : cnt) reduction(| : any)
    for (long j = 0; j < tw; j++) {
        cnt += x[j] < l;
        any |= (x[j] >= l) & (x[j] <= u);
    }
    *below += cnt;
    if (!any) return;
    if (l == u) {
        int eq = 0;
#pragma omp simd reduction(+ : eq)
        for (long j = 0; j < tw; j++) eq += x[j] == l;
        *found += eq;
        return;
    }
    int64_t m = *found;
    for (long g = 0; g < tw; g += 16) {
        long gw = tw - g < 16 ? tw - g : 16;
        const float *v = x + g;
        int hit = 0;
        for (long j = 0; j < gw; j++) hit |= (v[j] >= l) & (v[j] <= u);
        if (!hit) continue;
        for (long j = 0; j < gw; j++) {
            out[m] = v[j];
            m += (v[j] >= l) & (v[j] <= u);
        }
    }
    *found = m;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* bracket_tile with AVX-512: per 16 values two mask compares, the count of those below, and the
 * ones inside stored in order by one compress store (the portable copy costs as much as the rest
 * of the scan where hits land in most tiles). The same counts and values, in the same order. */
__attribute__((target("avx512f"))) static void bracket_tile_avx512(const float *x, long tw, float l, float u,
                                                                   int64_t *below, float *out, int64_t *found) {
    const __m512 vl = _mm512_set1_ps(l), vu = _mm512_set1_ps(u);
    int64_t cnt = 0, m = *found;
    int point = l == u;
    for (long j = 0; j < tw; j += 16) {
        __mmask16 live = tw - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (tw - j)) - 1u);
        __m512 v = _mm512_maskz_loadu_ps(live, x + j);
        __mmask16 lt = _mm512_mask_cmp_ps_mask(live, v, vl, _CMP_LT_OQ);
        __mmask16 in = _mm512_mask_cmp_ps_mask(live, v, vl, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, vu, _CMP_LE_OQ);
        cnt += __builtin_popcount(lt);
        if (in) {
            if (!point) _mm512_mask_compressstoreu_ps(out + m, in, v);
            m += __builtin_popcount(in);
        }
    }
    *below += cnt;
    *found = m;
}

static inline void bracket_tile(const float *x, long tw, float l, float u, int64_t *below, float *out,
                                int64_t *found) {
    if (!use_portable && __builtin_cpu_supports("avx512f"))
        bracket_tile_avx512(x, tw, l, u, below, out, found);
    else
        bracket_tile_portable(x, tw, l, u, below, out, found);
}
#else
static inline void bracket_tile(const float *x, long tw, float l, float u, int64_t *below, float *out,
                                int64_t *found) {
    bracket_tile_portable(x, tw, l, u, below, out, found);
}
#endif

/* Pack keep[0:tw] (0/1 per column) into bits, np.packbits order (the first column in the top
 * bit; a short last byte padded with 0); returns the number of ones. */
static inline long pack_bits(const uint8_t *keep, long tw, uint8_t *bits) {
    long ones = 0;
    for (long b = 0; b * 8 < tw; b++) {
        const uint8_t *k8 = keep + b * 8;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        /* one multiply gathers the eight 0/1 bytes into the top byte, k8[0] in its top bit
         * (each product bit lands at a distinct position, so nothing carries) */
        uint64_t x;
        memcpy(&x, k8, 8);
        unsigned byte = (unsigned)((x * 0x8040201008040201ULL) >> 56);
#else
        unsigned byte = (unsigned)k8[0] << 7 | (unsigned)k8[1] << 6 | (unsigned)k8[2] << 5 | (unsigned)k8[3] << 4 |
                        (unsigned)k8[4] << 3 | (unsigned)k8[5] << 2 | (unsigned)k8[6] << 1 | (unsigned)k8[7];
#endif
        bits[b] = (uint8_t)byte;
        ones += __builtin_popcount(byte);
    }
    return ones;
}

/* PCB steps 1-5 on the loaded tile: a = clamp(|τ|, lo, hi); N = (a − lo)/(hi − lo) (0 for a
 * range that is not positive); β = exp(n·N²) ⊙ inter, inter by variant 1, 2 or 3.
 * Not inlined: inlined into two callers, the vectoriser may pick different vector widths (so
 * different vector exp/tanh) in each, and the merge pass must reproduce stage 1's β bit for
 * bit (an element tied with the threshold t_i must get s_i = 0 in both). */
MC_CLONES __attribute__((noinline)) static void tile_beta(tile_t *tl, int n, const float *lo, const float *hi, int variant) {
    float sum[MC_TILE] __attribute__((aligned(64)));
    float nf = (float)n;
    for (int i = 0; i < n; i++) {
        const float *t = ROW(tl->tau, i);
        float *a = ROW(tl->a, i), *nm = ROW(tl->norm, i), *h = ROW(tl->hat, i);
        float l = lo[i], u = hi[i], range = u - l;
        int ok = range > 0.0f;
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) {
            float v = fabsf(t[j]);
            v = v < l ? l : v;
            v = v > u ? u : v;
            a[j] = v;
            nm[j] = ok ? (v - l) / range : 0.0f;
        }
        if (variant != 1) {
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) h[j] = sign_of(t[j]) * nm[j];
        }
    }
    if (variant != 3) { /* v1: Σ_j τ_j; v2: Σ_j τ̂_j (in row order) */
        const float *src = variant == 1 ? tl->tau : tl->hat;
        const float *s0 = ROW(src, 0);
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) sum[j] = s0[j];
        for (int i = 1; i < n; i++) {
            const float *si = ROW(src, i);
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) sum[j] += si[j];
        }
    }
    for (int i = 0; i < n; i++) {
        const float *t = ROW(tl->tau, i), *nm = ROW(tl->norm, i), *h = ROW(tl->hat, i);
        float *b = ROW(tl->beta, i);
        if (variant == 3) { /* Σ_k tanh(τ̂_i τ̂_k), summed in k order */
            const float *h0 = ROW(tl->hat, 0);
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) b[j] = tanhf(h[j] * h0[j]);
            for (int k = 1; k < n; k++) {
                const float *hk = ROW(tl->hat, k);
#pragma omp simd
                for (long j = 0; j < MC_TILE; j++) b[j] += tanhf(h[j] * hk[j]);
            }
        } else {
            /* tanh(y) rounds to y itself for |y| < 2^-12 (|tanh y − y| < |y|·y²/3, under half an ulp),
             * and in fine-tuned models most |y| are that small: y is taken there, and a group of 16
             * calls the vector tanh only when one of its values is larger (each value's result does
             * not depend on its neighbours) */
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) b[j] = t[j] * sum[j];
            for (long g = 0; g < MC_TILE; g += 16) {
                int large = 0;
#pragma omp simd reduction(| : large)
                for (long j = g; j < g + 16; j++) large |= !(fabsf(b[j]) < 0x1p-12f);
                if (!large) continue;
#pragma omp simd
                for (long j = g; j < g + 16; j++) b[j] = fabsf(b[j]) < 0x1p-12f ? b[j] : tanhf(b[j]);
            }
        }
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) b[j] = expf((nm[j] * nm[j]) * nf) * b[j];
    }
}

/* β (n × w, stride ldo) of the w columns of src. variant: 1, 2 or 3. */
MC_CLONES int mc_pcb_beta(const src_t *src, int n, long w, const float *lo, const float *hi, int variant,
                          float *out, long ldo) {
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    for (long c = 0; c < w; c += MC_TILE) {
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        tile_load(&tl, src, n, NULL, c, tw);
        tile_beta(&tl, n, lo, hi, variant);
        for (int i = 0; i < n; i++) {
            const float *b = ROW(tl.beta, i);
            float *o = out + i * ldo + c;
            for (long j = 0; j < tw; j++) o[j] = b[j];
        }
    }
    free(tl.tau);
    return 0;
}

/* For each byte value, the positions of its set bits (np.packbits order: the top bit first),
 * their count and the byte reversed. Filled once; concurrent first calls write the same bytes. */
static uint8_t bit_pos[256][8], bit_count[256], bit_rev[256]; /* bit_rev: the byte's bits in reverse order */
static int bit_table_ready = 0;

static void bit_table_init(void) {
    if (__atomic_load_n(&bit_table_ready, __ATOMIC_ACQUIRE)) return;
    for (int b = 0; b < 256; b++) {
        int k = 0;
        for (int j = 0; j < 8; j++)
            if (b & (0x80 >> j)) bit_pos[b][k++] = (uint8_t)j;
        bit_count[b] = (uint8_t)k;
        unsigned r = 0;
        for (int j = 0; j < 8; j++) r |= ((b >> j) & 1u) << (7 - j);
        bit_rev[b] = (uint8_t)r;
    }
    __atomic_store_n(&bit_table_ready, 1, __ATOMIC_RELEASE);
}

/* at + the set positions of byte to out (eight stores, so out needs room for 8); returns how many. */
static inline int byte_positions(unsigned byte, int64_t at, int64_t *out) {
    for (int j = 0; j < 8; j++) out[j] = at + bit_pos[byte][j];
    return bit_count[byte];
}

/* PCB's per-task scalars and merge parameters, as the merge kernels take them. */
typedef struct {
    const float *lo, *hi, *t, *m, *weights; /* weights may be NULL */
    int variant;
    float scale;
} merge_args_t;

/* PCB steps 1-7 on tw columns of src, col[c + k] (or c + k when col is NULL) for k < tw; each
 * merged value goes to out at its column's position:
 *   s_i = (clamp(β_i, t_i, m_i) − t_i)/(m_i − t_i) (0 when m_i <= t_i),
 *   out = scale · Σ_i λ_i s_i sign(τ_i) a_i / max(Σ_i s_i, 1e-12). */
static inline void merge_tile(tile_t *tl, const src_t *src, int n, const int64_t *col, long c, long tw,
                              const merge_args_t *g, float *out) {
    float num[MC_TILE] __attribute__((aligned(64))), den[MC_TILE] __attribute__((aligned(64)));
    memset(num, 0, sizeof num);
    memset(den, 0, sizeof den);
    tile_load(tl, src, n, col, c, tw);
    tile_beta(tl, n, g->lo, g->hi, g->variant);
    for (int i = 0; i < n; i++) {
        const float *ti = ROW(tl->tau, i), *ai = ROW(tl->a, i);
        float *s = ROW(tl->beta, i); /* s replaces β */
        float tt = g->t[i], mm = g->m[i], range = mm - tt;
        int ok = range > 0.0f;
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) {
            float v = s[j] < tt ? tt : s[j];
            v = v > mm ? mm : v;
            s[j] = ok ? (v - tt) / range : 0.0f;
        }
        float wi = g->weights ? g->weights[i] : 1.0f;
        int weighted = g->weights != NULL;
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) {
            float x = (sign_of(ti[j]) * ai[j]) * s[j];
            num[j] += weighted ? x * wi : x;
            den[j] += s[j];
        }
    }
    float scale = g->scale;
    for (long j = 0; j < tw; j++) {
        float v = num[j] / (den[j] > 1e-12f ? den[j] : 1e-12f);
        out[col ? col[c + j] : c + j] = scale != 1.0f ? v * scale : v;
    }
}

/* PCB steps 1-7 on the w columns of src, merged values to out[0:w] (see merge_tile). */
MC_CLONES int mc_pcb_merge(const src_t *src, int n, long w, const float *lo, const float *hi, const float *t,
                           const float *m, int variant, const float *weights, float scale, float *out) {
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    merge_args_t g = {lo, hi, t, m, weights, variant, scale};
    for (long c = 0; c < w; c += MC_TILE) merge_tile(&tl, src, n, NULL, c, w - c < MC_TILE ? w - c : MC_TILE, &g, out);
    free(tl.tau);
    return 0;
}

#define MC_GATHER_AHEAD 2048 /* columns */

/* The merge pass over w columns of src where stage 1 recorded candidate bits (np.packbits
 * order, a short last byte padded with 0): out[0:w] gets exact zeros where the bit is clear
 * (no task can pass its threshold there) and merge_tile's value where it is set. The set
 * columns are gathered, in order, into full tiles, so β is computed on them only. */
MC_CLONES int mc_pcb_merge_bits(const src_t *src, int n, long w, const uint8_t *bits, const float *lo,
                                const float *hi, const float *t, const float *m, int variant, const float *weights,
                                float scale, float *out) {
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    merge_args_t g = {lo, hi, t, m, weights, variant, scale};
    int64_t col[MC_TILE + 8]; /* pending set columns: a byte adds at most 8 */
    long k = 0;
    bit_table_init();
    memset(out, 0, sizeof(float) * (size_t)w);
    /* the stored rows are read a few in a column here and there: their 64-byte lines are fetched
     * MC_GATHER_AHEAD columns ahead, the hardware prefetchers not following such reads */
    long es = src->tau ? 0 : src->dtype == 3 ? 4 : 2;      /* bytes a value */
    long line_mask = es ? 64 / (8 * es) - 1 : -1;            /* bytes of bits a line, less 1 */
    for (long b = 0; b * 8 < w; b++) {
        if (line_mask >= 0 && (b & line_mask) == 0 && b * 8 + MC_GATHER_AHEAD < w) {
            long ahead = (b * 8 + MC_GATHER_AHEAD) * es;
            __builtin_prefetch((const char *)src->base + ahead);
            for (int i = 0; i < n; i++) __builtin_prefetch((const char *)src->models[i] + ahead);
        }
        k += byte_positions(bits[b], b * 8, col + k); /* the last byte's padding bits are 0 */
        if (k >= MC_TILE) {
            merge_tile(&tl, src, n, col, 0, MC_TILE, &g, out);
            for (long j = MC_TILE; j < k; j++) col[j - MC_TILE] = col[j];
            k -= MC_TILE;
        }
    }
    if (k) merge_tile(&tl, src, n, col, 0, k, &g, out);
    free(tl.tau);
    return 0;
}

/* One tile of β (its first tw columns) reduced into stage 1's statistics (see mc_pcb_stage1);
 * keep[j] gets whether some β_i exceeds floors[i] (when floors is set). The maximum and keep run
 * over the first `lanes` columns: tw, or the whole tile when its padding repeats a real column. */
static inline void stage1_reduce(const tile_t *tl, int n, long tw, long lanes, const float *blo, const float *bhi,
                                 int64_t *below, float *collect, long ldc, int64_t *found, float *maxv,
                                 const float *floors, uint8_t *keep) {
    memset(keep, 0, MC_TILE);
    for (int i = 0; i < n; i++) {
        const float *b = ROW(tl->beta, i);
        float mx = maxv[i];
#pragma omp simd reduction(max : mx)
        for (long j = 0; j < lanes; j++) mx = b[j] > mx ? b[j] : mx;
        maxv[i] = mx;
        bracket_tile(b, tw, blo[i], bhi[i], &below[i], collect + i * ldc, &found[i]);
        if (floors) {
            float f = floors[i];
#pragma omp simd
            for (long j = 0; j < lanes; j++) keep[j] |= b[j] > f;
        }
    }
}

/* The positions j of the set keep[j] (0/1 bytes, MC_TILE of them), in order; returns how many
 * (cols needs room for MC_TILE + 8). */
static inline long keep_columns(const uint8_t *keep, int64_t *cols) {
    uint8_t bytes[MC_TILE / 8];
    pack_bits(keep, MC_TILE, bytes);
    long k = 0;
    for (long b = 0; b < MC_TILE / 8; b++)
        if (bytes[b]) k += byte_positions(bytes[b], b * 8, cols + k);
    return k;
}

/* The statistics stage 1 accumulates over a call (see mc_pcb_stage1). */
typedef struct {
    const float *lo, *hi, *blo, *bhi, *floors;
    int64_t *below, *found, *marked;
    float *collect, *maxv;
    long ldc;
    uint8_t *bits;
} stage1_out_t;

/* β of the pk (> 0) columns gathered into pt reduced into `o`; keep[q] gets whether some β_i of
 * gathered column q exceeds floors[i]. The padding repeats the last column, so the maximum and
 * keep run over the whole tile. */
MC_CLONES __attribute__((noinline)) static void stage1_gathered(tile_t *pt, int n, long pk, const stage1_out_t *o,
                                                                uint8_t *keep) {
    for (int i = 0; i < n; i++) {
        float *row = ROW(pt->tau, i), last = row[pk - 1];
        for (long j = pk; j < MC_TILE; j++) row[j] = last;
    }
    tile_beta(pt, n, o->lo, o->hi, 1);
    stage1_reduce(pt, n, pk, MC_TILE, o->blo, o->bhi, o->below, o->collect, o->ldc, o->found, o->maxv, o->floors,
                  keep);
}

/* stage1_gathered, then the candidate bits of the gathered columns (pcol[q]: column numbers in
 * the call) set; the caller cleared them all. */
static void stage1_flush(tile_t *pt, int n, long pk, const int32_t *pcol, const stage1_out_t *o) {
    uint8_t keep[MC_TILE];
    stage1_gathered(pt, n, pk, o, keep);
    if (!o->floors) return;
    uint8_t *bits = o->bits;
    int64_t marked = 0;
    for (long q = 0; q < pk; q++) {
        int32_t col = pcol[q];
        bits[col >> 3] |= (uint8_t)(keep[q] << (7 - (col & 7)));
        marked += keep[q];
    }
    *o->marked += marked;
}

/* Tasks up to which variant 1's β has the estimate below (its exponent field stays in range). */
#define MC_BOUND_TASKS 32

/* Variant 1's constants for deciding columns by an estimate of β (see mc_pcb_stage1): per row
 * 1/(hi − lo) and the limits the estimate is compared with; scale = n·log2(e)·2^23. */
typedef struct {
    const float *lo, *hi;
    float rinv[MC_BOUND_TASKS], below[MC_BOUND_TASKS], above[MC_BOUND_TASKS], scale;
} bound_t;

/* The estimate's relative error, from above: exp(x) <= 2^k·(1 + f) <= 1.0615·exp(x) for
 * x·log2(e) = k + f, f in [0, 1) (2^f lies under its chord 1 + f, at most 1.0615 times below it);
 * the roundings of the estimate, of libmvec's exp and tanh and of tile_beta's own are under 2^-13. */
#define MC_ESTIMATE_HIGH 1.072f  /* > 1.0615 with the roundings and tanh's shortfall below */
#define MC_ESTIMATE_LOW 0.9921875f /* 1 − 2^-7 */
#define MC_TANH_NEAR 0x1p-6f     /* for 0 < y below this, tanh y >= y·(1 − y²/3) > y·(1 − 2^-13.6) */

/* The estimate exp(n·N²)·y (N = (clamp(|τ|, lo, hi) − lo)/(hi − lo), y = τ·Σ_j τ_j) of one value's β:
 * 2^k·(1 + f)·y, the float whose exponent field is 127 + k and mantissa field f made by one
 * conversion. */
static inline float beta_estimate(float t, float y, float l, float u, float rinv, float scale) {
    float v = fabsf(t);
    v = v < l ? l : v;
    v = v > u ? u : v;
    float nn = (v - l) * rinv;
    return bits_float((uint32_t)((int32_t)((nn * nn) * scale) + (127 << 23))) * y;
}

/* The row limit under which an estimate decides β below `limit`, over which (with y < MC_TANH_NEAR)
 * it decides β above it: β <= 0 where y <= 0, and otherwise β lies within the estimate's error
 * (above). A limit that is not positive decides nothing on that side. */
static inline float estimate_below(float limit) { return limit > 0.0f ? limit * MC_ESTIMATE_LOW : -INFINITY; }
static inline float estimate_above(float limit) { return limit > 0.0f ? limit * MC_ESTIMATE_HIGH : INFINITY; }

/* Variant 1's stage 1 on a loaded tile (first tw columns): per row, a column's estimate of β decides
 * it below bd->below[i] (counted below the row's bracket) or above bd->above[i] and under the row's
 * running maximum (its candidate bit set); the columns some row leaves open are appended, all n rows
 * of them, to the gathering tile pt (pt holds *pk, flushed when full), their column numbers (c + j)
 * to pcol. */
static void bound_tile_portable(tile_t *tl, int n, long tw, long c, const bound_t *bd, tile_t *pt, long *pk,
                                int32_t *pcol, const stage1_out_t *o) {
    float sum[MC_TILE] __attribute__((aligned(64)));
    uint8_t open[MC_TILE], over[MC_TILE], bytes[MC_TILE / 8];
    int64_t cols[MC_TILE + 8];
    const float *t0 = ROW(tl->tau, 0);
#pragma omp simd
    for (long j = 0; j < MC_TILE; j++) sum[j] = t0[j];
    for (int i = 1; i < n; i++) {
        const float *ti = ROW(tl->tau, i);
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) sum[j] += ti[j];
    }
    memset(open, 0, sizeof open);
    memset(over, 0, sizeof over);
    for (int i = 0; i < n; i++) { /* the estimates go to the tile's free rows (a) */
        const float *t = ROW(tl->tau, i);
        float *e = ROW(tl->a, i);
        float l = bd->lo[i], u = bd->hi[i], r = bd->rinv[i], fb = bd->below[i], fa = bd->above[i];
        float mx = estimate_below(o->maxv[i]);
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) {
            float y = t[j] * sum[j];
            e[j] = beta_estimate(t[j], y, l, u, r, bd->scale);
            uint8_t up = (e[j] > fa) & (e[j] <= mx) & (y < MC_TANH_NEAR);
            open[j] |= !((e[j] < fb) | up);
            over[j] |= up;
        }
    }
    for (long j = tw; j < MC_TILE; j++) open[j] = 0; /* the zero padding */
    for (int i = 0; i < n; i++) {
        const float *e = ROW(tl->a, i);
        float fb = bd->below[i];
        int64_t cnt = 0;
#pragma omp simd reduction(+ : cnt)
        for (long j = 0; j < tw; j++) cnt += !open[j] & (e[j] < fb);
        o->below[i] += cnt;
    }
    if (o->floors) {
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) over[j] &= !open[j] & (j < tw);
        *o->marked += pack_bits(over, tw, bytes);
        for (long b = 0; b * 8 < tw; b++) o->bits[c / 8 + b] |= bytes[b]; /* tiles start on a byte */
    }
    long k = keep_columns(open, cols);
    for (long q = 0; q < k; q++) {
        for (int i = 0; i < n; i++) ROW(pt->tau, i)[*pk] = ROW(tl->tau, i)[cols[q]];
        pcol[(*pk)++] = (int32_t)(c + cols[q]);
        if (*pk == MC_TILE) {
            stage1_flush(pt, n, *pk, pcol, o);
            *pk = 0;
        }
    }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* The 16-column groups whose open columns are gathered in pt, for the AVX-512 bound_tile. */
typedef struct {
    long ng;
    int32_t byte[MC_TILE];               /* the group's first column / 8 (groups start on a byte) */
    uint16_t mask[MC_TILE], at[MC_TILE]; /* its gathered columns; where in pt the first went */
} groups_t;

/* stage1_gathered on pt, then each group's candidate bits: the keep flags of its gathered columns
 * deposited at its gathered columns (pdep), bit-reversed into np.packbits order, added to the bits
 * its decided columns set. */
__attribute__((target("avx512f,avx512bw,bmi2"))) static void flush_groups(tile_t *pt, int n, long pk, groups_t *gr,
                                                                        const stage1_out_t *o, long nbytes) {
    uint8_t keep[MC_TILE] __attribute__((aligned(64)));
    stage1_gathered(pt, n, pk, o, keep);
    if (o->floors) {
        uint64_t kb[MC_TILE / 64 + 1];
        for (int k = 0; k < MC_TILE / 64; k++) {
            __m512i v = _mm512_load_si512((const void *)(keep + 64 * k));
            kb[k] = _mm512_test_epi8_mask(v, v);
        }
        kb[MC_TILE / 64] = 0;
        int64_t marked = 0;
        for (long g = 0; g < gr->ng; g++) {
            unsigned at = gr->at[g], sh = at & 63;
            uint64_t flags = kb[at >> 6] >> sh;
            if (sh) flags |= kb[(at >> 6) + 1] << (64 - sh);
            unsigned m = _pdep_u32((unsigned)flags, gr->mask[g]);
            marked += __builtin_popcount(m);
            o->bits[gr->byte[g]] |= bit_rev[m & 0xFF];
            if (gr->byte[g] + 1 < nbytes) o->bits[gr->byte[g] + 1] |= bit_rev[m >> 8];
        }
        *o->marked += marked;
    }
    gr->ng = 0;
}

/* One 16-column group of bound_tile_avx512 (n rows; a constant n keeps every mask in a register):
 * the lanes some row leaves open, the decided ones above some row's limit to *over, and per row the
 * decided lanes below its limit counted into below[i]. */
__attribute__((target("avx512f,avx512bw,bmi2"), always_inline)) static inline __mmask16
group_decide(const tile_t *tl, const int n, long j, __mmask16 live, const float *sum, const bound_t *bd,
             const float *mx, int64_t *below, __mmask16 *over) {
    __mmask16 under[MC_BOUND_TASKS], open = 0, up_any = 0;
    const __m512 s = _mm512_load_ps(sum + j), near = _mm512_set1_ps(MC_TANH_NEAR);
    const __m512i bias = _mm512_set1_epi32(127 << 23);
    for (int i = 0; i < n; i++) {
        __m512 t = _mm512_load_ps(ROW(tl->tau, i) + j);
        __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_abs_ps(t), _mm512_set1_ps(bd->lo[i])), _mm512_set1_ps(bd->hi[i]));
        __m512 nn = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_set1_ps(bd->lo[i])), _mm512_set1_ps(bd->rinv[i]));
        __m512i bits = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_mul_ps(nn, nn), _mm512_set1_ps(bd->scale)));
        __m512 y = _mm512_mul_ps(t, s);
        __m512 e = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_add_epi32(bits, bias)), y);
        __mmask16 lt = _mm512_cmp_ps_mask(e, _mm512_set1_ps(bd->below[i]), _CMP_LT_OQ);
        __mmask16 up = _mm512_cmp_ps_mask(e, _mm512_set1_ps(bd->above[i]), _CMP_GT_OQ) &
                       _mm512_cmp_ps_mask(e, _mm512_set1_ps(mx[i]), _CMP_LE_OQ) &
                       _mm512_cmp_ps_mask(y, near, _CMP_LT_OQ);
        under[i] = lt;
        up_any |= up;
        open |= (__mmask16)~(lt | up);
    }
    open &= live;
    __mmask16 decided = live & (__mmask16)~open;
    for (int i = 0; i < n; i++) below[i] += __builtin_popcount(under[i] & decided);
    *over = up_any & decided;
    return open;
}

/* bound_tile_portable with AVX-512: per 16 columns, group_decide, the decided columns' candidate
 * bits set at once, and each row's open values moved to pt by one compress (the group's mask and
 * place recorded for its bits); a group that might not fit in pt first flushes it (a tile computed
 * part-full). Gathered columns keep their order. */
__attribute__((target("avx512f,avx512bw,bmi2"))) static void bound_tile_avx512(tile_t *tl, int n, long tw, long c,
                                                                             const bound_t *bd, tile_t *pt, long *pk,
                                                                             groups_t *gr, const stage1_out_t *o,
                                                                             long nbytes) {
    float sum[MC_TILE] __attribute__((aligned(64))), mx[MC_BOUND_TASKS];
    int64_t below[MC_BOUND_TASKS] = {0}, marked = 0;
    for (long j = 0; j < MC_TILE; j += 16) {
        __m512 s = _mm512_load_ps(ROW(tl->tau, 0) + j);
        for (int i = 1; i < n; i++) s = _mm512_add_ps(s, _mm512_load_ps(ROW(tl->tau, i) + j));
        _mm512_store_ps(sum + j, s);
    }
    for (int i = 0; i < n; i++) mx[i] = estimate_below(o->maxv[i]);
    long at = *pk;
    for (long j = 0; j < tw; j += 16) {
        __mmask16 live = tw - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (tw - j)) - 1u), open, over;
        switch (n) { /* the common task counts unrolled */
        case 2: open = group_decide(tl, 2, j, live, sum, bd, mx, below, &over); break;
        case 3: open = group_decide(tl, 3, j, live, sum, bd, mx, below, &over); break;
        case 4: open = group_decide(tl, 4, j, live, sum, bd, mx, below, &over); break;
        default: open = group_decide(tl, n, j, live, sum, bd, mx, below, &over);
        }
        if (o->floors && over) {
            o->bits[(c + j) >> 3] |= bit_rev[over & 0xFF];
            if (((c + j) >> 3) + 1 < nbytes) o->bits[((c + j) >> 3) + 1] |= bit_rev[over >> 8];
            marked += __builtin_popcount(over);
        }
        if (!open) continue;
        if (at > MC_TILE - 16) { /* the full-width stores below need 16 free lanes */
            flush_groups(pt, n, at, gr, o, nbytes);
            at = 0;
            for (int i = 0; i < n; i++) mx[i] = estimate_below(o->maxv[i]);
        }
        /* compressed in a register, stored full width: a compress straight to memory is slower */
        for (int i = 0; i < n; i++)
            _mm512_storeu_ps(ROW(pt->tau, i) + at, _mm512_maskz_compress_ps(open, _mm512_load_ps(ROW(tl->tau, i) + j)));
        gr->byte[gr->ng] = (int32_t)((c + j) >> 3);
        gr->mask[gr->ng] = open;
        gr->at[gr->ng++] = (uint16_t)at;
        at += __builtin_popcount(open);
    }
    for (int i = 0; i < n; i++) o->below[i] += below[i];
    if (o->floors) *o->marked += marked;
    *pk = at;
}
#endif

/* Whether every row's 1/(hi − lo) is finite (the estimate's N stays within [0, 1]); a range so
 * small that it is not (under 2^-128) leaves the estimate aside. */
static int estimable(const float *lo, const float *hi, int n) {
    for (int i = 0; i < n; i++)
        if (hi[i] - lo[i] > 0.0f && !(1.0f / (hi[i] - lo[i]) <= FLT_MAX)) return 0;
    return 1;
}

/* PCB stage 1 on w columns of src, everything a block contributes in one sweep while the tile
 * is in cache: β (as mc_pcb_beta), and per row i
 *   below[i] += #{β < blo[i]}, the β in [blo[i], bhi[i]] appended to row i of collect (stride
 *   ldc >= w + 1; found[i] += their number; a point bracket only counts), maxv[i] = max(maxv[i], max β);
 * and, when floors is set, PCB's candidate bits (as mc_mark_above, of β against floors).
 *
 * Variant 1 computes β only where a cheap estimate leaves a column open: β_i = exp(n·N_i²)·tanh(y_i)
 * with y_i = τ_i·Σ_j τ_j is at most 0 where y_i <= 0, and where 0 < y_i < 2^-6 within a factor
 * 1.072 under beta_estimate's exp(n·N_i²)·y_i (a few vector operations; tanh y < y). A row decides a
 * column when the estimate lies below min(blo[i], floors[i]) (counted below the bracket, no bit) or
 * above max(bhi[i], floors[i]) and under maxv[i] (its bit set; neither the bracket nor the maximum
 * changes), each limit widened by the estimate's error. Columns some row leaves open (those near a
 * bracket, new maxima: a few in a hundred of a fine-tuned model's at ratio 0.1) are gathered into
 * full tiles whose β tile_beta computes, the same bits as computed in place. maxv[i] (which may come
 * in with a β of the row from earlier calls) is then exact where the row's largest β reaches
 * min(blo[i], floors[i]), and otherwise below it (then so is the row's k-th value, and the caller's
 * bracket misses). */
MC_CLONES int mc_pcb_stage1(const src_t *src, int n, long w, const float *lo, const float *hi, int variant,
                            const float *blo, const float *bhi, int64_t *below, float *collect, long ldc,
                            int64_t *found, float *maxv, const float *floors, uint8_t *bits, int64_t *marked) {
    tile_t tl, pt;
    uint8_t keep[MC_TILE];
    stage1_out_t o = {lo, hi, blo, bhi, floors, below, found, marked, collect, maxv, ldc, bits};
    if (tile_alloc(&tl, n)) return -1;
    if (variant != 1 || n > MC_BOUND_TASKS || !estimable(lo, hi, n)) {
        for (long c = 0; c < w; c += MC_TILE) {
            long tw = w - c < MC_TILE ? w - c : MC_TILE;
            tile_load(&tl, src, n, NULL, c, tw);
            tile_beta(&tl, n, lo, hi, variant);
            stage1_reduce(&tl, n, tw, tw, blo, bhi, below, collect, ldc, found, maxv, floors, keep);
            if (floors) *marked += pack_bits(keep, tw, bits + c / 8); /* tiles start on a byte */
        }
        free(tl.tau);
        return 0;
    }
    if (tile_alloc(&pt, n)) {
        free(tl.tau);
        return -1;
    }
    bound_t bd = {.lo = lo, .hi = hi, .scale = (float)n * (1.4427f * 0x1p23f)};
    for (int i = 0; i < n; i++) {
        bd.rinv[i] = hi[i] - lo[i] > 0.0f ? 1.0f / (hi[i] - lo[i]) : 0.0f; /* finite: see estimable */
        bd.below[i] = estimate_below(floors && floors[i] < blo[i] ? floors[i] : blo[i]);
        bd.above[i] = estimate_above(floors && floors[i] > bhi[i] ? floors[i] : bhi[i]);
    }
    if (floors) memset(bits, 0, (size_t)(w + 7) / 8);
    bit_table_init();
    long pk = 0; /* columns gathered into pt */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    if (!use_portable && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("bmi2")) {
        groups_t gr;
        gr.ng = 0;
        for (long c = 0; c < w; c += MC_TILE) {
            long tw = w - c < MC_TILE ? w - c : MC_TILE;
            tile_load(&tl, src, n, NULL, c, tw);
            bound_tile_avx512(&tl, n, tw, c, &bd, &pt, &pk, &gr, &o, (w + 7) / 8);
        }
        if (pk) flush_groups(&pt, n, pk, &gr, &o, (w + 7) / 8);
        free(pt.tau);
        free(tl.tau);
        return 0;
    }
#endif
    int32_t pcol[MC_TILE];
    for (long c = 0; c < w; c += MC_TILE) {
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        tile_load(&tl, src, n, NULL, c, tw);
        bound_tile_portable(&tl, n, tw, c, &bd, &pt, &pk, pcol, &o);
    }
    if (pk) stage1_flush(&pt, n, pk, pcol, &o);
    free(pt.tau);
    free(tl.tau);
    return 0;
}

/* Order statistics of |τ| over w columns of src, nb brackets per row: for row i and bracket k
 * (index q = i * nb + k), below[q] += #{|τ_i| < blo[q]} and the |τ_i| in [blo[q], bhi[q]] are
 * appended to row q of collect (stride ldc >= w + 1; found[q] += their number). A point bracket
 * (blo[q] == bhi[q], a mass of tied values) only counts them. *finite is set to 1 when every τ_i
 * is finite, else 0 (as mc_all_finite, at almost no cost here: the values are in registers). */
MC_CLONES int mc_abs_brackets(const src_t *src, int n, long w, int nb, const float *blo, const float *bhi,
                              int64_t *below, float *collect, long ldc, int64_t *found, int *finite) {
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    int bad = 0;
    for (long c = 0; c < w; c += MC_TILE) {
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        tile_load(&tl, src, n, NULL, c, tw);
        for (int i = 0; i < n; i++) {
            const float *t = ROW(tl.tau, i);
            float *a = ROW(tl.a, i);
#pragma omp simd reduction(| : bad)
            for (long j = 0; j < MC_TILE; j++) { /* the padding is zero, so finite */
                a[j] = fabsf(t[j]);
                bad |= !(a[j] <= FLT_MAX);
            }
            for (int k = 0; k < nb; k++) {
                int q = i * nb + k;
                bracket_tile(a, tw, blo[q], bhi[q], &below[q], collect + q * ldc, &found[q]);
            }
        }
    }
    free(tl.tau);
    *finite = !bad;
    return 0;
}

/* 1 when every τ_i of src over w columns is finite, else 0 (a NaN or ±Inf in θ0 or θ_i makes τ_i
 * one, as does a float32 overflow of the subtraction). */
MC_CLONES int mc_all_finite(const src_t *src, int n, long w) {
    if (!src->tau && src->dtype == 1) { /* float16: τ cannot overflow float32, so the stored bits
                                           suffice: exponent all ones means NaN or Inf */
        int bad = 0;
        for (int i = -1; i < n; i++) {
            const uint16_t *p = i < 0 ? src->base : src->models[i];
#pragma omp simd reduction(| : bad)
            for (long j = 0; j < w; j++) bad |= (p[j] & 0x7C00) == 0x7C00;
        }
        return !bad;
    }
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    int bad = 0;
    for (long c = 0; c < w && !bad; c += MC_TILE) {
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        tile_load(&tl, src, n, NULL, c, tw);
        bad = !tile_finite(&tl, n);
    }
    free(tl.tau);
    return !bad;
}

/* Over x[0:w]: the number of values < lo, and the values v with lo <= v <= hi (lo < hi) copied
 * to collect in order (room for w + 1). Returns how many were collected. */
MC_CLONES long mc_bracket_scan(const float *x, long w, float lo, float hi, float *collect, int64_t *below) {
    int64_t nb = 0, k = 0;
    for (long c = 0; c < w; c += MC_TILE) bracket_tile(x + c, w - c < MC_TILE ? w - c : MC_TILE, lo, hi, &nb, collect, &k);
    *below = nb;
    return (long)k;
}

/* Bit j of bits (np.packbits order: the first value in the top bit) is set where some row i
 * has x_i[j] > floors[i]. Returns the number of bits set. */
MC_CLONES long mc_mark_above(const float *x, int n, long w, long ld, const float *floors, uint8_t *bits) {
    long marked = 0;
    uint8_t keep[MC_TILE];
    for (long c = 0; c < w; c += MC_TILE) { /* MC_TILE is a multiple of 8: tiles start on a byte */
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        const float *x0 = x + c;
        float f0 = floors[0];
        memset(keep, 0, sizeof keep); /* the last byte's padding bits stay 0 */
#pragma omp simd
        for (long j = 0; j < tw; j++) keep[j] = x0[j] > f0;
        for (int i = 1; i < n; i++) {
            const float *xi = x + i * ld + c;
            float fi = floors[i];
#pragma omp simd
            for (long j = 0; j < tw; j++) keep[j] |= xi[j] > fi;
        }
        marked += pack_bits(keep, tw, bits + c / 8);
    }
    return marked;
}

/* The task-arithmetic family's steps (mcomp/merge/methods/family.py), as its torch path computes
 * them: trim t_i = τ_i · [|τ_i| >= thr_i]; drop t_i = τ_i · [u_i < density] (the comparison made
 * as the draws are, mc_mt_keep: a byte per value stays in cache where a float draw did not), then / density
 * (inverse) or · rescale_i (l1); t_i · w_i; then the sum t_0 + t_1 + … or TIES's election and
 * disjoint mean. Task arithmetic and linear (no sparsify, no election) are Σ_i w_i τ_i as
 * τ_0 w_0 then fused multiply-adds, as torch's vectorised add with alpha does. */
typedef struct {
    const float *thr;     /* per row; NULL: no trim */
    const uint8_t *keep;  /* DARE's [u_i < density] (0/1), n rows of stride ldk, column 0 at src's; NULL: no drop */
    long ldk;
    float density;
    const float *rescale; /* per row (l1 rescale); NULL: divide by density */
    const float *weights; /* per row; NULL: none */
    int consensus;        /* 0 none, 1 sign by mass, 2 sign by frequency */
    int plain;            /* 1: Σ_i w_i τ_i with the weights inside the sum (no sparsify) */
    float majority;       /* the scope's majority sign, where the elected sign is 0 */
    float scale;
} family_args_t;

/* The sparsified, weighted task vectors of the loaded tile into tl->a (n × MC_TILE). */
static inline void family_sparsify(tile_t *tl, int n, long c, long tw, const family_args_t *g) {
    uint8_t kb[MC_TILE];
    for (int i = 0; i < n; i++) {
        const float *t = ROW(tl->tau, i);
        float *a = ROW(tl->a, i);
#pragma omp simd
        for (long j = 0; j < MC_TILE; j++) a[j] = t[j];
        if (g->thr) {
            float th = g->thr[i];
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) a[j] = a[j] * (float)(fabsf(a[j]) >= th);
        }
        if (g->keep) {
            const uint8_t *k = g->keep + i * g->ldk + c;
            if (tw < MC_TILE) { /* a short tile: its mask padded (the padding's τ is 0 anyway) */
                memcpy(kb, k, (size_t)tw);
                memset(kb + tw, 0, (size_t)(MC_TILE - tw));
                k = kb;
            }
            float d = g->density;
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) a[j] = a[j] * (float)k[j];
            if (g->rescale) {
                float r = g->rescale[i];
#pragma omp simd
                for (long j = 0; j < MC_TILE; j++) a[j] = a[j] * r;
            } else {
#pragma omp simd
                for (long j = 0; j < MC_TILE; j++) a[j] = a[j] / d;
            }
        }
        if (g->weights) {
            float wi = g->weights[i];
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) a[j] = a[j] * wi;
        }
    }
}

/* The elected sign per column into el (before the majority fix-up). */
static inline void family_elect(tile_t *tl, int n, int consensus, float *el) {
    float sum[MC_TILE] __attribute__((aligned(64)));
#pragma omp simd
    for (long j = 0; j < MC_TILE; j++) sum[j] = 0.0f;
    for (int i = 0; i < n; i++) {
        const float *a = ROW(tl->a, i);
        if (consensus == 1) {
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) sum[j] += a[j];
        } else {
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) sum[j] += sign_of(a[j]);
        }
    }
#pragma omp simd
    for (long j = 0; j < MC_TILE; j++) el[j] = sign_of(sum[j]);
}

/* The family's merged values of the w columns of src to out[0:w]; *finite as mc_family_signs's. */
MC_CLONES int mc_family_merge(const src_t *src, int n, long w, const family_args_t *g, float *out, int *finite) {
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    float acc[MC_TILE] __attribute__((aligned(64))), cnt[MC_TILE] __attribute__((aligned(64)));
    int bad = 0;
    for (long c = 0; c < w; c += MC_TILE) {
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        tile_load(&tl, src, n, NULL, c, tw);
        bad |= !tile_finite(&tl, n);
        if (g->plain) {
            const float *t0 = ROW(tl.tau, 0);
            float w0 = g->weights ? g->weights[0] : 1.0f;
#pragma omp simd
            for (long j = 0; j < MC_TILE; j++) acc[j] = t0[j] * w0;
            for (int i = 1; i < n; i++) {
                const float *ti = ROW(tl.tau, i);
                float wi = g->weights ? g->weights[i] : 1.0f;
#pragma omp simd
                for (long j = 0; j < MC_TILE; j++) acc[j] = fmaf(ti[j], wi, acc[j]);
            }
        } else {
            family_sparsify(&tl, n, c, tw, g);
            if (g->consensus == 0) {
                const float *a0 = ROW(tl.a, 0);
#pragma omp simd
                for (long j = 0; j < MC_TILE; j++) acc[j] = a0[j];
                for (int i = 1; i < n; i++) {
                    const float *ai = ROW(tl.a, i);
#pragma omp simd
                    for (long j = 0; j < MC_TILE; j++) acc[j] += ai[j];
                }
            } else {
                float *el = ROW(tl.norm, 0);
                family_elect(&tl, n, g->consensus, el);
                float maj = g->majority;
#pragma omp simd
                for (long j = 0; j < MC_TILE; j++) {
                    el[j] = el[j] == 0.0f ? maj : el[j];
                    acc[j] = 0.0f;
                    cnt[j] = 0.0f;
                }
                for (int i = 0; i < n; i++) {
                    const float *a = ROW(tl.a, i);
#pragma omp simd
                    for (long j = 0; j < MC_TILE; j++) {
                        /* the agreeing sign in mask arithmetic: a conditional here vectorised to masked
                         * stores, which the next row's loads of acc and cnt then waited on */
                        int up = el[j] > 0.0f;
                        float x = a[j] * (float)((up & (a[j] > 0.0f)) | (!up & (a[j] < 0.0f)));
                        acc[j] += x;
                        cnt[j] += (float)(x != 0.0f);
                    }
                }
#pragma omp simd
                for (long j = 0; j < MC_TILE; j++) acc[j] = acc[j] / (cnt[j] < 1.0f ? 1.0f : cnt[j]);
            }
        }
        float scale = g->scale;
        for (long j = 0; j < tw; j++) out[c + j] = scale != 1.0f ? acc[j] * scale : acc[j];
    }
    free(tl.tau);
    *finite = !bad;
    return 0;
}

/* TIES's majority statistic over the w columns of src: *balance += #{elected > 0} − #{elected < 0};
 * *finite = whether every τ_i is (the first pass over the inputs checks them on the way). */
MC_CLONES int mc_family_signs(const src_t *src, int n, long w, const family_args_t *g, int64_t *balance,
                              int *finite) {
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    int64_t total = 0;
    int bad = 0;
    for (long c = 0; c < w; c += MC_TILE) {
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        tile_load(&tl, src, n, NULL, c, tw);
        bad |= !tile_finite(&tl, n);
        family_sparsify(&tl, n, c, tw, g);
        float *el = ROW(tl.norm, 0);
        family_elect(&tl, n, g->consensus, el);
        int pos = 0, neg = 0;
#pragma omp simd reduction(+ : pos, neg)
        for (long j = 0; j < MC_TILE; j++) { /* padding columns elect 0 */
            pos += el[j] > 0.0f;
            neg += el[j] < 0.0f;
        }
        total += pos - neg;
    }
    free(tl.tau);
    *balance += total;
    *finite = !bad;
    return 0;
}

/* DARE's l1 rescale statistics over the w columns of src, per row i: before[i] += Σ|τ_i|,
 * after[i] += Σ|τ_i|·keep_i (float64 sums; keep as family_args_t's); *finite as mc_family_signs's. */
MC_CLONES int mc_family_l1(const src_t *src, int n, long w, const uint8_t *keep, long ldk, double *before,
                           double *after, int *finite) {
    tile_t tl;
    if (tile_alloc(&tl, n)) return -1;
    int bad = 0;
    for (long c = 0; c < w; c += MC_TILE) {
        long tw = w - c < MC_TILE ? w - c : MC_TILE;
        tile_load(&tl, src, n, NULL, c, tw);
        bad |= !tile_finite(&tl, n);
        for (int i = 0; i < n; i++) {
            const float *t = ROW(tl.tau, i);
            const uint8_t *ki = keep + i * ldk + c;
            double b = 0.0, a = 0.0;
            for (long j = 0; j < tw; j++) {
                double v = fabsf(t[j]);
                b += v;
                a += ki[j] ? v : 0.0;
            }
            before[i] += b;
            after[i] += a;
        }
    }
    free(tl.tau);
    *finite = !bad;
    return 0;
}

/* torch's CPU generator, mt19937 (the reference algorithm: state twisted before the first
 * output), and torch.rand's float32 uniforms from it, one 32-bit output each: (r & 0xFFFFFF)·2^-24.
 * DARE's masks come from torch generators seeded per tensor and model; drawing the same numbers
 * here, several streams at once on the pool, spares torch.rand's per-value overhead. st[0..623]
 * is the state, st[624] the position of the next output (624: twist first). */
#define MT_N 624
#define MT_M 397

void mc_mt_seed(uint32_t *st, uint64_t seed) {
    st[0] = (uint32_t)(seed & 0xffffffffu);
    for (int i = 1; i < MT_N; i++) st[i] = 1812433253u * (st[i - 1] ^ (st[i - 1] >> 30)) + (uint32_t)i;
    st[MT_N] = MT_N;
}

/* Branch-free (the matrix term as a mask), so that each loop vectorises: the first reads only old
 * words, the second words made 227 (N − M) places back. */
MC_CLONES static void mt_twist(uint32_t *mt) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) {
        uint32_t y = (mt[i] & 0x80000000u) | (mt[i + 1] & 0x7fffffffu);
        mt[i] = mt[i + MT_M] ^ (y >> 1) ^ (-(y & 1u) & 0x9908b0dfu);
    }
    for (; i < MT_N - 1; i++) {
        uint32_t y = (mt[i] & 0x80000000u) | (mt[i + 1] & 0x7fffffffu);
        mt[i] = mt[i + (MT_M - MT_N)] ^ (y >> 1) ^ (-(y & 1u) & 0x9908b0dfu);
    }
    uint32_t y = (mt[MT_N - 1] & 0x80000000u) | (mt[0] & 0x7fffffffu);
    mt[MT_N - 1] = mt[MT_M - 1] ^ (y >> 1) ^ (-(y & 1u) & 0x9908b0dfu);
}

MC_CLONES void mc_mt_uniform(uint32_t *st, long count, float *out) {
    long done = 0;
    while (done < count) {
        if (st[MT_N] >= MT_N) {
            mt_twist(st);
            st[MT_N] = 0;
        }
        long pos = st[MT_N], take = MT_N - pos < count - done ? MT_N - pos : count - done;
        const uint32_t *s = st + pos;
        float *o = out + done;
#pragma omp simd
        for (long j = 0; j < take; j++) {
            uint32_t y = s[j];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            o[j] = (float)(int32_t)(y & 0xFFFFFFu) * 0x1p-24f; /* < 2^24: exact, a signed conversion vectorises */
        }
        st[MT_N] = (uint32_t)(pos + take);
        done += take;
    }
}

/* mc_mt_uniform's draws u, as DARE's keep mask: out[j] = u < density (0/1). */
MC_CLONES void mc_mt_keep(uint32_t *st, long count, float density, uint8_t *out) {
    float u[MT_N] __attribute__((aligned(64)));
    for (long done = 0; done < count; done += MT_N) {
        long take = count - done < MT_N ? count - done : MT_N;
        mc_mt_uniform(st, take, u);
#pragma omp simd
        for (long j = 0; j < take; j++) out[done + j] = u[j] < density;
    }
}

/* Stable ascending ranks of |x| along each of `rows` rows of `len` values (row r at x + r·len):
 * rank[r·len + j] is where x[j] of row r lands in a stable sort of the row by |x| (ties in position
 * order, as torch.argsort(stable=True) orders them). |x| orders as its bit pattern, so the sort is an
 * LSD radix sort of those bits, 11 at a time, a pass skipped where every key shares its digit (the
 * low bits of values decoded from 16-bit floats are all zero). */
MC_CLONES int mc_abs_ranks(const float *x, long rows, long len, int32_t *rank) {
    uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)len * 2);
    int32_t *order = malloc(sizeof(int32_t) * (size_t)len * 2);
    uint32_t *count = malloc(sizeof(uint32_t) * 2048);
    if (!keys || !order || !count) {
        free(keys);
        free(order);
        free(count);
        return -1;
    }
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * len;
        uint32_t *k = keys, *k2 = keys + len;
        int32_t *o = order, *o2 = order + len;
        for (long j = 0; j < len; j++) {
            uint32_t u;
            memcpy(&u, row + j, sizeof u);
            k[j] = u & 0x7FFFFFFFu;
            o[j] = (int32_t)j;
        }
        for (int shift = 0; shift < 31; shift += 11) {
            memset(count, 0, sizeof(uint32_t) * 2048);
            for (long j = 0; j < len; j++) count[(k[j] >> shift) & 0x7FF]++;
            if (count[(k[0] >> shift) & 0x7FF] == (uint32_t)len) continue; /* one digit: order unchanged */
            uint32_t at = 0;
            for (int b = 0; b < 2048; b++) {
                uint32_t c = count[b];
                count[b] = at;
                at += c;
            }
            for (long j = 0; j < len; j++) {
                uint32_t p = count[(k[j] >> shift) & 0x7FF]++;
                k2[p] = k[j];
                o2[p] = o[j];
            }
            uint32_t *kt = k;
            k = k2;
            k2 = kt;
            int32_t *ot = o;
            o = o2;
            o2 = ot;
        }
        int32_t *out = rank + r * len;
        for (long p = 0; p < len; p++) out[o[p]] = (int32_t)p;
    }
    free(keys);
    free(order);
    free(count);
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_native",
                                    .m_doc = "mcomp's fused merge kernels (used through ctypes)", .m_size = -1};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
