/* Greedy sampling's reduction on CPU: the max and its first index along V of a column-major
 * [V, B] matrix (the LM head's product weight @ x^T), read once, in place.
 *
 * Built by ops/cbuild.py (IEEE math: -inf logits compare as they should). Threads (OpenMP)
 * take ascending slices of V, each keeping a best value and index per row; the slices are
 * merged in order with a strict comparison, so the index is the first occurrence, as torch's
 * max(dim). NaN never compares greater: a NaN logit is not picked (torch would return it).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64

static inline float widen(const void *p, int64_t i, int64_t bf16) {
  if (!bf16) return ((const float *)p)[i];
  uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static void scan(const void *x, int64_t v0, int64_t v1, int64_t b, int64_t ld, int64_t bf16,
                 float *best, int64_t *idx) {
  for (int64_t j = 0; j < b; j++) { best[j] = widen(x, v0 * ld + j, bf16); idx[j] = v0; }
  for (int64_t v = v0 + 1; v < v1; v++) {
    const int64_t row = v * ld;
    for (int64_t j = 0; j < b; j++) {
      const float e = widen(x, row + j, bf16);
      const int take = e > best[j];
      best[j] = take ? e : best[j];
      idx[j] = take ? v : idx[j];
    }
  }
}

/* x: element (v, j) at x[v * ld + j]. Returns 0, or -1 (out of memory, or an empty matrix). */
int col_argmax(const void *x, int64_t v, int64_t b, int64_t ld, int64_t bf16, float *out_val,
               int64_t *out_idx, int64_t threads) {
  if (v < 1 || b < 1 || threads < 1) return -1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > v) threads = v;
  float *best = malloc(sizeof(float) * b * threads);
  int64_t *idx = malloc(sizeof(int64_t) * b * threads);
  if (!best || !idx) { free(best); free(idx); return -1; }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < threads; t++)
    scan(x, v * t / threads, v * (t + 1) / threads, b, ld, bf16, best + t * b, idx + t * b);
  for (int64_t j = 0; j < b; j++) {
    float m = best[j];
    int64_t k = idx[j];
    for (int64_t t = 1; t < threads; t++)
      if (best[t * b + j] > m) { m = best[t * b + j]; k = idx[t * b + j]; }
    out_val[j] = m;
    out_idx[j] = k;
  }
  free(best);
  free(idx);
  return 0;
}
