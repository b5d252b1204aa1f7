#pragma once
// The support matrix of the ops: which q / out dtypes, head dims and KV storage formats each op
// runs on each device. The CUDA launchers check against it, the bindings export it
// (vattn._C.support_table) and the Python layer (python/vattn/_support.py) reads it for its
// argument checks, the test helpers' skips and the docs, so there is one source.
#include <cstdint>

#include "vattn/dtypes.h"
#include "vattn/kv_format.h"

namespace vattn {
namespace support {

enum Op : int32_t { kAppendKv = 0, kDecode = 1, kPrefill = 2, kMerge = 3, kCompactKv = 4, kSparseDecode = 5 };
constexpr int32_t kNumOps = 6;
enum Device : int32_t { kCpu = 0, kCuda = 1 };

constexpr uint32_t bit(int32_t code) { return 1u << code; }
constexpr uint32_t kAllDtypes = bit(kFloat32) | bit(kFloat16) | bit(kBFloat16);
constexpr uint32_t kHalfDtypes = bit(kFloat16) | bit(kBFloat16);
constexpr uint32_t kPlainFormats = bit(kKvFloat32) | bit(kKvFloat16) | bit(kKvBFloat16);
constexpr uint32_t kQuantFormats = bit(kKvFp8E4M3) | bit(kKvInt8) | bit(kKvInt4) | bit(kKvInt4Channel);

struct Entry {
  uint32_t dtypes;            // bit set of DType codes (q / out; k / v for append_kv)
  uint32_t kv_formats;        // bit set of KvFormatCode
  int32_t head_dim_multiple;  // head_dim must be a multiple of this
  int32_t max_head_dim;       // 0: no limit
};

// compact_kv moves stored bytes: every format, any head_dim, on both devices. sparse_decode
// (Quest) reads every format; its CUDA kernels take head_dim <= 256.
constexpr Entry entry(Device d, Op op) {
  return op == kMerge          ? Entry{kAllDtypes, kPlainFormats, 1, 0}
         : op == kCompactKv    ? Entry{kAllDtypes, kPlainFormats | kQuantFormats, 1, 0}
         : op == kSparseDecode ? Entry{kAllDtypes, kPlainFormats | kQuantFormats, 1, d == kCpu ? 0 : 256}
         : d == kCpu           ? Entry{kAllDtypes, kPlainFormats | kQuantFormats, 1, 0}
                               : Entry{kAllDtypes, kPlainFormats | kQuantFormats, 8, 256};  // append, decode, prefill
}

constexpr bool supported(Device d, Op op, int32_t dtype, int32_t kv_format, int32_t head_dim) {
  return (entry(d, op).dtypes & bit(dtype)) != 0 && (entry(d, op).kv_formats & bit(kv_format)) != 0 && head_dim > 0 &&
         head_dim % entry(d, op).head_dim_multiple == 0 &&
         (entry(d, op).max_head_dim == 0 || head_dim <= entry(d, op).max_head_dim);
}

}  // namespace support
}  // namespace vattn
