// Matrix-vector products for one-token decoding on x86 CPUs with AVX2, for bfloat16, float32, int8 and int4 weights
// (llmkit.infer.cpu_kernels builds this file at first use). Decoding multiplies a few activation rows by every weight
// once per token, so its speed is how fast the weights stream from memory and how little work each byte costs. PyTorch's CPU kernels for these shapes ran at
// 5-13 GB/s on the 2-core machine llama.cpp read 16 GB/s on; two things close the gap:
//  - the weights of 8 output rows lie together in tiles ([out / 8][in / width][8][width]), so each thread reads one
//    sequential stream (row-major weights give it 8 short streams) and the 8 sums end in one vector store;
//  - int8 and int4 weights multiply int8 activations with maddubs: 32 byte products summed in pairs in one
//    instruction, where converting each weight to float costs three (llama.cpp's Q8_0 and Q4 dot products). The
//    activations get one scale per 4 inputs, not llama.cpp's one per 32: SmolLM2 has channels near 100 beside
//    values near 1, and a shared scale of 32 rounded the small ones away (its int4 logits moved 12 % of the
//    largest instead of 3 %). The finer scales cost one multiplication: after maddubs and madd each 32-bit
//    lane holds the products of 4 neighbouring inputs, so a vector of 8 scales meets them lane by lane.
// With several activation rows (batched decoding) the AVX-512 versions below take up to 4 rows for each weight they
// read and widen. OpenMP (at::parallel_for) splits the tiles between torch's threads: compile with -fopenmp.
// The attention of one new token over the KV cache (decode_attention) is here too, after the products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>
#include <torch/library.h>

namespace {

constexpr int64_t TILE = 8;    // output rows whose weights lie together
constexpr int64_t GROUP = 32;  // inputs of an int8 block and of an int4 group (one weight scale and minimum)
constexpr int64_t PREFETCH = 1024;  // bytes ahead of the block being read (about 0.1 us of streaming)

inline __m256 bf16x8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// The eight sums of a[0..7], one per lane.
inline __m256 sum8(const __m256* a) {
  __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// Activations as int8 with one scale per 4 inputs, and each group of 32's plain sum (for int4's minimums). 8 inputs
// (two spans of 4) at a time: two in-lane shuffles give each lane its span's largest magnitude. Done one input at a
// time it cost about 2 ns an input, 0.2 ms of a SmolLM2 token (about 100,000 activations a row).
struct QuantizedRows {
  static constexpr int64_t SPAN = 4;
  std::vector<int8_t> values;
  std::vector<float> scales, sums;
  QuantizedRows(const float* x, int64_t rows, int64_t width)
      : values(rows * width), scales(rows * width / SPAN), sums(rows * width / GROUP) {
    const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), steps = _mm256_set1_ps(127.f);
    const __m256i first_of_each_lane = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    for (int64_t g = 0; g < rows * width / GROUP; ++g) {
      __m256 total = _mm256_setzero_ps();
      for (int64_t i = g * GROUP; i < (g + 1) * GROUP; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        total = _mm256_add_ps(total, v);
        __m256 amax = _mm256_and_ps(v, magnitude_bits);
        amax = _mm256_max_ps(amax, _mm256_shuffle_ps(amax, amax, 0xB1));  // neighbours
        amax = _mm256_max_ps(amax, _mm256_shuffle_ps(amax, amax, 0x4E));  // pairs
        const __m256 positive = _mm256_cmp_ps(amax, _mm256_setzero_ps(), _CMP_GT_OQ);
        const __m256 inverse = _mm256_and_ps(positive, _mm256_div_ps(steps, amax));  // 0 for a span of zeros
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v, inverse));  // to nearest even, as nearbyint
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q, q), _mm256_setzero_si256());  // q0-3 | q4-7
        _mm_storel_epi64(reinterpret_cast<__m128i*>(values.data() + i),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(bytes, first_of_each_lane)));
        const __m256 scale = _mm256_div_ps(amax, steps);
        scales[i / SPAN] = _mm256_cvtss_f32(scale);
        scales[i / SPAN + 1] = _mm_cvtss_f32(_mm256_extractf128_ps(scale, 1));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, total);
      sums[g] = std::accumulate(lanes, lanes + 8, 0.f);
    }
  }
  __m256i group(int64_t at) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values.data() + at * GROUP));
  }
  __m256 group_scales(int64_t at) const { return _mm256_loadu_ps(scales.data() + at * GROUP / SPAN); }
};

// 32 products of unsigned and signed bytes, each 32-bit lane the sum of 4 neighbours', times their scales.
inline __m256 dot32(__m256i unsigned_bytes, __m256i signed_bytes, __m256 scales) {
  __m256i pairs = _mm256_maddubs_epi16(unsigned_bytes, signed_bytes);
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1))), scales);
}

// AVX-512 with VNNI (Ice Lake, Zen 4 and later) takes the 8 rows of a tile two at a time: a 512-bit register holds a
// pair's weights, and vpdpbusd multiplies 64 byte pairs and sums them by 4 in one instruction (maddubs, madd and their
// 16-bit intermediate in AVX2). Chosen at run time: the file is compiled for AVX2, these functions for AVX-512.
#define WIDE __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

bool cpu_has_wide() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

int64_t vector_bits = cpu_has_wide() ? 512 : 256;  // the path the kernels take (use_vector_bits changes it)

// The 8 sums of a tile from 4 pair accumulators (row 2p in lanes 0-7 of pair p, row 2p + 1 in lanes 8-15).
WIDE inline __m256 sum8_pairs(const __m512* pairs) {
  __m256 a[TILE];
  for (int64_t p = 0; p < TILE / 2; ++p) {
    a[2 * p] = _mm512_castps512_ps256(pairs[p]);
    a[2 * p + 1] = _mm512_extractf32x8_ps(pairs[p], 1);
  }
  return sum8(a);
}

// A float vector of 8 repeated in both halves of a 512-bit register (the activations meet both rows of a pair).
WIDE inline __m512 twice(__m256 v) { return _mm512_insertf32x8(_mm512_castps256_ps512(v), v, 1); }

// x: float32 (bfloat16 too where `bfloat16` says so).
void check(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, int64_t multiple,
           bool bfloat16 = false) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || (bfloat16 && x.scalar_type() == at::kBFloat16)),
              "x: contiguous (rows, in), float32", bfloat16 ? " or bfloat16" : "");
  TORCH_CHECK(packed.is_contiguous(), "packed weights must be contiguous");
  TORCH_CHECK(out_features % TILE == 0 && x.size(1) % multiple == 0, "shape not supported");
}

// 8 weights of a 16-bit (bfloat16) or float32 tile as float32; AVX-512: 16.
inline __m256 widen8(const uint16_t* p) { return bf16x8(p); }
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
WIDE inline __m512 widen16(const uint16_t* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
WIDE inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }

// A block's worth of lines from ``distance`` bytes after ``block``: into L1 by default, the streaming read's lookahead;
// with _MM_HINT_T1 into L2.
template <int Hint = _MM_HINT_T0, typename W>
inline void prefetch_block(const W* block, int64_t distance = PREFETCH) {
  for (size_t line = 0; line < TILE * TILE * sizeof(W); line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(block) + distance + line, static_cast<decltype(_MM_HINT_T0)>(Hint));
}

// Block c of a tile, its lookahead prefetched, and with ``ahead`` (or null) a block's worth of that tile into L2.
template <typename W>
inline const W* streamed_block(const W* tile, int64_t c, const W* ahead) {
  const W* block = tile + c * TILE * TILE;
  prefetch_block(block);
  if (ahead != nullptr) prefetch_block<_MM_HINT_T1>(ahead + c * TILE * TILE, 0);
  return block;
}

// One activation row times one tile: the tile's 8 sums. Each kernel has an AVX2 and an AVX-512 version.
template <typename W>
__m256 dense_tile_row(const W* tile, const float* x, int64_t blocks) {
  __m256 acc[TILE];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t c = 0; c < blocks; ++c) {
    const W* block = tile + c * TILE * TILE;
    prefetch_block(block);
    __m256 xv = _mm256_loadu_ps(x + c * TILE);
    for (int64_t k = 0; k < TILE; ++k) acc[k] = _mm256_fmadd_ps(widen8(block + k * TILE), xv, acc[k]);
  }
  return sum8(acc);
}

// AVX-512 takes up to 4 activation rows at a time (ROWS): each pair's weights are read and widened once for all of
// them (32 registers hold the rows' sums), where row by row they were widened again for every row. ONE_ROW: a single
// row of bfloat16 or int8 products runs the AVX2 version, which streams the weights as fast (SmolLM2's decoding was
// 3-6 % faster with it, benchmarks/cpu_kernel_widths.py), and so does float32's (not measured apart); int4's one row
// gains from vpdpbusd (1.1x) and keeps it.
constexpr int64_t ROWS = 4;

// ``ahead`` (or null): the tile to bring into L2 meanwhile (streamed_block).
template <typename W, int R>
WIDE void dense_tile_wide(const W* tile, const float* x, int64_t width, float* y, int64_t y_stride, const W* ahead) {
  __m512 acc[R][TILE / 2];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < width / TILE; ++c) {
    const W* block = streamed_block(tile, c, ahead);
    __m512 w[TILE / 2];
    for (int64_t p = 0; p < TILE / 2; ++p) w[p] = widen16(block + 2 * p * TILE);  // rows 2p and 2p + 1 of the tile
    for (int r = 0; r < R; ++r) {
      const __m512 xv = twice(_mm256_loadu_ps(x + r * width + c * TILE));
      for (int64_t p = 0; p < TILE / 2; ++p) acc[r][p] = _mm512_fmadd_ps(w[p], xv, acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * y_stride, sum8_pairs(acc[r]));
}

__m256 int8_tile_row(const int8_t* tile, const QuantizedRows& q, int64_t first_group, int64_t groups) {
  __m256 acc[TILE];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* block = tile + g * TILE * GROUP;
    for (int64_t line = 0; line < TILE * GROUP; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH + line, _MM_HINT_T0);
    const __m256i xv = q.group(first_group + g);
    const __m256 xs = q.group_scales(first_group + g);
    for (int64_t k = 0; k < TILE; ++k) {
      __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + k * GROUP));
      // maddubs multiplies unsigned by signed bytes: |w| times x carrying w's sign
      acc[k] = _mm256_add_ps(dot32(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w), xs), acc[k]);
    }
  }
  return sum8(acc);
}

template <int R>
WIDE void int8_tile_wide(
    const int8_t* tile, const QuantizedRows& q, int64_t first_row, int64_t groups, __m256 row_scales, float* y,
    int64_t y_stride) {
  __m512 acc[R][TILE / 2];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* block = tile + g * TILE * GROUP;
    for (int64_t line = 0; line < TILE * GROUP; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH + line, _MM_HINT_T0);
    __m512i xv[R];
    __m512 xs[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = _mm512_broadcast_i64x4(q.group((first_row + r) * groups + g));
      xs[r] = twice(q.group_scales((first_row + r) * groups + g));
    }
    for (int64_t p = 0; p < TILE / 2; ++p) {
      __m512i w = _mm512_loadu_si512(block + 2 * p * GROUP);
      // vpdpbusd multiplies unsigned by signed bytes too (no sign instruction in AVX-512: a masked negation)
      const __mmask64 negative = _mm512_movepi8_mask(w);
      const __m512i magnitude = _mm512_abs_epi8(w);
      for (int r = 0; r < R; ++r) {
        __m512i sums = _mm512_dpbusd_epi32(zero, magnitude, _mm512_mask_sub_epi8(xv[r], negative, zero, xv[r]));
        acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), xs[r], acc[r][p]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * y_stride, _mm256_mul_ps(sum8_pairs(acc[r]), row_scales));
}

// int4 codes: byte j of a row's group holds code j (low nibble) and code j + 16 (high nibble). ``unpacked`` (several
// activation rows) holds the tile's codes a byte each, unpacked once; with one row they are unpacked in registers.
inline __m256i unpack(const uint8_t* bytes) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), _mm_and_si128(v, nibble));
}

__m256 int4_tile_row(
    const uint8_t* tile, const uint8_t* unpacked, const __m128i* scales, const __m128i* minimums,
    const QuantizedRows& q, int64_t first_group, int64_t groups) {
  __m256 acc[TILE];
  for (auto& a : acc) a = _mm256_setzero_ps();
  __m256 offsets = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* block = tile + g * TILE * GROUP / 2;
    const __m256i xv = q.group(first_group + g);
    const __m256 xs = q.group_scales(first_group + g);
    alignas(32) float group_scales[TILE];
    _mm256_store_ps(group_scales, _mm256_cvtph_ps(_mm_loadu_si128(scales + g)));
    if (unpacked == nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH + 64, _MM_HINT_T0);
    }
    for (int64_t k = 0; k < TILE; ++k) {
      __m256i codes = unpacked == nullptr ? unpack(block + k * GROUP / 2)
                                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                                unpacked + (g * TILE + k) * GROUP));
      acc[k] = _mm256_fmadd_ps(dot32(codes, xv, xs), _mm256_set1_ps(group_scales[k]), acc[k]);
    }
    // w = code * scale + minimum: the minimums meet the plain sum of the group's activations
    offsets = _mm256_fmadd_ps(
        _mm256_cvtph_ps(_mm_loadu_si128(minimums + g)), _mm256_set1_ps(q.sums[first_group + g]), offsets);
  }
  return _mm256_add_ps(sum8(acc), offsets);
}

// The 8 sums of a tile from two accumulators of 4 rows each (row 4h + i of accumulator h in lanes 4i to 4i + 3).
WIDE inline __m256 sum8_quads(const __m512* quads) {
  __m256 a = _mm256_hadd_ps(_mm512_castps512_ps256(quads[0]), _mm512_extractf32x8_ps(quads[0], 1));
  __m256 b = _mm256_hadd_ps(_mm512_castps512_ps256(quads[1]), _mm512_extractf32x8_ps(quads[1], 1));
  // hadd(a, b): rows 0, 2, 4, 6 in lanes 0-3 and rows 1, 3, 5, 7 in lanes 4-7
  return _mm256_permutevar8x32_ps(_mm256_hadd_ps(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 64 bytes of a group's tile are 4 rows' codes, 16 bytes a row: the low nibbles are the row's inputs 0-15 and the high
// nibbles its inputs 16-31, so one load and two masks give 128 codes in the order of the activations' halves repeated
// 4 times, and vpdpbusd sums them by 4, the span of one activation scale: 4 rows in 12 instructions, where unpacking 2
// rows to 64 bytes in the order of the whole group took 10 for 2. SmolLM2's 120 int4 products of a step, one process,
// round-robin: 1.02-1.06x at one activation row (memory-bound), 1.09-1.13x at 4, 1.13-1.17x at 16; one layer with
// its weights in cache 1.2-1.45x.
template <int R>
WIDE void int4_tile_wide(
    const uint8_t* tile, const __m128i* scales, const __m128i* minimums, const QuantizedRows& q, int64_t first_row,
    int64_t groups, float* y, int64_t y_stride) {
  __m512 acc[R][2];
  __m256 offsets[R];
  for (int r = 0; r < R; ++r) {
    offsets[r] = _mm256_setzero_ps();
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  }
  const __m512i zero = _mm512_setzero_si512(), nibble = _mm512_set1_epi8(0x0F);
  const __m512i quad_rows[2] = {  // each row's scale in its 4 lanes
      _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
      _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)};
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* block = tile + g * TILE * GROUP / 2;
    _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH + 64, _MM_HINT_T0);
    __m512i x_low[R], x_high[R];
    __m512 s_low[R], s_high[R];
    for (int r = 0; r < R; ++r) {
      const int64_t at = (first_row + r) * groups + g;
      const int8_t* xv = q.values.data() + at * GROUP;
      const float* xs = q.scales.data() + at * GROUP / QuantizedRows::SPAN;
      x_low[r] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xv)));
      x_high[r] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xv + GROUP / 2)));
      s_low[r] = _mm512_broadcast_f32x4(_mm_loadu_ps(xs));
      s_high[r] = _mm512_broadcast_f32x4(_mm_loadu_ps(xs + 4));
    }
    const __m512 group_scales = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(scales + g)));
    for (int h = 0; h < 2; ++h) {
      const __m512i codes = _mm512_loadu_si512(block + h * 2 * GROUP);
      const __m512i low = _mm512_and_si512(codes, nibble), high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
      const __m512 row_scales = _mm512_permutexvar_ps(quad_rows[h], group_scales);
      for (int r = 0; r < R; ++r) {
        __m512 sums = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, high, x_high[r])), s_high[r]);
        sums = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, low, x_low[r])), s_low[r], sums);
        acc[r][h] = _mm512_fmadd_ps(sums, row_scales, acc[r][h]);
      }
    }
    // w = code * scale + minimum: the minimums meet the plain sum of the group's activations
    const __m256 group_minimums = _mm256_cvtph_ps(_mm_loadu_si128(minimums + g));
    for (int r = 0; r < R; ++r)
      offsets[r] = _mm256_fmadd_ps(group_minimums, _mm256_set1_ps(q.sums[(first_row + r) * groups + g]), offsets[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * y_stride, _mm256_add_ps(sum8_quads(acc[r]), offsets[r]));
}

// The AVX-512 kernels by the number of rows they take at once (1 to ROWS), for the last chunk of fewer rows.
template <typename Kernel>
using ByRows = std::array<Kernel, ROWS>;
template <typename W>
const ByRows<decltype(&dense_tile_wide<W, 1>)> dense_wide = {
    &dense_tile_wide<W, 1>, &dense_tile_wide<W, 2>, &dense_tile_wide<W, 3>, &dense_tile_wide<W, 4>};
const ByRows<decltype(&int8_tile_wide<1>)> int8_wide = {
    &int8_tile_wide<1>, &int8_tile_wide<2>, &int8_tile_wide<3>, &int8_tile_wide<4>};
const ByRows<decltype(&int4_tile_wide<1>)> int4_wide = {
    &int4_tile_wide<1>, &int4_tile_wide<2>, &int4_tile_wide<3>, &int4_tile_wide<4>};

// bfloat16 weights times bfloat16 activations (a bfloat16 model's): vdpbf16ps (AVX-512 BF16: Cooper Lake, Sapphire
// Rapids, Zen 4) multiplies 32 pairs of bfloat16 and adds each pair into a float32 lane in one instruction, where
// widening the weights to float32 took two more and the multiply-adds twice as many. The products are exact either way
// (8 significant bits each); only the order of the float32 sums differs. A tile's block of 8 rows x 8 inputs is two
// registers, rows 0-3 and 4-7, 4 lanes a row (the layout of sum8_quads); the 8 inputs, repeated 4 times, meet them.
// Several rows of bfloat16 products are bound by arithmetic (SmolLM2's products of 16 rows took 23 ms, 184 GFLOP/s, as
// many as float32's), and this kernel takes up to 8 rows a pass (16 accumulators). SmolLM2's 121 products, one process,
// round-robin against the float32 multiply-adds: 5 rows 1.09-1.18x, 7 1.24x, 8-9 1.33-1.41x, 12 1.77x, 16 1.81-1.94x.
// Up to 4 rows, bound by memory, it was 0.94-0.97x, so they keep the multiply-adds (one row its AVX2 kernel).
#define WIDE_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))

const bool has_bf16_dot = cpu_has_wide() && __builtin_cpu_supports("avx512bf16");

template <int R>
WIDE_BF16 void bf16_tile_dot(const uint16_t* tile, const uint16_t* x, int64_t width, float* y, int64_t y_stride,
                             const uint16_t* ahead) {
  __m512 acc[R][2];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < width / TILE; ++c) {
    const uint16_t* block = streamed_block(tile, c, ahead);
    const __m512bh low = (__m512bh)_mm512_loadu_si512(block), high = (__m512bh)_mm512_loadu_si512(block + 4 * TILE);
    for (int r = 0; r < R; ++r) {
      const __m128i inputs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + r * width + c * TILE));
      const __m512bh xv = (__m512bh)_mm512_broadcast_i32x4(inputs);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], low, xv);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], high, xv);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * y_stride, sum8_quads(acc[r]));
}
constexpr int64_t DOT_ROWS = 8;
const std::array<decltype(&bf16_tile_dot<1>), DOT_ROWS> bf16_dot = {
    &bf16_tile_dot<1>, &bf16_tile_dot<2>, &bf16_tile_dot<3>, &bf16_tile_dot<4>,
    &bf16_tile_dot<5>, &bf16_tile_dot<6>, &bf16_tile_dot<7>, &bf16_tile_dot<8>};

// 16-bit and float32 weights: the products in float32 (y float32). x: float32, or for bfloat16 weights bfloat16, which
// bf16_dot takes as it is where it runs (and the float32 path widened where it does not).
template <typename W>
at::Tensor gemv_dense(const at::Tensor& x, const W* wp, int64_t out_features) {
  const int64_t rows = x.size(0), width = x.size(1), blocks = width / TILE;
  at::Tensor y = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  const bool wide = vector_bits == 512 && rows > 1;  // one row: AVX2 was as fast (ONE_ROW)
  const bool bf16 = x.scalar_type() == at::kBFloat16, dot = bf16 && wide && rows > ROWS && has_bf16_dot;
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  // bfloat16 rows for the multiply-adds are widened here: an ATen conversion cost 1.4 us a call, 0.17 ms a token
  std::vector<float> widened(bf16 && !dot ? rows * width : 0);
  for (size_t i = 0; i < widened.size(); i += TILE) _mm256_storeu_ps(widened.data() + i, bf16x8(xb + i));
  const float* xp = bf16 ? widened.data() : x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out_features / TILE, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const W* tile = wp + t * TILE * width;
      float* yt = yp + t * TILE;
      // More than ROWS rows read the tile again from cache, ROWS at a time, with memory idle: the first pass brings
      // the next tile into L2 meanwhile, so that its own first pass does not wait for memory with the arithmetic idle
      // (1.2-1.5x at 4-16 rows; one pass of 2-4 rows gains too). The int8 and int4 kernels are bound by their
      // arithmetic at these rows, and the same prefetch changed nothing there (0.99-1.02x).
      const W* next = t + 1 < end ? tile + TILE * width : nullptr;
      if constexpr (std::is_same_v<W, uint16_t>)
        for (int64_t r = 0; dot && r < rows; r += DOT_ROWS)
          bf16_dot[std::min(DOT_ROWS, rows - r) - 1](
              tile, xb + r * width, width, yt + r * out_features, out_features, r == 0 ? next : nullptr);
      for (int64_t r = 0; wide && !dot && r < rows; r += ROWS)
        dense_wide<W>[std::min(ROWS, rows - r) - 1](
            tile, xp + r * width, width, yt + r * out_features, out_features, r == 0 ? next : nullptr);
      for (int64_t r = 0; !wide && r < rows; ++r)  // further rows find the tile in L1
        _mm256_storeu_ps(yt + r * out_features, dense_tile_row(tile, xp + r * width, blocks));
    }
  });
  return y;
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  check(x, packed, out_features, TILE, true);
  TORCH_CHECK(packed.numel() == out_features * x.size(1) && packed.scalar_type() == at::kBFloat16, "packed bf16");
  return gemv_dense(x, reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), out_features);
}

at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  check(x, packed, out_features, TILE);
  TORCH_CHECK(packed.numel() == out_features * x.size(1) && packed.scalar_type() == at::kFloat, "packed float32");
  return gemv_dense(x, packed.data_ptr<float>(), out_features);
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  check(x, packed, out_features, GROUP);
  const int64_t rows = x.size(0), width = x.size(1), groups = width / GROUP;
  TORCH_CHECK(packed.numel() == out_features * width && packed.scalar_type() == at::kChar, "packed int8");
  TORCH_CHECK(scales.numel() == out_features && scales.scalar_type() == at::kFloat, "scales: float32 (out)");
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const QuantizedRows q(x.data_ptr<float>(), rows, width);
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool wide = vector_bits == 512 && rows > 1;  // one row: AVX2 was as fast (ONE_ROW)
  at::parallel_for(0, out_features / TILE, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int8_t* tile = wp + t * TILE * width;
      float* yt = yp + t * TILE;
      const __m256 row_scales = _mm256_loadu_ps(sp + t * TILE);  // each output row's weight scale
      for (int64_t r = 0; wide && r < rows; r += ROWS)
        int8_wide[std::min(ROWS, rows - r) - 1](tile, q, r, groups, row_scales, yt + r * out_features, out_features);
      for (int64_t r = 0; !wide && r < rows; ++r)
        _mm256_storeu_ps(yt + r * out_features, _mm256_mul_ps(int8_tile_row(tile, q, r * groups, groups), row_scales));
    }
  });
  return y;
}

at::Tensor gemv_int4(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& minimums,
    int64_t out_features) {
  check(x, packed, out_features, GROUP);
  const int64_t rows = x.size(0), width = x.size(1), groups = width / GROUP;
  TORCH_CHECK(packed.numel() * 2 == out_features * width && packed.scalar_type() == at::kByte, "packed int4");
  TORCH_CHECK(scales.numel() == out_features * groups && minimums.numel() == scales.numel(), "int4 scales");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && minimums.scalar_type() == at::kHalf, "int4 scales: float16");
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const QuantizedRows q(x.data_ptr<float>(), rows, width);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const __m128i* sp = reinterpret_cast<const __m128i*>(scales.data_ptr<at::Half>());  // 8 a tile and group
  const __m128i* mp = reinterpret_cast<const __m128i*>(minimums.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  const bool wide = vector_bits == 512;
  at::parallel_for(0, out_features / TILE, 4, [&](int64_t begin, int64_t end) {
    // AVX2 with several rows: the codes of a tile are unpacked once, a byte each, and each row reads them from L1.
    std::vector<uint8_t> unpacked(rows > 1 && !wide ? TILE * width : 0);
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = wp + t * TILE * width / 2;
      float* yt = yp + t * TILE;
      for (int64_t r = 0; wide && r < rows; r += ROWS)
        int4_wide[std::min(ROWS, rows - r) - 1](
            tile, sp + t * groups, mp + t * groups, q, r, groups, yt + r * out_features, out_features);
      if (wide) continue;
      for (int64_t i = 0; rows > 1 && i < TILE * width / 2; i += GROUP / 2)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(unpacked.data() + 2 * i), unpack(tile + i));
      const uint8_t* codes = rows > 1 ? unpacked.data() : nullptr;
      for (int64_t r = 0; r < rows; ++r)
        _mm256_storeu_ps(
            yt + r * out_features, int4_tile_row(tile, codes, sp + t * groups, mp + t * groups, q, r * groups, groups));
    }
  });
  return y;
}

// Prompts and batches of more than 16 rows multiply with PyTorch's matrix-matrix products on the whole weight, which
// these functions write back from the int8 and int4 tiles in one pass: (out, in) row-major, float32 or bfloat16.
// PyTorch's own untiling and dequantizing (permutes, shifts, multiplies, a conversion) took 0.34 s of SmolLM2's 0.81 s
// int4 prefill of 512 tokens. The values are PyTorch's to the bit: a multiply, then an add (not fused), rounded to
// bfloat16 to nearest even as .to(torch.bfloat16) rounds.
inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(at::BFloat16* out, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i half_up = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff));  // ties to even
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, half_up), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

// Each tile's 8 rows written by rows(t, out + t * 8 * width), the tiles split between threads.
template <typename T, typename Rows>
at::Tensor untile_as(int64_t out_features, int64_t width, Rows rows) {
  at::Tensor w = at::empty({out_features, width}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* wp = w.data_ptr<T>();
  at::parallel_for(0, out_features / TILE, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rows(t, wp + t * TILE * width);
  });
  return w;
}

template <typename T>
at::Tensor dequantize_int8_as(const int8_t* wp, const float* sp, int64_t out_features, int64_t width) {
  return untile_as<T>(out_features, width, [=](int64_t t, T* rows) {
    for (int64_t g = 0; g < width / GROUP; ++g)
      for (int64_t k = 0; k < TILE; ++k) {
        const int8_t* codes = wp + ((t * width / GROUP + g) * TILE + k) * GROUP;
        const __m256 scale = _mm256_set1_ps(sp[t * TILE + k]);
        for (int64_t j = 0; j < GROUP; j += 8) {
          const __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
          store8(rows + k * width + g * GROUP + j, _mm256_mul_ps(_mm256_cvtepi32_ps(wide), scale));
        }
      }
  });
}

template <typename T>
at::Tensor dequantize_int4_as(const uint8_t* wp, const at::Half* sp, const at::Half* mp, int64_t out_features,
                              int64_t width) {
  return untile_as<T>(out_features, width, [=](int64_t t, T* rows) {
    for (int64_t g = 0; g < width / GROUP; ++g) {
      const int64_t at_group = (t * width / GROUP + g) * TILE;
      const __m256 scales = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + at_group)));
      const __m256 minimums = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mp + at_group)));
      alignas(32) float scale[TILE], minimum[TILE];
      _mm256_store_ps(scale, scales);
      _mm256_store_ps(minimum, minimums);
      for (int64_t k = 0; k < TILE; ++k) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + (at_group + k) * GROUP / 2));
        const __m128i halves[2] = {_mm_and_si128(bytes, _mm_set1_epi8(15)),
                                   _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15))};  // inputs 0-15, 16-31
        for (int64_t j = 0; j < GROUP; j += 8) {
          const __m128i codes = j % 16 == 0 ? halves[j / 16] : _mm_srli_si128(halves[j / 16], 8);
          const __m256 value = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
          const __m256 product = _mm256_mul_ps(value, _mm256_set1_ps(scale[k]));
          store8(rows + k * width + g * GROUP + j, _mm256_add_ps(product, _mm256_set1_ps(minimum[k])));
        }
      }
    }
  });
}

// bfloat16 and float32 tiles back to (out, in): PyTorch's copy of the permuted view ran at about 7 GB/s.
template <typename T>
at::Tensor untile_dense_as(const T* wp, int64_t out_features, int64_t width) {
  return untile_as<T>(out_features, width, [=](int64_t t, T* rows) {
    for (int64_t c = 0; c < width / TILE; ++c)
      for (int64_t k = 0; k < TILE; ++k)
        std::memcpy(rows + k * width + c * TILE, wp + ((t * width / TILE + c) * TILE + k) * TILE, TILE * sizeof(T));
  });
}

at::Tensor untile_dense(const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(packed.is_contiguous() && out_features % TILE == 0 && packed.numel() % (out_features * TILE) == 0,
              "packed bfloat16 or float32 tiles: shape not supported");
  const int64_t width = packed.numel() / out_features;
  if (packed.scalar_type() == at::kFloat) return untile_dense_as(packed.data_ptr<float>(), out_features, width);
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16, "packed tiles: bfloat16 or float32");
  return untile_dense_as(packed.data_ptr<at::BFloat16>(), out_features, width);
}

at::Tensor dequantize_int8(const at::Tensor& packed, const at::Tensor& scales, int64_t out_features,
                           at::ScalarType dtype) {
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kChar && out_features % TILE == 0, "packed int8");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == out_features && scales.scalar_type() == at::kFloat,
              "scales: float32 (out)");
  const int64_t width = packed.numel() / out_features;
  TORCH_CHECK(width % GROUP == 0 && width * out_features == packed.numel(), "packed int8: shape not supported");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype: float32 or bfloat16");
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  return dtype == at::kFloat ? dequantize_int8_as<float>(wp, sp, out_features, width)
                             : dequantize_int8_as<at::BFloat16>(wp, sp, out_features, width);
}

at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& minimums,
                           int64_t out_features, at::ScalarType dtype) {
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte && out_features % TILE == 0, "packed int4");
  const int64_t width = packed.numel() * 2 / out_features;
  TORCH_CHECK(width % GROUP == 0 && width * out_features == packed.numel() * 2, "packed int4: shape not supported");
  TORCH_CHECK(scales.is_contiguous() && minimums.is_contiguous() && scales.numel() == out_features * width / GROUP &&
                  minimums.numel() == scales.numel() && scales.scalar_type() == at::kHalf &&
                  minimums.scalar_type() == at::kHalf,
              "int4 scales and minimums: float16 (out / 8, in / 32, 8)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype: float32 or bfloat16");
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const at::Half *sp = scales.data_ptr<at::Half>(), *mp = minimums.data_ptr<at::Half>();
  return dtype == at::kFloat ? dequantize_int4_as<float>(wp, sp, mp, out_features, width)
                             : dequantize_int4_as<at::BFloat16>(wp, sp, mp, out_features, width);
}

// Attention of one new token per row over the KV cache. PyTorch's CPU flash attention took 25-40 us a layer for
// SmolLM2's one query row (3 key/value heads, a few hundred cached positions), a tenth of a decoding step over 30
// layers, and under torch.compile each layer also copied its cached keys and values to float32 and built a float mask
// for them. Here the cache is read in its own dtype, each key and value once for each query head that shares it
// (grouped-query attention, Ainslie et al. 2023: from L1, after the first); scores, softmax and sums are float32.
inline __m256 widen8(const at::BFloat16* p) { return bf16x8(reinterpret_cast<const uint16_t*>(p)); }

// exp(x) for x <= 0 (scores minus their maximum): 2^n exp(r) with |r| <= ln 2 / 2, exp(r) by Cephes' expf polynomial
// (relative error about 1e-7, as std::exp in float); exactly 0 below -88 (so for masked scores, -inf).
inline __m256 exp8(__m256 x) {
  const __m256 representable = _mm256_cmp_ps(x, _mm256_set1_ps(-88.f), _CMP_GT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), representable);
}

// The scores of one query row against 8 positions from `first` (the last `positions` < 8 of a span: the last key is
// read again for the missing ones, their scores dropped): 8 independent multiply-add chains, reduced in one sum8.
template <typename T>
void score_positions(const float* q, int64_t dim, const T* k, int64_t stride, int64_t first, int64_t positions,
                     float* scores) {
  const T* key[8];
  for (int64_t j = 0; j < 8; ++j) key[j] = k + (first + std::min(j, positions - 1)) * stride;
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int64_t j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qd, widen8(key[j] + d), acc[j]);
  }
  alignas(32) float all[8];
  _mm256_store_ps(all, sum8(acc));
  std::copy(all, all + positions, scores + first);
}

// y[0..8N) += sum over positions of p[t] v[t][0..8N): N <= 8 vectors (64 values) of sums in registers.
template <int N, typename T>
void add_weighted(const float* p, int64_t positions, const T* v, int64_t stride, float* y) {
  __m256 acc[N];
  for (int c = 0; c < N; ++c) acc[c] = _mm256_loadu_ps(y + 8 * c);
  for (int64_t t = 0; t < positions; ++t) {
    const __m256 weight = _mm256_set1_ps(p[t]);
    for (int c = 0; c < N; ++c) acc[c] = _mm256_fmadd_ps(weight, widen8(v + t * stride + 8 * c), acc[c]);
  }
  for (int c = 0; c < N; ++c) _mm256_storeu_ps(y + 8 * c, acc[c]);
}

template <typename T>
void add_weighted(int64_t n, const float* p, int64_t positions, const T* v, int64_t stride, float* y) {
  switch (n) {
    case 1: return add_weighted<1>(p, positions, v, stride, y);
    case 2: return add_weighted<2>(p, positions, v, stride, y);
    case 3: return add_weighted<3>(p, positions, v, stride, y);
    case 4: return add_weighted<4>(p, positions, v, stride, y);
    case 5: return add_weighted<5>(p, positions, v, stride, y);
    case 6: return add_weighted<6>(p, positions, v, stride, y);
    case 7: return add_weighted<7>(p, positions, v, stride, y);
    default: return add_weighted<8>(p, positions, v, stride, y);
  }
}

// One row's key/value head, for the `group` query rows (each `dim` float32, already scaled) that share it: keys and
// values at `stride` per position, `span` positions, those with allowed[t * allowed_stride] (all when null). A query
// row that may attend to nothing gets zeros (SDPA's are NaN).
template <typename T>
void attend_head(const float* q, int64_t group, int64_t dim, const T* k, const T* v, int64_t stride, int64_t span,
                 const bool* allowed, int64_t allowed_stride, float* y, std::vector<float>& scores) {
  while (allowed != nullptr && span > 0 && !allowed[(span - 1) * allowed_stride]) --span;  // nothing after the last
  std::fill(y, y + group * dim, 0.f);
  if (span == 0) return;
  const int64_t padded = (span + 7) / 8 * 8;
  scores.resize(padded);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data();
    for (int64_t t = 0; t < span; t += 8) score_positions(q + g * dim, dim, k, stride, t, std::min<int64_t>(8, span - t), s);
    std::fill(s + span, s + padded, -INFINITY);
    for (int64_t t = 0; allowed != nullptr && t < span; ++t)
      if (!allowed[t * allowed_stride]) s[t] = -INFINITY;
    const float largest = *std::max_element(s, s + padded);
    if (std::isinf(largest)) continue;
    __m256 totals = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(largest)));
      _mm256_storeu_ps(s + t, e);
      totals = _mm256_add_ps(totals, e);
    }
    float* yg = y + g * dim;
    for (int64_t d = 0; d < dim; d += 64) add_weighted(std::min<int64_t>(8, (dim - d) / 8), s, span, v + d, stride, yg + d);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, totals);
    const float inverse = 1.f / std::accumulate(lanes, lanes + 8, 0.f);
    for (int64_t d = 0; d < dim; ++d) yg[d] *= inverse;
  }
}

// q (batch, kv_heads, group, dim): each row's one new token, the query heads of a key/value head as its group rows;
// keys, values (batch, kv_heads, span, dim) with contiguous last dimension (views on the cache); mask: boolean,
// broadcastable to (batch, 1, 1, span), True where a key may be attended to. softmax(q k^T / sqrt(dim)) v, shaped as
// q, in q's dtype.
template <typename T>
at::Tensor decode_attention_of(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                               const std::optional<at::Tensor>& mask) {
  const int64_t batch = q.size(0), heads = q.size(1), group = q.size(2), dim = q.size(3), span = keys.size(2);
  const at::Tensor mask_rows = mask.has_value() ? mask->expand({batch, 1, 1, span}) : at::Tensor();
  const bool* allowed = mask.has_value() ? mask_rows.data_ptr<bool>() : nullptr;
  const int64_t mask_row = mask.has_value() ? mask_rows.stride(0) : 0, mask_position = mask.has_value() ? mask_rows.stride(3) : 0;
  at::Tensor y = at::empty({batch, heads, group, dim}, q.options());
  const T *qp = q.data_ptr<T>(), *kp = keys.data_ptr<T>(), *vp = values.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t q_batch = q.stride(0), q_head = q.stride(1), q_row = q.stride(2);
  const int64_t kv_batch = keys.stride(0), kv_head = keys.stride(1), kv_position = keys.stride(2);
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  // A head costs about 2 * group * span * dim multiply-adds: threads take heads only when each gets enough.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, group * span * dim));
  at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(group * dim), out(group * dim), scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          scaled[g * dim + d] = static_cast<float>(qp[b * q_batch + h * q_head + g * q_row + d]) * scale;
      attend_head(scaled.data(), group, dim, kp + b * kv_batch + h * kv_head, vp + b * kv_batch + h * kv_head,
                  kv_position, span, allowed == nullptr ? nullptr : allowed + b * mask_row, mask_position, out.data(),
                  scores);
      for (int64_t j = 0; j < group * dim; ++j) yp[i * group * dim + j] = static_cast<T>(out[j]);
    }
  });
  return y;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "q, keys, values: (batch, heads, rows, dim)");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.strides() == values.strides(), "keys and values differ in layout");
  TORCH_CHECK(q.size(0) == keys.size(0) && q.size(1) == keys.size(1) && q.size(3) == keys.size(3) && q.size(3) % 8 == 0,
              "q (batch, kv_heads, group, dim) does not match keys (batch, kv_heads, span, dim), or dim % 8 != 0");
  TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1, "the last dimensions must be contiguous");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type(), "one dtype for all");
  TORCH_CHECK(!mask.has_value() || mask->scalar_type() == at::kBool, "mask: boolean");
  if (q.scalar_type() == at::kFloat) return decode_attention_of<float>(q, keys, values, mask);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "dtype: float32 or bfloat16");
  return decode_attention_of<at::BFloat16>(q, keys, values, mask);
}

// The vector width the kernels use: 512 where the CPU has AVX-512 with VNNI, else 256 (AVX2). Setting 256 on such a
// CPU runs the AVX2 versions (tests compare both); 512 is refused where the CPU lacks it. Returns the width in use.
int64_t use_vector_bits(int64_t bits) {
  TORCH_CHECK(bits == 256 || bits == 512, "vector bits: 256 or 512, got ", bits);
  vector_bits = bits == 512 && cpu_has_wide() ? 512 : 256;
  return vector_bits;
}

int64_t current_vector_bits() { return vector_bits; }

// Whether bfloat16 rows multiply with the pair products (bf16_tile_dot): the AVX-512 path on a CPU with AVX-512 BF16.
bool bf16_pair_products() { return vector_bits == 512 && has_bf16_dot; }

}  // namespace

TORCH_LIBRARY(llmkit_cpu, m) {
  m.def("gemv_bf16(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("gemv_f32(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, Tensor scales, Tensor minimums, int out_features) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor? mask) -> Tensor");
  m.def("untile_dense(Tensor packed, int out_features) -> Tensor");
  m.def("dequantize_int8(Tensor packed, Tensor scales, int out_features, ScalarType dtype) -> Tensor");
  m.def("dequantize_int4(Tensor packed, Tensor scales, Tensor minimums, int out_features, ScalarType dtype) -> Tensor");
  m.def("use_vector_bits(int bits) -> int", &use_vector_bits);
  m.def("vector_bits() -> int", &current_vector_bits);
  m.def("bf16_pair_products() -> bool", &bf16_pair_products);
}

TORCH_LIBRARY_IMPL(llmkit_cpu, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("decode_attention", &decode_attention);
  m.impl("untile_dense", &untile_dense);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int4", &dequantize_int4);
}
