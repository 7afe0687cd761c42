/* Paged decode attention for CPU ranks: one query token per row, its keys and values read in
 * place from the block cache (no gather), fp32 online softmax, one pass over the context.
 *
 * Built and loaded by ops/cbuild.py (with -ffast-math: no infinities are used, the softmax
 * starts from -1e30). Threads: OpenMP over (row, KV head) items.
 *
 * Layouts (all contiguous):
 *   q      [rows, heads, d]                    heads = kv_heads * group
 *   cache  [blocks, block_size, kv_heads, d]   keys and values alike
 *   tables [rows, max_blocks] int64; ctx [rows] int64 (keys visible, >= 1)
 *   out    [rows, heads * d]
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_VECS 16                 /* head_dim <= 256 */
#define MAX_BLOCK 256
#define W 16                        /* lanes of one vector */

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

typedef struct {
  const void *q, *k, *v;
  const int64_t *tables, *ctx;
  void *out;
  int64_t rows, kv_heads, group, d, block_size, max_blocks, bf16;
  float scale;
} Job;

/* 16 elements (bf16 or fp32) at p + off, widened to fp32. */
static inline vf load16(const void *p, int64_t off, int64_t bf16) {
  vf f;
  if (bf16) {
    vh h;
    memcpy(&h, (const uint16_t *)p + off, sizeof h);
    vi u = __builtin_convertvector(h, vi) << 16;
    memcpy(&f, &u, sizeof f);
  } else {
    memcpy(&f, (const float *)p + off, sizeof f);
  }
  return f;
}

static inline void store(void *p, int64_t i, float x, int64_t bf16) {
  if (!bf16) { ((float *)p)[i] = x; return; }
  uint32_t u;
  memcpy(&u, &x, 4);
  u += 0x7FFF + ((u >> 16) & 1);   /* round to nearest even, as torch's bf16 cast */
  ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

static inline float hsum(vf x) {   /* a tree, not a chain of 15 dependent adds */
  x += __builtin_shuffle(x, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x += __builtin_shuffle(x, (vi){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  x += __builtin_shuffle(x, (vi){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  x += __builtin_shuffle(x, (vi){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
  return x[0];
}

/* e^x for x <= 0 (scores less their max): 2^n * e^r, r in [-ln2/2, ln2/2], degree-6
 * polynomial; relative error ~1e-7. Below -87 the result is 0. */
static inline vf vexp(vf x) {
  const vi under = x < -87.f;                          /* -1 in lanes that underflow */
  x = (vf)(((vi)x & ~under) | ((vi)((vf){0} - 87.f) & under));
  vf t = x * 1.44269504f + 0.5f;
  vi n = __builtin_convertvector(t, vi);
  n -= (vi)(__builtin_convertvector(n, vf) > t) & 1;   /* floor */
  vf nf = __builtin_convertvector(n, vf);
  vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = (vf){0} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  vi e = (n + 127) << 23;
  vf scale;
  memcpy(&scale, &e, sizeof scale);
  return (vf)((vi)(p * scale) & ~under);
}

/* Lane t of the result is the lane-sum of x[t]: 16 horizontal sums in 15 shuffle-add pairs
 * (a butterfly; fed in bit-reversed order so the keys come out in order). */
static inline vf sum16(const vf *x) {
  static const int rev[W] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  const vi a16 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi b16 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi a8 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const vi b8 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const vi a4 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const vi b4 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const vi a2 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const vi b2 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  vf y[8], z[4], w[2];
  for (int i = 0; i < 8; i++) {
    const vf u = x[rev[2 * i]], v = x[rev[2 * i + 1]];
    y[i] = __builtin_shuffle(u, v, a16) + __builtin_shuffle(u, v, b16);
  }
  for (int i = 0; i < 4; i++) {
    const vf u = y[2 * i], v = y[2 * i + 1];
    z[i] = __builtin_shuffle(u, v, a8) + __builtin_shuffle(u, v, b8);
  }
  for (int i = 0; i < 2; i++) {
    const vf u = z[2 * i], v = z[2 * i + 1];
    w[i] = __builtin_shuffle(u, v, a4) + __builtin_shuffle(u, v, b4);
  }
  return __builtin_shuffle(w[0], w[1], a2) + __builtin_shuffle(w[0], w[1], b2);
}

static inline float hmax(vf x) {
  vf y = __builtin_shuffle(x, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x = (vf)(((vi)x & (x >= y)) | ((vi)y & (x < y)));
  y = __builtin_shuffle(x, (vi){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  x = (vf)(((vi)x & (x >= y)) | ((vi)y & (x < y)));
  y = __builtin_shuffle(x, (vi){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  x = (vf)(((vi)x & (x >= y)) | ((vi)y & (x < y)));
  return x[0] > x[1] ? x[0] : x[1];
}

/* One (row, KV head): its g query heads over the row's keys, in tiles of up to 16 keys that
 * lie in one block; scores for a tile come out as one vector per head (no per-key sums). */
static void one_item(const Job *j, int64_t row, int64_t h) {
  const int64_t g = j->group, nv = j->d / W, bs = j->block_size, kvh = j->kv_heads;
  const int64_t pitch = kvh * j->d;   /* elements from one key to the next in a block */
  vf q[MAX_GROUP][MAX_VECS], acc[MAX_GROUP][MAX_VECS], tile[W][MAX_VECS], dots[W];
  float p[MAX_GROUP][W] __attribute__((aligned(64)));
  float top[MAX_GROUP], total[MAX_GROUP];
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t q0 = (row * kvh + h) * g * j->d;
  for (int64_t a = 0; a < g; a++) {
    for (int64_t c = 0; c < nv; c++) {
      q[a][c] = load16(j->q, q0 + (a * nv + c) * W, j->bf16) * j->scale;
      acc[a][c] = (vf){0};
    }
    top[a] = -1e30f;
    total[a] = 0.f;
  }
  const int64_t n = j->ctx[row];
  for (int64_t k0 = 0, m; k0 < n; k0 += m) {
    const int64_t off = k0 % bs, blk = j->tables[row * j->max_blocks + k0 / bs];
    m = bs - off < W ? bs - off : W;
    m = n - k0 < m ? n - k0 : m;
    const int64_t base = ((blk * bs + off) * kvh + h) * j->d;
    for (int64_t t = 0; t < m; t++)
      for (int64_t c = 0; c < nv; c++) tile[t][c] = load16(j->k, base + t * pitch + c * W, j->bf16);
    const vi tail = lane >= (int32_t)m;   /* -1 in lanes past the tile's keys */
    for (int64_t a = 0; a < g; a++) {
      for (int64_t t = 0; t < W; t++) {
        vf x = (vf){0};
        if (t < m)
          for (int64_t c = 0; c < nv; c++) x += q[a][c] * tile[t][c];
        dots[t] = x;
      }
      vf sc = sum16(dots);
      sc = (vf)(((vi)sc & ~tail) | ((vi)((vf){0} - 1e30f) & tail));
      const float tmax = hmax(sc), mx = tmax > top[a] ? tmax : top[a];
      const float fix = expf(top[a] - mx);
      for (int64_t c = 0; c < nv; c++) acc[a][c] *= fix;
      const vf e = vexp(sc - mx);   /* 0 in the tail lanes */
      total[a] = total[a] * fix + hsum(e);
      memcpy(p[a], &e, sizeof e);
      top[a] = mx;
    }
    for (int64_t t = 0; t < m; t++)
      for (int64_t c = 0; c < nv; c++) tile[t][c] = load16(j->v, base + t * pitch + c * W, j->bf16);
    for (int64_t a = 0; a < g; a++)
      for (int64_t c = 0; c < nv; c++) {
        vf r = acc[a][c];
        for (int64_t t = 0; t < m; t++) r += p[a][t] * tile[t][c];
        acc[a][c] = r;
      }
  }
  for (int64_t a = 0; a < g; a++) {
    const float inv = 1.f / total[a];
    for (int64_t c = 0; c < nv; c++)
      for (int64_t i = 0; i < W; i++)
        store(j->out, q0 + (a * nv + c) * W + i, acc[a][c][i] * inv, j->bf16);
  }
}

/* Returns 0, or -1 when a size is over the kernel's fixed limits (the caller then falls back). */
int decode_attention(const void *q, const void *k_cache, const void *v_cache,
                     const int64_t *tables, const int64_t *ctx, void *out,
                     int64_t rows, int64_t kv_heads, int64_t group, int64_t d,
                     int64_t block_size, int64_t max_blocks, int64_t bf16, float scale,
                     int64_t threads) {
  if (group > MAX_GROUP || d % W || d / W > MAX_VECS || block_size > MAX_BLOCK || threads < 1)
    return -1;
  const Job j = {q, k_cache, v_cache, tables, ctx, out, rows, kv_heads, group, d, block_size,
                 max_blocks, bf16, scale};
  const int64_t items = rows * kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t it = 0; it < items; it++) one_item(&j, it / kv_heads, it % kv_heads);
  return 0;
}
