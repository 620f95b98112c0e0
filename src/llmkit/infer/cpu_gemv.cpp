// Matrix-vector products for one-token decoding on x86 CPUs with AVX2 (llmkit.infer.cpu_kernels builds this file
// at first use). Decoding multiplies a few activation rows by every weight once per token, so its speed is how fast
// the weights stream from memory and how little work each byte costs. PyTorch's CPU kernels for these shapes ran at
// 5-13 GB/s on the 2-core machine llama.cpp read 16 GB/s on; two things close the gap:
//  - the weights of 8 output rows lie together in tiles ([out / 8][in / width][8][width]), so each thread reads one
//    sequential stream (row-major weights give it 8 short streams) and the 8 sums end in one vector store;
//  - int8 and int4 weights multiply int8 activations with maddubs: 32 byte products summed in pairs in one
//    instruction, where converting each weight to float costs three (llama.cpp's Q8_0 and Q4 dot products). The
//    activations get one scale per 4 inputs, not llama.cpp's one per 32: SmolLM2 has channels near 100 beside
//    values near 1, and a shared scale of 32 rounded the small ones away (its int4 logits moved 12 % of the
//    largest instead of 3 %). The finer scales cost one multiplication: after maddubs and madd each 32-bit
//    lane holds the products of 4 neighbouring inputs, so a vector of 8 scales meets them lane by lane.
// OpenMP (at::parallel_for) splits the tiles between torch's threads: compile with -fopenmp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
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

// Activations as int8 with one scale per 4 inputs, and each group of 32's plain sum (for int4's minimums).
struct QuantizedRows {
  static constexpr int64_t SPAN = 4;
  std::vector<int8_t> values;
  std::vector<float> scales, sums;
  QuantizedRows(const float* x, int64_t rows, int64_t width)
      : values(rows * width), scales(rows * width / SPAN), sums(rows * width / GROUP, 0.f) {
    for (int64_t s = 0; s < rows * width / SPAN; ++s) {
      const float* xs = x + s * SPAN;
      float amax = 0.f;
      for (int64_t j = 0; j < SPAN; ++j) {
        amax = std::max(amax, std::fabs(xs[j]));
        sums[s * SPAN / GROUP] += xs[j];
      }
      float inverse = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t j = 0; j < SPAN; ++j) values[s * SPAN + j] = static_cast<int8_t>(std::nearbyint(xs[j] * inverse));
      scales[s] = amax / 127.f;
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

void check(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (rows, in)");
  TORCH_CHECK(packed.is_contiguous(), "packed weights must be contiguous");
  TORCH_CHECK(out_features % TILE == 0 && x.size(1) % multiple == 0, "shape not supported");
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  check(x, packed, out_features, TILE);
  const int64_t rows = x.size(0), width = x.size(1), blocks = width / TILE;
  TORCH_CHECK(packed.numel() == out_features * width && packed.scalar_type() == at::kBFloat16, "packed bf16");
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out_features / TILE, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* tile = wp + t * TILE * width;
      for (int64_t r = 0; r < rows; ++r) {  // further rows find the tile in L1
        __m256 acc[TILE];
        for (auto& a : acc) a = _mm256_setzero_ps();
        const float* xr = xp + r * width;
        for (int64_t c = 0; c < blocks; ++c) {
          const uint16_t* block = tile + c * TILE * TILE;
          _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH + 64, _MM_HINT_T0);
          __m256 xv = _mm256_loadu_ps(xr + c * TILE);
          for (int64_t k = 0; k < TILE; ++k) acc[k] = _mm256_fmadd_ps(bf16x8(block + k * TILE), xv, acc[k]);
        }
        _mm256_storeu_ps(yp + r * out_features + t * TILE, sum8(acc));
      }
    }
  });
  return y;
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
  at::parallel_for(0, out_features / TILE, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int8_t* tile = wp + t * TILE * width;
      for (int64_t r = 0; r < rows; ++r) {
        __m256 acc[TILE];
        for (auto& a : acc) a = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          const int8_t* block = tile + g * TILE * GROUP;
          for (int64_t line = 0; line < TILE * GROUP; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH + line, _MM_HINT_T0);
          const __m256i xv = q.group(r * groups + g);
          const __m256 xs = q.group_scales(r * groups + g);
          for (int64_t k = 0; k < TILE; ++k) {
            __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + k * GROUP));
            // maddubs multiplies unsigned by signed bytes: |w| times x carrying w's sign
            acc[k] = _mm256_add_ps(dot32(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w), xs), acc[k]);
          }
        }
        _mm256_storeu_ps(yp + r * out_features + t * TILE, _mm256_mul_ps(sum8(acc), _mm256_loadu_ps(sp + t * TILE)));
      }
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
  const __m128i nibble = _mm_set1_epi8(0x0F);
  // byte j of a row's group holds code j (low nibble) and code j + 16 (high nibble)
  auto unpack = [&](const uint8_t* bytes) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), _mm_and_si128(v, nibble));
  };
  at::parallel_for(0, out_features / TILE, 4, [&](int64_t begin, int64_t end) {
    // With several rows the codes of a tile are unpacked once, a byte each, and each row reads them from L1.
    std::vector<uint8_t> unpacked(rows > 1 ? TILE * width : 0);
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = wp + t * TILE * width / 2;
      for (int64_t i = 0; rows > 1 && i < TILE * width / 2; i += GROUP / 2)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(unpacked.data() + 2 * i), unpack(tile + i));
      for (int64_t r = 0; r < rows; ++r) {
        __m256 acc[TILE];
        for (auto& a : acc) a = _mm256_setzero_ps();
        __m256 offsets = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* block = tile + g * TILE * GROUP / 2;
          const __m256i xv = q.group(r * groups + g);
          const __m256 xs = q.group_scales(r * groups + g);
          alignas(32) float group_scales[TILE];
          _mm256_store_ps(group_scales, _mm256_cvtph_ps(_mm_loadu_si128(sp + t * groups + g)));
          if (rows == 1) {
            _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH + 64, _MM_HINT_T0);
          }
          for (int64_t k = 0; k < TILE; ++k) {
            __m256i codes = rows == 1 ? unpack(block + k * GROUP / 2)
                                      : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                            unpacked.data() + (g * TILE + k) * GROUP));
            acc[k] = _mm256_fmadd_ps(dot32(codes, xv, xs), _mm256_set1_ps(group_scales[k]), acc[k]);
          }
          // w = code * scale + minimum: the minimums meet the plain sum of the group's activations
          offsets = _mm256_fmadd_ps(
              _mm256_cvtph_ps(_mm_loadu_si128(mp + t * groups + g)), _mm256_set1_ps(q.sums[r * groups + g]), offsets);
        }
        _mm256_storeu_ps(yp + r * out_features + t * TILE, _mm256_add_ps(sum8(acc), offsets));
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(llmkit_cpu, m) {
  m.def("gemv_bf16(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, Tensor scales, Tensor minimums, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmkit_cpu, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
}
