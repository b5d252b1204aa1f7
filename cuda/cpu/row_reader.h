#pragma once
// Readers of K/V cache rows as fp32 for the CPU attention loops (attention_kernels.h), shared by the
// dense engine (attention_cpu.cpp) and the Quest sparse decode (quest_cpu.cpp). Header-only.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention_kernels.h"
#include "vattn/kv_format.h"
#include "vattn/kv_paging.h"

namespace vattn {
namespace cpu {

// One KV head of one cache row as a reader sees it: data and (quantized formats) scale words.
template <class Format>
struct HeadRows {
  const typename Format::storage_t* data;
  int64_t stride_tok;  // storage elements
  const float* scale;  // null for plain formats
  int64_t scale_stride_tok;
};

// Prefetch of n rows of one head from t0 on (storage and scale words), for walks the hardware
// prefetcher does not follow (rows a page or more apart, or jumps). kLocality as cpu::prefetch:
// 3 into L1 for rows used next, 2 for a whole block used after the current one (L1 would not hold it).
template <class Format, int kLocality = 3>
void prefetch_rows(const HeadRows<Format>& h, int64_t t0, int n, int dim) {
  using S = typename Format::storage_t;
  const int bytes = int(dim / Format::kElemsPerStorage * int64_t(sizeof(S)));
  for (int j = 0; j < n; ++j) {
    const char* r = reinterpret_cast<const char*>(h.data + (t0 + j) * h.stride_tok);
    for (int o = 0; o < bytes; o += 64) prefetch<kLocality>(r + o);
    if (Format::kScaleWords > 0) prefetch<kLocality>(h.scale + (t0 + j) * h.scale_stride_tok);
  }
}

// Reads nk rows of one KV head as fp32: a pointer into the cache itself for fp32 storage, else a
// converted (dequantized) copy in buf. Specialized per format (kv_format.h) where a faster loop
// exists; the generic one dequantizes element by element through the format trait.
// kDirect: the rows point into the cache (prefetching ahead of the block pays off), else into buf.
template <class Format>
struct RowReader {
  using S = typename Format::storage_t;
  static constexpr bool kDirect = false;
  static const float* rows(const HeadRows<Format>& h, int j0, int nk, int, int dim, float* buf, int64_t* stride) {
    for (int j = 0; j < nk; ++j) {
      const S* r = h.data + (int64_t)(j0 + j) * h.stride_tok;
      const float* w = h.scale ? h.scale + (int64_t)(j0 + j) * h.scale_stride_tok : nullptr;
      for (int d = 0; d < dim; ++d) buf[(int64_t)j * dim + d] = Format::dequant(r, w, d);
    }
    *stride = dim;
    return buf;
  }
};
template <>
struct RowReader<PlainFormat<float>> {
  static constexpr bool kDirect = true;
  static const float* rows(const HeadRows<PlainFormat<float>>& h, int j0, int, int, int, float*, int64_t* stride) {
    *stride = h.stride_tok;
    return h.data + (int64_t)j0 * h.stride_tok;
  }
};
// Quantized storage: a dequantized copy through the instruction-set-dispatched row converters
// (attention_kernels.h), which prefetch the codes and scales of the rows ahead of the block.
template <class Format, typename S, void (*Convert)(const S*, int64_t, const float*, int64_t, int, int, int, float*)>
struct RowReaderQuant {
  static constexpr bool kDirect = false;
  static const float* rows(const HeadRows<Format>& h, int j0, int nk, int avail, int dim, float* buf, int64_t* stride) {
    Convert(h.data + (int64_t)j0 * h.stride_tok, h.stride_tok, h.scale + (int64_t)j0 * h.scale_stride_tok,
            h.scale_stride_tok, nk, avail, dim, buf);
    *stride = dim;
    return buf;
  }
};
template <>
struct RowReader<Int8Format> : RowReaderQuant<Int8Format, int8_t, cpu::int8_rows_to_float> {};
template <>
struct RowReader<Fp8E4M3Format> : RowReaderQuant<Fp8E4M3Format, uint8_t, cpu::fp8_e4m3_rows_to_float> {};
template <>
struct RowReader<Int4Format> : RowReaderQuant<Int4Format, uint8_t, cpu::int4_rows_to_float> {};
// int4_ch (keys per channel over groups of G = head_dim / 2 tokens): the 2 * dim parameters of
// group g (scale of channel c at index c, zero at dim + c) sit in the words of its tokens, from
// the words of token g * G on (quant::int4_ch_param). Loads them into scale[dim], zero[dim].
inline void int4_ch_load_params(const float* gw, int64_t ws_tok, int dim, float* scale, float* zero) {
  for (int i = 0; i < dim; ++i) {
    scale[i] = gw[quant::int4_ch_param(i, ws_tok)];
    zero[i] = gw[quant::int4_ch_param(dim + i, ws_tok)];
  }
}
// The group of int4_ch token t: loads its parameters and returns how many of the tokens t..end-1
// belong to it (its rows share them).
inline int int4_ch_group_at(const HeadRows<Int4ChannelFormat>& h, int t, int end, int dim, float* scale, float* zero) {
  const int G = Int4ChannelFormat::group(dim), g = t / G;
  int4_ch_load_params(h.scale + int64_t(g) * G * h.scale_stride_tok, h.scale_stride_tok, dim, scale, zero);
  return std::min(end - t, (g + 1) * G - t);
}
// A reader walks the rows group by group: the group's parameters are loaded once, then its rows
// convert through the instruction-set-dispatched int4_ch_rows_to_float (exact:
// quant::int4_ch_value per element). A group's words may sit in tokens past the row's length (the
// cache maps whole groups), which is why readers take them from the group's first token.
template <>
struct RowReader<Int4ChannelFormat> {
  static constexpr bool kDirect = false;
  static const float* rows(const HeadRows<Int4ChannelFormat>& h, int j0, int nk, int avail, int dim, float* buf,
                           int64_t* stride) {
    thread_local std::vector<float> params;
    if (params.size() < size_t(2) * dim) params.resize(size_t(2) * dim);
    float* scale = params.data();
    float* zero = scale + dim;
    for (int j = 0; j < nk;) {
      const int t = j0 + j;
      const int n = int4_ch_group_at(h, t, j0 + nk, dim, scale, zero);
      cpu::int4_ch_rows_to_float(h.data + int64_t(t) * h.stride_tok, h.stride_tok, scale, zero, n, avail - j, dim,
                                 buf + int64_t(j) * dim);
      j += n;
    }
    *stride = dim;
    return buf;
  }
};
// Logits of nq query rows against int4_ch keys ja..je-1 of one head, into s[r * lds + (j - ja)]:
// per group q . (scale * c + zero) = (q * scale) . (c - 7.5) + q . (zero + 7.5 scale), so q is
// scaled by the group's channel scales once and the codes only become floats (no per-element
// multiply-add, which made the int4_ch reader the bound of decode). Equal to q . dequantized key
// up to fp32 rounding (the dequantized values themselves stay exact: RowReader above,
// dequantize_kv). Centred, because zero is the group's minimum: uncentred, both parts are about
// twice the logit with opposite signs, and their rounding errors survive the cancellation (head dim
// 96, softmax scale 1: output error 5.8x torch's own fp32 error; plain fp32 keys 1.1x).
inline void int4_ch_qk(const HeadRows<Int4ChannelFormat>& h, const float* q, int nq, int ja, int je, int avail, int dim,
                       float* kbuf, float* s, int lds) {
  thread_local std::vector<float> work;
  const size_t need = size_t(nq) * dim + size_t(2) * dim + size_t(nq);
  if (work.size() < need) work.resize(need);
  float* qf = work.data();
  float* scale = qf + size_t(nq) * dim;
  float* zero = scale + dim;
  float* bias = zero + dim;
  for (int j = ja; j < je;) {
    const int n = int4_ch_group_at(h, j, je, dim, scale, zero);
    for (int r = 0; r < nq; ++r) {
      const float* qr = q + size_t(r) * dim;
      float* fr = qf + size_t(r) * dim;
      float b = 0.f;
      for (int d = 0; d < dim; ++d) {
        fr[d] = qr[d] * scale[d];
        b += qr[d] * (zero[d] + cpu::kInt4CodeCentre * scale[d]);
      }
      bias[r] = b;
    }
    cpu::int4_centred_codes_to_float(h.data + int64_t(j) * h.stride_tok, h.stride_tok, n, avail - (j - ja), dim, kbuf);
    float* sj = s + (j - ja);
    cpu::qk_block(qf, nq, kbuf, dim, n, n, dim, sj, lds);
    for (int r = 0; r < nq; ++r) {
      float* sr = sj + size_t(r) * lds;
      for (int t = 0; t < n; ++t) sr[t] += bias[r];
    }
    j += n;
  }
}

// Plain 16-bit storage: a converted copy through the instruction-set-dispatched row converter.
template <typename S, void (*Convert)(const uint16_t*, int64_t, int, int, int, float*)>
struct RowReader16 {
  static constexpr bool kDirect = false;
  static const float* rows(const HeadRows<PlainFormat<S>>& h, int j0, int nk, int avail, int dim, float* buf,
                           int64_t* stride) {
    Convert(reinterpret_cast<const uint16_t*>(h.data + (int64_t)j0 * h.stride_tok), h.stride_tok, nk, avail, dim, buf);
    *stride = dim;
    return buf;
  }
};
template <>
struct RowReader<PlainFormat<bf16_t>> : RowReader16<bf16_t, cpu::bf16_rows_to_float> {};
template <>
struct RowReader<PlainFormat<f16_t>> : RowReader16<f16_t, cpu::f16_rows_to_float> {};

template <class Format>
HeadRows<Format> head_rows_of(const void* base, int64_t s_row, int64_t s_tok, int64_t s_head, const float* scale,
                              int64_t ss_row, int64_t ss_tok, int64_t ss_head, int64_t row, int64_t h) {
  HeadRows<Format> r;
  r.data = static_cast<const typename Format::storage_t*>(base) + row * s_row + h * s_head;
  r.stride_tok = s_tok;
  r.scale = Format::kScaleWords > 0 ? scale + row * ss_row + h * ss_head : nullptr;
  r.scale_stride_tok = ss_tok;
  return r;
}

// One side (K or V) of a KVCacheView: data and scale words with their strides (storage elements,
// floats). With a block table the row strides step between physical blocks (kv_paging.h).
struct KvSide {
  const void* data;
  int64_t s_row, s_tok, s_head;
  const float* scale;
  int64_t ss_row, ss_tok, ss_head;
};
inline KvSide k_side(const KVCacheView& c) {
  return KvSide{c.k,       c.k_stride_row,  c.k_stride_tok,  c.k_stride_head,
                c.k_scale, c.ks_stride_row, c.ks_stride_tok, c.ks_stride_head};
}
inline KvSide v_side(const KVCacheView& c) {
  return KvSide{c.v,       c.v_stride_row,  c.v_stride_tok,  c.v_stride_head,
                c.v_scale, c.vs_stride_row, c.vs_stride_tok, c.vs_stride_head};
}

template <class Format>
HeadRows<Format> head_rows_of(const KvSide& s, int64_t row, int64_t h) {
  return head_rows_of<Format>(s.data, s.s_row, s.s_tok, s.s_head, s.scale, s.ss_row, s.ss_tok, s.ss_head, row, h);
}

// Paged views: the rows of kv head h in the physical block that holds token t of cache row `row`,
// indexed from the block's first token (index = t % block_size). A group of int4_ch keys never
// crosses a block (block_size is a multiple of G, checked), so a group's parameter words, found
// from the group's first token, sit in the same block at the same local index as contiguously.
template <class Format>
HeadRows<Format> block_rows_of(const KVCacheView& c, const KvSide& s, int64_t row, int64_t h, int64_t t) {
  const int64_t first = t - t % c.block_size;
  HeadRows<Format> r;
  r.data = static_cast<const typename Format::storage_t*>(s.data) + kv_token_offset(c, row, first, s.s_row, s.s_tok) +
           h * s.s_head;
  r.stride_tok = s.s_tok;
  r.scale =
      Format::kScaleWords > 0 ? s.scale + kv_token_offset(c, row, first, s.ss_row, s.ss_tok) + h * s.ss_head : nullptr;
  r.scale_stride_tok = s.ss_tok;
  return r;
}

// Walks the tokens [ja, je) of (row, kv head h) as runs that share one base pointer:
// f(rows, j0, n, avail, off) for tokens rows[j0 .. j0 + n), which are tokens ja + off .. of the
// walk, avail >= n of them readable from j0 on (for prefetching ahead: avail - off of the caller's
// `avail`, cut at the block's end). A contiguous view is one run (f(head rows, ja, je - ja, avail,
// 0): what the loops did before paging); a paged one is split at block boundaries, so the readers
// keep reading through one pointer per block instead of gathering the rows into a copy.
template <class Format, class F>
inline void for_each_run(const KVCacheView& c, const KvSide& s, int64_t row, int64_t h, int ja, int je, int avail,
                         F&& f) {
  if (!kv_paged(c)) {
    f(head_rows_of<Format>(s, row, h), ja, je - ja, avail, 0);
    return;
  }
  for (int t = ja; t < je;) {
    const int run = kv_run_length(c, t);  // tokens left in t's block
    const int n = std::min(je - t, run);
    f(block_rows_of<Format>(c, s, row, h, t), c.block_size - run, n, std::max(n, std::min(avail - (t - ja), run)),
      t - ja);
    t += n;
  }
}

}  // namespace cpu
}  // namespace vattn
