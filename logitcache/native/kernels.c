/* CPU kernels for logitcache.targets: fused log-softmax + top-k, and exact inverse-CDF sampling.

   Compiled on first use by logitcache/native.py (plain C99, no Python or torch headers) and called
   through ctypes, which releases the GIL. Each function takes rows of float32 logits [rows, V] and
   writes small per-row results; it reads each row twice (select, then exp-sum) while the row is
   still in L1, where the torch path makes five or six passes over [rows, V] tensors.

   The results are those of logitcache/targets.py up to float32 rounding: the same top-k (equal
   logits ranked by lower id) and log-probabilities to ~1e-6; draws from the same distribution by
   the same uniforms, equal to the torch path's except where rounding moves a block boundary (0.06 %
   of rows with the demo teacher, V = 2048 and N = 50; a few % at V = 32000 and N = 512), where a
   draw goes to a neighbouring id. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define SUM_CHUNK 256 /* float32 lane sums are folded into float64 every SUM_CHUNK ids */

/* exp(y) for y <= 0 to ~2 ulp; 0 below -87.3 (no float32 denormals; -inf gives 0), NaN for NaN.
   Branch-free and libm-free so that compilers vectorise the loops that call it. */
static inline float exp_nonpos(float y) {
    float c = y < -87.3f ? -87.3f : y;
    float t = c * 1.44269504088896341f + 12582912.0f; /* round(c / ln 2) in the low mantissa bits */
    int32_t n;
    memcpy(&n, &t, sizeof n);
    n -= 0x4B400000;
    float fn = t - 12582912.0f;
    float r = c - fn * 0.693145751953125f - fn * 1.42860682030941723212e-6f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y < -87.3f ? 0.0f : p * scale;
}

/* Float maxima do not auto-vectorise without -ffinite-math-only (which would break the NaN and
   -inf handling here), so they use GCC/Clang vector types: a > b ? a : b per lane, as maxps does. */
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(float))));

static inline vfloat vmax(vfloat a, vfloat b) {
    vint take = a > b;
    return (vfloat)(((vint)a & take) | ((vint)b & ~take));
}

static inline vfloat vmin(vfloat a, vfloat b) {
    vint take = a < b;
    return (vfloat)(((vint)a & take) | ((vint)b & ~take));
}

static inline vfloat vsplat(float v) { return (vfloat){0} + v; }

static inline vfloat vload(const float *x) {
    vfloat v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* the largest non-NaN value of x[0:V] (-inf if none); four accumulators hide vmax's latency */
static float row_max(const float *x, int64_t V) {
    vfloat m0 = vsplat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
    for (; i + 4 * LANES <= V; i += 4 * LANES) {
        m0 = vmax(vload(x + i), m0);
        m1 = vmax(vload(x + i + LANES), m1);
        m2 = vmax(vload(x + i + 2 * LANES), m2);
        m3 = vmax(vload(x + i + 3 * LANES), m3);
    }
    for (; i + LANES <= V; i += LANES) m0 = vmax(vload(x + i), m0);
    m0 = vmax(vmax(m0, m1), vmax(m2, m3));
    float best = -INFINITY;
    for (int j = 0; j < LANES; j++) best = m0[j] > best ? m0[j] : best;
    for (; i < V; i++) best = x[i] > best ? x[i] : best;
    return best;
}

/* sum of exp((x - shift) * scale) over the row, in float64 (NaN if the row holds NaN); the terms
   also go to out[0:V] unless out is NULL */
static double sum_exp(const float *x, int64_t V, float shift, float scale, float *out) {
    double total = 0.0;
    for (int64_t start = 0; start < V; start += SUM_CHUNK) {
        int64_t end = start + SUM_CHUNK < V ? start + SUM_CHUNK : V, i = start;
        float s[LANES] = {0};
        for (; i + LANES <= end; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float e = exp_nonpos((x[i + j] - shift) * scale);
                s[j] += e;
                if (out) out[i + j] = e;
            }
        for (; i < end; i++) {
            float e = exp_nonpos((x[i] - shift) * scale);
            total += e;
            if (out) out[i] = e;
        }
        for (int j = 0; j < LANES; j++) total += s[j];
    }
    return total;
}

/* ---- top-k ---------------------------------------------------------------------------------- */

typedef struct {
    float v;
    int32_t id;
} entry;

/* a ranks below b: lower value, or the same value and a higher id */
static inline int below(entry a, entry b) { return a.v < b.v || (a.v == b.v && a.id > b.id); }

/* min-heap on `below`: h[0] is the lowest-ranked entry kept */
static void sift_down(entry *h, int64_t n, int64_t at) {
    for (;;) {
        int64_t low = at, l = 2 * at + 1, r = l + 1;
        if (l < n && below(h[l], h[low])) low = l;
        if (r < n && below(h[r], h[low])) low = r;
        if (low == at) return;
        entry t = h[at];
        h[at] = h[low];
        h[low] = t;
        at = low;
    }
}

/* Selection prunes with strided blocks: block b holds ids b, b + blocks, ..., b + (width - 1) * blocks.
   The k-th largest block maximum bounds the k-th largest logit from below (k blocks each hold an
   id that large), so only ids at or above it are candidates: about k blocks' worth of the row.
   Ids from width * blocks on (fewer than width * LANES) are always candidates. */
typedef struct {
    int64_t width, blocks;
    float *block_max, *cv;
    int32_t *ci, *admitted;
} topk_plan;

#define RANK_MAX 256 /* candidates ranked by counting (vectorised, O(c^2)) up to this many, else a heap */
#define TAIL_EXACT_BELOW 1e-3 /* tail mass under which it is summed directly, not subtracted (as targets.TAIL_EXACT_BELOW) */

static topk_plan plan_topk(int64_t V, int64_t k) {
    topk_plan p;
    p.width = 8;
    while (p.width < 256 && p.width * p.width * 4 * k < V) p.width *= 2; /* ~sqrt(V / k) */
    p.blocks = V / (p.width * LANES) * LANES;
    if (p.blocks <= k) p.blocks = 0; /* too small to prune: every id is a candidate */
    int64_t blocks = p.blocks > 0 ? p.blocks : 1;
    p.block_max = malloc((size_t)blocks * sizeof(float));
    p.admitted = malloc((size_t)blocks * sizeof(int32_t));
    p.cv = malloc((size_t)V * sizeof(float));
    p.ci = malloc((size_t)V * sizeof(int32_t));
    return p;
}

static void free_plan(topk_plan *p) {
    free(p->block_max);
    free(p->admitted);
    free(p->cv);
    free(p->ci);
}

static int64_t count_at_least(const float *a, int64_t n, float t) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) count += a[i] >= t;
    return count;
}

/* the largest t found by bisection with at least k block maxima >= t; -inf if the finite ones are too few */
static float admission(const float *block_max, int64_t blocks, int64_t k) {
    vfloat lo4 = vsplat(INFINITY), hi4 = vsplat(-INFINITY), inf = vsplat(INFINITY);
    for (int64_t b = 0; b < blocks; b += LANES) {
        vfloat m = vload(block_max + b);
        vint finite = (m > -inf) & (m < inf);
        lo4 = vmin((vfloat)(((vint)m & finite) | ((vint)inf & ~finite)), lo4);
        hi4 = vmax((vfloat)(((vint)m & finite) | ((vint)(-inf) & ~finite)), hi4);
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < LANES; j++) {
        lo = lo4[j] < lo ? lo4[j] : lo;
        hi = hi4[j] > hi ? hi4[j] : hi;
    }
    if (!(lo <= hi) || count_at_least(block_max, blocks, lo) < k) return -INFINITY;
    for (int step = 0; step < 24 && lo < hi; step++) {
        float mid = lo + (hi - lo) * 0.5f;
        int64_t count = count_at_least(block_max, blocks, mid);
        if (count >= k) lo = mid;
        else hi = mid;
        if (count == k) break;
    }
    return lo;
}

/* the row's top k by `below` into out[0:k], best first (NaN entries with id 0 if fewer than k ids are not NaN) */
static void select_topk(const float *x, int64_t V, int64_t k, topk_plan *p, entry *out) {
    float admit = -INFINITY;
    int64_t blocks = p->blocks, c = 0;
    if (blocks > 0) {
        for (int64_t b = 0; b < blocks; b += LANES) {
            vfloat m = vload(x + b);
            memcpy(p->block_max + b, &m, sizeof m);
        }
        for (int64_t i = 1; i < p->width; i++) /* independent chains across b */
            for (int64_t b = 0; b < blocks; b += LANES) {
                vfloat m = vmax(vload(x + i * blocks + b), vload(p->block_max + b));
                memcpy(p->block_max + b, &m, sizeof m);
            }
        admit = admission(p->block_max, blocks, k);
        int64_t n_admitted = 0;
        for (int64_t b = 0; b < blocks; b++) { /* branch-free: write always, advance when kept */
            p->admitted[n_admitted] = (int32_t)b;
            n_admitted += p->block_max[b] >= admit;
        }
        for (int64_t a = 0; a < n_admitted; a++)
            for (int64_t i = 0; i < p->width; i++) {
                int64_t id = i * blocks + p->admitted[a];
                p->cv[c] = x[id];
                p->ci[c] = (int32_t)id;
                c += x[id] >= admit;
            }
    }
    for (int64_t id = p->width * blocks; id < V; id++) {
        p->cv[c] = x[id];
        p->ci[c] = (int32_t)id;
        c += x[id] >= admit;
    }
    int64_t kept = c < k ? c : k;
    if (c <= RANK_MAX) {
        for (int64_t a = 0; a < c; a++) {
            float v = p->cv[a];
            int32_t id = p->ci[a], rank = 0;
            for (int64_t b = 0; b < c; b++) rank += (p->cv[b] > v) | ((p->cv[b] == v) & (p->ci[b] < id));
            if (rank < k) out[rank] = (entry){v, id};
        }
    } else {
        entry *h = out; /* a min-heap of the best `kept` so far, then sorted in place */
        for (int64_t a = 0; a < kept; a++) h[a] = (entry){p->cv[a], p->ci[a]};
        for (int64_t a = kept / 2; a-- > 0;) sift_down(h, kept, a);
        for (int64_t a = kept; a < c; a++) {
            entry e = {p->cv[a], p->ci[a]};
            if (below(h[0], e)) h[0] = e, sift_down(h, kept, 0);
        }
        for (int64_t n = kept - 1; n > 0; n--) { /* heapsort: lowest-ranked to the back, best first */
            entry t = h[0];
            h[0] = h[n];
            h[n] = t;
            sift_down(h, n, 0);
        }
    }
    for (int64_t j = kept; j < k; j++) out[j] = (entry){NAN, 0};
}

/* log of sum(exp(x - top)) over the ids outside the top k: those below its last value, and those
   tied with it that did not make the cut. Shifted by the largest of them, so that a mass far below
   exp(-87) relative to the top (where exp_nonpos flushes to 0) keeps its value. */
static double log_mass_outside(const float *x, int64_t V, float top, const entry *best, int64_t k) {
    float last = best[k - 1].v;
    int64_t ties = 0, i = 0;
    vfloat m = vsplat(-INFINITY), lastv = vsplat(last);
    for (; i + LANES <= V; i += LANES) {
        vfloat v = vload(x + i);
        vint outside = v < lastv;
        m = vmax((vfloat)(((vint)v & outside) | ((vint)vsplat(-INFINITY) & ~outside)), m);
    }
    float shift = -INFINITY;
    for (int j = 0; j < LANES; j++) shift = m[j] > shift ? m[j] : shift;
    for (; i < V; i++) shift = x[i] < last && x[i] > shift ? x[i] : shift;
    for (i = 0; i < V; i++) ties += x[i] == last;
    for (int64_t j = 0; j < k; j++) ties -= best[j].v == last;
    if (ties > 0) shift = last;
    if (shift == -INFINITY) return -INFINITY;
    double rest = 0.0;
    for (int64_t start = 0; start < V; start += SUM_CHUNK) {
        int64_t end = start + SUM_CHUNK < V ? start + SUM_CHUNK : V;
        float s[LANES] = {0};
        for (i = start; i + LANES <= end; i += LANES)
            for (int j = 0; j < LANES; j++) s[j] += x[i + j] < last ? exp_nonpos(x[i + j] - shift) : 0.0f;
        for (; i < end; i++) rest += x[i] < last ? exp_nonpos(x[i] - shift) : 0.0f;
        for (int j = 0; j < LANES; j++) rest += s[j];
    }
    rest += (double)ties * exp_nonpos(last - shift);
    return log(rest) + ((double)shift - (double)top);
}

/* log-softmax at the row's label; NaN (and counted in *bad) for a label outside [0, V) */
static float gold_logprob(const float *x, int64_t V, int64_t label, double lse, int64_t *bad) {
    if (label < 0 || label >= V) {
        ++*bad;
        return NAN;
    }
    return (float)((double)x[label] - lse);
}

/* Top-k of each row by (logit desc, id asc), its log-softmax, the log of the mass outside it and
   the log-softmax at the row's label. ids/logprobs [rows, k]; tail/gold [rows]. Returns the number
   of labels outside [0, V). */
int64_t lc_topk(const float *logits, int64_t rows, int64_t V, int64_t k, const int64_t *labels,
             int32_t *ids, float *logprobs, float *tail, float *gold) {
    topk_plan plan = plan_topk(V, k);
    entry *best = malloc((size_t)k * sizeof(entry));
    float *best_v = malloc((size_t)k * sizeof(float));
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * V;
        select_topk(x, V, k, &plan, best);
        float top = best[0].v;
        for (int64_t j = 0; j < k; j++) best_v[j] = best[j].v;
        double total = sum_exp(x, V, top, 1.0f, NULL), rest = total - sum_exp(best_v, k, top, 1.0f, NULL);
        /* 1 - covered loses digits when little is left: then sum what is left directly */
        double log_rest = rest > TAIL_EXACT_BELOW * total ? log(rest) : log_mass_outside(x, V, top, best, k);
        double lse = (double)top + log(total);
        for (int64_t j = 0; j < k; j++) {
            ids[r * k + j] = best[j].id;
            logprobs[r * k + j] = (float)((double)best[j].v - lse);
        }
        tail[r] = (float)(log_rest - log(total)); /* NaN when the row holds NaN */
        gold[r] = gold_logprob(x, V, labels[r], lse, &bad);
    }
    free(best);
    free(best_v);
    free_plan(&plan);
    return bad;
}

/* ---- sampling ------------------------------------------------------------------------------- */

#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t splitmix64(uint64_t z) {
    z += GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* -log(1 - v) = -log1p(-v) for v in [0, 1), within 2 ulp of libm's log1p; branch-free and libm-free
   so that the loop calling it vectorises where the CPU converts 64-bit integers in vectors (AVX-512DQ:
   ~6x faster than log1p, which took over 80 % of the uniforms' time; GCC leaves it scalar on AVX2,
   where it costs about what log1p does). 1 - v is exact: v is a multiple of 2^-53.
   log(2^e m) = e ln 2 + 2 atanh((m - 1) / (m + 1)) with m folded into [sqrt(1/2), sqrt(2)), so
   |s| < 0.172 and the atanh series is exact to double precision by its s^23 term; ln 2 in two parts
   keeps e ln 2 exact. */
static inline double neg_log1m(double v) {
    double x = 1.0 - v;
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    int64_t e = (int64_t)(bits >> 52) - 1023; /* x is positive and normal: at least 2^-53 */
    bits = (bits & 0x000FFFFFFFFFFFFFULL) | 0x3FF0000000000000ULL;
    double m;
    memcpy(&m, &bits, sizeof m);
    int64_t fold = m > 1.4142135623730951;
    m = fold ? m * 0.5 : m;
    double ef = (double)(e + fold), s = (m - 1.0) / (m + 1.0), z = s * s;
    double p = 1.0 / 23;
    p = p * z + 1.0 / 21;
    p = p * z + 1.0 / 19;
    p = p * z + 1.0 / 17;
    p = p * z + 1.0 / 15;
    p = p * z + 1.0 / 13;
    p = p * z + 1.0 / 11;
    p = p * z + 1.0 / 9;
    p = p * z + 1.0 / 7;
    p = p * z + 1.0 / 5;
    p = p * z + 1.0 / 3;
    double log_m = 2.0 * s + 2.0 * s * z * p;
    return -(ef * 6.93147180369123816490e-01 + (ef * 1.90821492927058770002e-10 + log_m));
}

/* n sorted uniforms of a row: S_j / S_n over running sums of n + 1 exponentials (targets.sorted_uniforms) */
static void sorted_uniforms(uint64_t key, int64_t n, double *u) {
    for (int64_t j = 0; j <= n; j++) /* independent: vectorised on AVX-512DQ */
        u[j] = neg_log1m((double)(splitmix64(key * GOLDEN + (uint64_t)j) >> 11) * (1.0 / 9007199254740992.0));
    double sum = 0.0;
    for (int64_t j = 0; j <= n; j++) u[j] = sum += u[j];
    double last = u[n] > 0x1p-1000 ? u[n] : 0x1p-1000;
    for (int64_t j = 0; j < n; j++) u[j] /= last;
}

typedef struct {
    float lp;
    int32_t id, count;
} drawn;

/* stable sort by descending log-probability: insertion for short rows, bottom-up merge otherwise */
static void sort_drawn(drawn *a, int64_t n, drawn *scratch) {
    if (n <= 32) {
        for (int64_t i = 1; i < n; i++) {
            drawn t = a[i];
            int64_t j = i - 1;
            while (j >= 0 && a[j].lp < t.lp) a[j + 1] = a[j], j--;
            a[j + 1] = t;
        }
        return;
    }
    for (int64_t w = 1; w < n; w *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * w) {
            int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n, i = lo, j = mid, o = lo;
            while (i < mid && j < hi) scratch[o++] = a[j].lp > a[i].lp ? a[j++] : a[i++];
            while (i < mid) scratch[o++] = a[i++];
            while (j < hi) scratch[o++] = a[j++];
        }
        memcpy(a, scratch, (size_t)n * sizeof(drawn));
    }
}

/* n draws per row from softmax(logits / T), by a two-level inverse CDF over `blocks` strided
   blocks of `width` ids (block j holds ids j, j + blocks, ...; targets._draw_weights), grouped
   into distinct ids with counts and ordered by descending log-softmax. keys [rows] (targets.row_keys);
   ids/logprobs/counts [rows, n] padded with 0 / -inf / 0 after lengths[r] entries; gold [rows].
   Returns the number of labels outside [0, V). */
int64_t lc_sample(const float *logits, int64_t rows, int64_t V, int64_t n, float inv_temperature, int64_t width,
               const uint64_t *keys, const int64_t *labels, int32_t *ids, float *logprobs, int32_t *counts,
               int32_t *lengths, float *gold) {
    int64_t blocks = (V + width - 1) / width, padded = blocks * width;
    float *w = calloc((size_t)padded, sizeof(float));
    float *mass = malloc((size_t)blocks * sizeof(float));
    double *u = malloc((size_t)(n + 1) * sizeof(double)), *cdf = malloc((size_t)blocks * sizeof(double));
    double *inner = malloc((size_t)width * sizeof(double));
    int32_t *draws = malloc((size_t)n * sizeof(int32_t));
    drawn *found = malloc((size_t)n * sizeof(drawn)), *scratch = malloc((size_t)n * sizeof(drawn));
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * V;
        float top = row_max(x, V);
        double weight_sum = sum_exp(x, V, top, inv_temperature, w);
        double lse = (double)top + log(inv_temperature == 1.0f ? weight_sum : sum_exp(x, V, top, 1.0f, NULL));
        for (int64_t j = 0; j < blocks; j++) mass[j] = 0.0f;
        for (int64_t i = 0; i < width; i++)
            for (int64_t j = 0; j < blocks; j++) mass[j] += w[i * blocks + j];
        /* block CDF in float64, in four interleaved chains (a prefix sum is one long dependency chain) */
        int64_t quarter = blocks / 4;
        double c0 = 0.0, c1 = 0.0, c2 = 0.0, c3 = 0.0;
        for (int64_t j = 0; j < quarter; j++) {
            cdf[j] = c0 += mass[j];
            cdf[quarter + j] = c1 += mass[quarter + j];
            cdf[2 * quarter + j] = c2 += mass[2 * quarter + j];
            cdf[3 * quarter + j] = c3 += mass[3 * quarter + j];
        }
        for (int64_t j = 4 * quarter; j < blocks; j++) cdf[j] = c3 += mass[j];
        for (int64_t j = 0; j < quarter; j++) cdf[quarter + j] += c0, cdf[2 * quarter + j] += c0 + c1;
        for (int64_t j = 3 * quarter; j < blocks; j++) cdf[j] += c0 + c1 + c2;
        double total = cdf[blocks - 1];
        int64_t last_block = blocks - 1;
        while (last_block >= 0 && !(mass[last_block] > 0.0f)) last_block--;
        sorted_uniforms(keys[r], n, u);
        int64_t block = 0, inner_block = -1, last_positive = 0;
        for (int64_t d = 0; d < n; d++) {
            if (last_block < 0) { /* NaN or an all -inf row: no id has weight; gold and logprobs carry NaN */
                draws[d] = 0;
                continue;
            }
            double target = u[d] * total;
            while (block < last_block && cdf[block] <= target) block++;
            if (block != inner_block) { /* the block's own prefix sums, once per block drawn from */
                double acc = 0.0;
                for (int64_t i = 0; i < width; i++) {
                    float wi = w[i * blocks + block];
                    inner[i] = acc += wi;
                    if (wi > 0.0f) last_positive = i;
                }
                inner_block = block;
            }
            double below_block = block > 0 ? cdf[block - 1] : 0.0;
            double frac = (target - below_block) / mass[block];
            frac = frac < 0.0 ? 0.0 : (frac > 1.0 - 0x1p-53 ? 1.0 - 0x1p-53 : frac);
            double inner_target = frac * inner[width - 1];
            int64_t pick = 0; /* ids whose prefix is <= the target are passed over; weight-0 ids never end a run */
            for (int64_t i = 0; i < width; i++) pick += inner[i] <= inner_target;
            draws[d] = (int32_t)(block + (pick < width ? pick : last_positive) * blocks);
        }
        int64_t distinct = 0;
        for (int64_t d = 0; d < n; d++) {
            if (d > 0 && draws[d] == draws[d - 1]) {
                found[distinct - 1].count++;
                continue;
            }
            found[distinct++] = (drawn){(float)((double)x[draws[d]] - lse), draws[d], 1};
        }
        sort_drawn(found, distinct, scratch);
        for (int64_t j = 0; j < n; j++) {
            int real = j < distinct;
            ids[r * n + j] = real ? found[j].id : 0;
            logprobs[r * n + j] = real ? found[j].lp : -INFINITY;
            counts[r * n + j] = real ? found[j].count : 0;
        }
        lengths[r] = (int32_t)distinct;
        gold[r] = gold_logprob(x, V, labels[r], lse, &bad);
    }
    free(w);
    free(mass);
    free(u);
    free(cdf);
    free(inner);
    free(draws);
    free(found);
    free(scratch);
    return bad;
}

/* ---- the loader's dense batch ----------------------------------------------------------------- */

/* Flat per-id columns (entries position-major, lengths[p] of them for position p, the first
   positions * width slots) into dense [positions, width] rows, 0 after each position's entries
   (loader.collate): ids widened to int64, logprobs and weights as given, mask 1 where an entry is
   stored. With covered (float64, one per entry): mass[p] = the sum of its position's covered in
   entry order, as numpy's bincount adds them. The caller checks lengths[p] <= width and that the
   lengths add up to the entries given. */
void lc_collate(const uint16_t *lengths, int64_t positions, int64_t width, const int32_t *ids,
                const float *logprobs, const float *weights, const double *covered, int64_t *out_ids,
                float *out_logprobs, float *out_weights, uint8_t *out_mask, double *mass) {
    int64_t e = 0;
    for (int64_t p = 0; p < positions; p++) {
        int64_t n = lengths[p], at = p * width;
        for (int64_t j = 0; j < n; j++) {
            out_ids[at + j] = ids[e + j];
            out_logprobs[at + j] = logprobs[e + j];
            out_weights[at + j] = weights[e + j];
        }
        memset(out_mask + at, 1, (size_t)n);
        memset(out_ids + at + n, 0, (size_t)(width - n) * sizeof *out_ids);
        memset(out_logprobs + at + n, 0, (size_t)(width - n) * sizeof *out_logprobs);
        memset(out_weights + at + n, 0, (size_t)(width - n) * sizeof *out_weights);
        memset(out_mask + at + n, 0, (size_t)(width - n));
        if (covered != NULL) {
            double sum = 0.0;
            for (int64_t j = 0; j < n; j++) sum += covered[e + j];
            mass[p] = sum;
        }
        e += n;
    }
}
