# Development check of the CUDA split-KV decode path without a GPU: run with python.
# A line-by-line numpy port of make_plan (cuda/kernels/decode.cu), decode_split_kernel
# (cuda/include/vattn/cuda/decode_split_kernel.cuh) and decode_split_merge_kernel, run per CTA
# and compared with a float64 reference. Keep it in step when the kernels change.
# The plan (check_plans): choose_splits ported with the SM count and the occupancy of the
# launched instance as inputs, checked for bounds, whole (or at least half-full) waves of
# occupancy x SMs CTAs, a single long row filling every SM, and against an exhaustive search.
# What it checks beyond the math: the split ranges cover [lo, L) exactly once whatever the host
# length hint; no K/V slot outside [lo, L) of the row is read (the cache holds NaN there);
# padded GQA heads never write; the cp.async pipeline: a stage being refilled reads as NaN
# from the copy's issue until a wait_group lands it, so a read of a stage in flight (a missing
# wait or __syncthreads, a wrong stage index) poisons the output.
# Quantized K/V (fp8_e4m3 / int8 / int4, K and V apart): the cache holds the stored bytes and
# fp32 scale words; the tiles move 16-byte chunks of bytes and 4-byte scale words through the
# same pipeline; each lane's 8-element piece is decoded with the kernel's bit tricks
# (kv_device_format.cuh: fp8 both ways -- the sm_80 fp16 bit trick with its 2^8 folded into the
# scale, and the exact sm_89+ conversion --, int8 by PRMT into the mantissa of 2^23, int4 by
# nibble into the mantissa of 2^23); scales apply per key (logit = scale * q.raw + zero * sum(q),
# o += (p * scale) * raw, zero points through a per-head scalar). The reference dequantizes the
# stored bytes independently (kv_format.h's definition), in float64.
# int4_ch keys ("int4ch": int4 codes, a scale and a zero per channel over groups of G = HD / 2
# tokens, parameter i of a group in word i % 4 of its token i / 4): no words travel with the
# tiles; each key group's lanes fold the parameters of the group of the key they read into q
# (q * s, and q . z added to the dot product) when the key passes the folded group, reading them
# from the cache -- only inside the row's mapped whole groups. The reference dequantizes code * s
# + z in float64 (the kernel's fold equals it up to fp32 rounding, which a GPU test bounds).
# KV views (tools/emulate_paging.py): every side lives in flat memory with element strides (NHD or
# HND), contiguous or paged (a block table per row: permuted and shared blocks, sizes 16..512,
# non-powers of two, clamped bad ids); the CTA forms every address as the kernel does (head base
# once, a token offset -- paged: its block from the table -- per token of a tile, the int4_ch
# group's words from the group's first token), while the reference maps tokens through the table
# on its own.
import math
import pathlib
import struct
import sys
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from emulate_headers import constant, decode_split  # noqa: E402  (the constants, read from the sources)
from emulate_paging import Side, View, head_base, head_tok, make_view, strides_of  # noqa: E402

H = decode_split()
_FMT_HDR = "cuda/include/vattn/cuda/kv_device_format.cuh"
LANE_ELEMS = constant(_FMT_HDR, "kLaneElems")
_FMT_STRUCT = {
    "f16": "DevicePlain16Format",
    "fp8": "DeviceKvFormat<Fp8E4M3Format>",
    "int8": "DeviceKvFormat<Int8Format>",
    "int4": "DeviceKvFormat<Int4Format>",
    "int4ch": "DeviceKvFormat<Int4ChannelFormat>",
}
# Per format: elements per 16-byte chunk, bytes of one lane piece, scale words, zero point.
FMT = {
    k: dict(
        epc=constant(_FMT_HDR, "kElemsPerChunk", v),
        pb=constant(_FMT_HDR, "kPieceBytes", v),
        words=constant(_FMT_HDR, "kScaleWords", v),
        zero=(k == "int4"),
    )
    for k, v in _FMT_STRUCT.items()
}
CH_WORDS = constant("cuda/include/vattn/quant.h", "kInt4ChWords")  # cache words per int4ch token
assert FMT["int4ch"]["words"] == 0  # no words in the tiles: the kernel folds the group into q
assert FMT["f16"]["epc"] == H["elems_per_chunk"]

NEG = -np.inf
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MIN_SPLIT_KEYS, MAX_SPLITS = H["min_split_keys"], H["max_splits"]


def next_pow2(x):
    return 1 if x <= 1 else 2 * next_pow2((x + 1) // 2)


def cfg(HD, kf="f16", vf="f16"):
    """DecodeSplitConfig<HD, EPC_K, EPC_V> (decode_args.cuh)."""
    LE = LANE_ELEMS
    NP = HD // LE
    TD = next_pow2(NP)
    KPW = 32 // TD
    KPI = H["warps"] * KPW
    NK = H["iters_per_tile"]
    SUB = min(FMT[kf]["epc"], FMT[vf]["epc"]) // LE
    assert HD % FMT[kf]["epc"] == 0 and HD % FMT[vf]["epc"] == 0
    return dict(
        LE=LE,
        NP=NP,
        TD=TD,
        KPW=KPW,
        KPI=KPI,
        NK=NK,
        SUB=SUB,
        TILE=KPI * NK * SUB,
        STAGES=H["stages"],
        CHK=HD // FMT[kf]["epc"],
        CHV=HD // FMT[vf]["epc"],
    )


def cdiv(a, b):
    return (a + b - 1) // b


MAX_GROUP_BLOCK = 8  # decode_split_max_group_block (decode_args.cuh), every format pair


def split_chunk(n, s, tile):
    return cdiv(cdiv(n, s), tile) * tile


def real_splits(n, s, tile):
    return cdiv(n, split_chunk(n, s, tile))


def choose_splits(base_ctas, n, tile, sm_count, occupancy):
    """choose_splits (decode.cu): (splits, chunk) from the grid without splits, the planned keys
    per row, the tile, the SM count and the occupancy of the launched instance."""
    wave = max(occupancy, 1) * max(sm_count, 1)
    max_s = cdiv(n, max(MIN_SPLIT_KEYS, tile))
    max_s = min(max_s, MAX_SPLITS)
    max_s = max(max_s, 1)
    top = real_splits(n, max_s, tile)
    best = top
    if base_ctas * top > wave:
        full = cdiv(wave, base_ctas)
        s = full
        while real_splits(n, s, tile) < full:
            s += 1
        first = real_splits(n, s, tile)
        cap = min(top, 2 * first)

        def waves(r):
            return cdiv(base_ctas * r, wave)

        best = first
        w = waves(first)
        while True:
            fit = w * wave // base_ctas
            r = real_splits(n, min(fit, cap), tile)
            if r * waves(best) > best * waves(r):
                best = r
            if fit >= cap:
                break
            w = waves(fit + 1)
    chunk = split_chunk(n, best, tile)
    return cdiv(n, chunk), chunk


def choose_splits_exhaustive(base_ctas, n, tile, sm_count, occupancy):
    """The rule of choose_splits by brute force over every split count (an independent check of
    its candidate search): reachable counts r (real_splits(r) == r) within the bounds; if none
    exceeds one wave, the largest; else the smallest that fills one wave (first), then the one
    in [first, min(top, 2 * first)] with the fullest waves (r / waves(r)), the smaller on a tie."""
    wave = max(occupancy, 1) * max(sm_count, 1)
    max_s = max(1, min(cdiv(n, max(MIN_SPLIT_KEYS, tile)), MAX_SPLITS))
    reach = [r for r in range(1, max_s + 1) if real_splits(n, r, tile) == r]
    top = reach[-1]
    if base_ctas * top <= wave:
        return top
    first = min(r for r in reach if base_ctas * r >= wave)
    cands = [r for r in reach if first <= r <= min(top, 2 * first)]
    return max(cands, key=lambda r: (r / cdiv(base_ctas * r, wave), -r))


def plan_n(max_seqlen_k, max_seq, window):
    n = max_seqlen_k if max_seqlen_k > 0 else max_seq
    n = min(n, max_seq)
    if window >= 0 and n > window + 1:
        n = window + 1
    return max(n, 1)


def make_plan(batch, hq, hkv, HD, max_seqlen_k, max_seq, window, sms, occ, kf="f16", vf="f16"):
    group = hq // hkv
    gb = 1 if group <= 1 else 2 if group <= 2 else 4 if group <= 4 else 8
    gb = min(gb, MAX_GROUP_BLOCK)
    chunks = cdiv(group, gb)
    tile = cfg(HD, kf, vf)["TILE"]
    n = plan_n(max_seqlen_k, max_seq, window)
    base = batch * hkv * chunks
    splits, chunk = choose_splits(base, n, tile, sms, occ)
    return gb, chunks, splits, chunk


def key_range(a, b, kvh):
    r = a["row_ids"][b] if a["row_ids"] is not None else b
    L = a["head_lens"][b][kvh] if a["head_lens"] is not None else a["seqlens"][b]
    if r < 0 or r >= a["num_rows"]:
        r, L = 0, 0
    L = max(0, min(L, a["max_seq"]))
    first = L - 1 - a["window"] if a["window"] >= 0 else 0
    return r, max(first, 0), L


# ---- stored formats: bytes, the kernel's piece decoders, the reference dequantization --------


def e4m3_value(b):
    """OCP e4m3fn value of code b (kv_format.h / quant.h definition), float64."""
    b = int(b)
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 7
    return sign * (m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def byte_perm(x, y, sel):
    """__byte_perm(x, y, sel) (default mode): result byte k = byte (sel >> 4k) & 7 of {y:x}."""
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(b[(sel >> (4 * k)) & 7] << (8 * k) for k in range(4))


def f32(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def half(bits):
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def decode_piece(fmt, piece, arch):
    """DeviceKvFormat<fmt>::decode of one lane's piece (a list of byte values) -> 8 raw floats,
    bit for bit as the kernel computes them (a NaN byte -- a slot in flight -- poisons all 8)."""
    if any(np.isnan(piece)):
        return np.full(LANE_ELEMS, np.nan)
    piece = [int(x) for x in piece]
    words = [sum(piece[4 * w + i] << (8 * i) for i in range(4)) for w in range(len(piece) // 4)]
    out = []
    if fmt == "fp8":
        for w in words:
            for two in (w & 0xFFFF, w >> 16):
                if arch >= 89:  # cvt.rn.f16x2.e4m3x2: exact
                    out += [e4m3_value(two & 0xFF), e4m3_value(two >> 8)]
                else:  # bit trick: fp16 bits of value * 2^-8 on both halves
                    t = byte_perm(two, 0, 0x1404)
                    h = (t & 0x80008000) | ((t & 0x7F007F00) >> 1)
                    out += [half(h & 0xFFFF), half(h >> 16)]
    elif fmt == "int8":
        for w in words:
            biased = w ^ 0x80808080
            for i in range(4):
                out.append(float(np.float32(f32(byte_perm(biased, 0x4B000000, 0x7540 | i))) - np.float32(8388736.0)))
    elif fmt in ("int4", "int4ch"):
        (w,) = words
        for i in range(8):
            out.append(float(np.float32(f32(0x4B000000 | ((w >> (4 * i)) & 0xF))) - np.float32(8388608.0)))
    else:
        raise ValueError(fmt)
    return np.array(out)


def decode_mul(fmt, arch):
    """What DeviceKvFormat<fmt>::scale multiplies the stored scale by."""
    return 256.0 if fmt == "fp8" and arch < 89 else 1.0


def dequant_row(fmt, row_bytes, words, HD):
    """Reference dequantization of one stored vector (kv_format.h dequant), float64."""
    if fmt == "fp8":
        return np.array([e4m3_value(b) for b in row_bytes]) * words[0]
    if fmt == "int8":
        return np.array([float(np.int8(np.uint8(b))) for b in row_bytes]) * words[0]
    if fmt == "int4":
        codes = [(int(row_bytes[i >> 1]) >> (4 * (i & 1))) & 0xF for i in range(HD)]
        return np.array(codes, np.float64) * words[0] + words[1]
    raise ValueError(fmt)


def row_bytes(fmt, HD):
    return HD // 2 if fmt in ("int4", "int4ch") else HD


def group_size(HD):
    """G of int4_ch (quant::int4_ch_group): head_dim / 2 tokens."""
    return HD // 2


def group_params(words, row, gi, kvh, HD):
    """Scales and zeros [HD] of group gi of one (row, kv head) of an int4ch side, read as the
    kernel reads them: parameter i at word (i & 3) of the group's token (i >> 2)."""
    G = group_size(HD)
    par = np.array([words[row, gi * G + (i >> 2), kvh, i & 3] for i in range(2 * HD)])
    return par[:HD], par[HD:]


def random_side(rng, fmt, shape_tok, HD):
    """Stored bytes and scale words of random vectors (every code value occurs)."""
    nb = row_bytes(fmt, HD)
    if fmt == "fp8":
        data = rng.integers(0, 256, size=shape_tok + (nb,))
        data[(data & 0x7F) == 0x7F] = 0x7E  # never stores the NaN codes
        words = rng.uniform(0.5, 2.0, size=shape_tok + (1,)) / 448 * 4
    elif fmt == "int8":
        data = rng.integers(-127, 128, size=shape_tok + (nb,)) & 0xFF
        words = rng.uniform(0.5, 2.0, size=shape_tok + (1,)) / 127 * 3
    else:
        data = rng.integers(0, 256, size=shape_tok + (nb,))
        words = np.stack([rng.uniform(0.1, 0.6, size=shape_tok), rng.uniform(-4, 0, size=shape_tok)], -1)
    return data.astype(np.float64), words.astype(np.float32).astype(np.float64)


def check_decoders():
    """Every piece decoder against the reference value of every code (both fp8 paths)."""
    ok = True
    for b in range(256):
        if (b & 0x7F) == 0x7F:
            continue
        piece = [b] * 8
        for arch in (80, 90):
            got = decode_piece("fp8", piece, arch)[0] * decode_mul("fp8", arch)
            ok &= got == e4m3_value(b)
        ok &= decode_piece("int8", piece, 80)[0] == float(np.int8(np.uint8(b)))
        ok &= list(decode_piece("int4", [b, 0, 0xF0, 0x21], 80)) == [b & 0xF, b >> 4, 0, 0, 0, 15, 1, 2]
    print(f"piece decoders vs reference values: {'OK' if ok else 'FAIL'}", flush=True)
    return ok


class Pipe:
    """cp.async groups: a copy poisons its destination at issue and lands at a wait."""

    def __init__(s, **shapes):
        s.m = {k: np.full(v, np.nan) for k, v in shapes.items()}
        s.groups, s.cur = [], []

    def copy(s, name, idx, val):
        s.m[name][idx] = np.nan
        s.cur.append((name, idx, val))

    def commit(s):
        s.groups.append(s.cur)
        s.cur = []

    def wait(s, n):
        while len(s.groups) > n:
            for name, idx, val in s.groups.pop(0):
                s.m[name][idx] = val


def split_range(lo, L, split, ns, chunk_host, TILE):
    """Keys [start, end) of one split (decode_split_kernel): from the real length L, the chunk
    grows when L exceeds the host hint."""
    n = L - lo
    need = cdiv(cdiv(n, ns), TILE) * TILE
    chunk = max(chunk_host, need)
    start64 = lo + split * chunk
    return min(start64, L), min(start64 + chunk, L)


def cta(a, K, V, q, split, b, z, ns, GB, o_part, lse_part, out, lse):
    """One CTA of decode_split_kernel. K / V: dict(fmt, data, words): plain data holds the
    elements [rows, seq, kv_heads, HD]; quantized data the stored bytes [rows, seq, kv_heads,
    row bytes] and words the fp32 scale words [rows, seq, kv_heads, words]."""
    kf, vf, arch = K["fmt"], V["fmt"], a["arch"]
    c = cfg(a["HD"], kf, vf)
    HD, LE, NP, _td, KPI, NK, SUB, TILE, ST = (
        a["HD"],
        c["LE"],
        c["NP"],
        c["TD"],
        c["KPI"],
        c["NK"],
        c["SUB"],
        c["TILE"],
        c["STAGES"],
    )
    CHK, CHV = c["CHK"], c["CHV"]
    KW, VW = FMT[kf]["words"], FMT[vf]["words"]
    kvh = z // a["head_chunks"]
    g0 = (z % a["head_chunks"]) * GB
    gcount = min(GB, a["group"] - g0)
    qh0 = kvh * a["group"] + g0
    row, lo, L = key_range(a, b, kvh)
    view = a["view"]
    start, end = split_range(lo, L, split, ns, a["chunk_host"], TILE)
    ntiles = cdiv(end - start, TILE)
    a["covered"][b, kvh, start:end] += 1 if g0 == 0 else 0

    qv = np.zeros((GB, HD))
    for g in range(GB):
        if g < gcount:
            qv[g] = q[b, qh0 + g].astype(np.float64) * a["q_scale"]
    qsum = qv.sum(axis=1)  # lane partial sums, xor-reduced over the key's lanes
    rowK, rowV = K["data"].shape[-1], V["data"].shape[-1]
    unitK = 8 if kf == "f16" else 16  # one 16-byte chunk: 8 elements, or 16 stored bytes
    unitV = 8 if vf == "f16" else 16
    assert rowK == CHK * unitK and rowV == CHV * unitV
    pipe = Pipe(k=(ST, TILE, rowK), v=(ST, TILE, rowV), kw=(ST, max(TILE * KW, 1)), vw=(ST, max(TILE * VW, 1)))

    # Head bases (kbase, vbase, kw0 / kgw_head, vw0): once per CTA, row term only when contiguous.
    def bases(mem):
        s_row, s_tok, s_head = strides_of(mem, K["mem"])
        return head_base(view, row, kvh, s_row, s_head), s_row, s_tok

    kb, vb = bases(K["mem"]), bases(V["mem"])
    kwb = bases(K["wmem"]) if K["wmem"] is not None else None
    vwb = bases(V["wmem"]) if V["wmem"] is not None else None

    def load_tile(t, st):
        tstart = start + t * TILE
        for mem, hb, name, CH, unit in ((K["mem"], kb, "k", CHK, unitK), (V["mem"], vb, "v", CHV, unitV)):
            base, s_row, s_tok = hb
            for cc_all in range(TILE * CH):
                r, cc = divmod(cc_all, CH)
                j = tstart + r
                if j < end:  # the token's offset (paged: a table lookup) only for keys in range
                    assert lo <= j < L, f"read key {j} outside [{lo}, {L})"
                    val = mem.read(base + head_tok(view, row, j, s_row, s_tok) + cc * unit, unit)
                    assert not np.isnan(val).any(), f"read unwritten slot {j}"
                else:
                    val = np.zeros(unit)
                pipe.copy(name, (st, r, slice(cc * unit, (cc + 1) * unit)), val)
        for mem, hb, name, W in ((K["wmem"], kwb, "kw", KW), (V["wmem"], vwb, "vw", VW)):
            for cw in range(TILE * W):
                r, w = divmod(cw, W)
                j = tstart + r
                if j < end:
                    base, s_row, s_tok = hb
                    val = mem.read(base + head_tok(view, row, j, s_row, s_tok) + w, 1)[0]
                    assert not np.isnan(val), f"read unwritten scale word of slot {j}"
                else:
                    val = 0.0
                pipe.copy(name, (st, cw), val)

    def raw(fmt, name, stg, r):
        """The key's HD raw values as its NP active lanes decode them, in lane order."""
        m = pipe.m[name][stg, r]
        if fmt == "f16":
            return np.concatenate([m[dl * LE : (dl + 1) * LE] for dl in range(NP)])
        pb = FMT[fmt]["pb"]
        return np.concatenate([decode_piece(fmt, m[dl * pb : (dl + 1) * pb], arch) for dl in range(NP)])

    def scale_zero(fmt, name, W, stg, r):
        if fmt in ("f16", "int4ch"):
            return 1.0, 0.0
        w = pipe.m[name][stg]
        return w[r * W] * decode_mul(fmt, arch), (w[r * W + 1] if FMT[fmt]["zero"] else 0.0)

    # int4ch K: per key group, q * s of the folded group, q . z, and the first key past it.
    G = group_size(HD)
    qs = np.zeros((KPI, GB, HD))
    qz = np.zeros((KPI, GB))
    knext = np.zeros(KPI, np.int64)

    def fold(grp, j):
        gi = j // G
        assert gi * G + G <= cdiv(L, G) * G, f"group {gi} of key {j} is past the row's mapped groups"
        # fold_group: the words from the group's first token on (a paged block holds whole groups)
        base, s_row, s_tok = kwb
        gw = base + head_tok(view, row, gi * G, s_row, s_tok)
        par = np.array([K["wmem"].read(gw + (i >> 2) * s_tok + (i & 3), 1)[0] for i in range(2 * HD)])
        sc, ze = par[:HD], par[HD:]
        assert not (np.isnan(sc).any() or np.isnan(ze).any()), f"read unwritten parameters of group {gi}"
        qs[grp] = qv * sc
        qz[grp] = qv @ ze
        knext[grp] = (gi + 1) * G

    m = np.full((KPI, GB), NEG)
    d = np.zeros((KPI, GB))
    o = np.zeros((KPI, GB, HD))
    zacc = np.zeros((KPI, GB))
    for s in range(ST - 1):
        if s < ntiles:
            load_tile(s, s)
        pipe.commit()
    for t in range(ntiles):
        pipe.wait(ST - 2)
        # __syncthreads, then the refill of the stage tile t-1 used is issued before any read
        tn = t + ST - 1
        if tn < ntiles:
            load_tile(tn, tn % ST)
        pipe.commit()
        stg = t % ST
        tstart = start + t * TILE
        for u in range(SUB):
            for grp in range(KPI):
                s_ = np.zeros((NK, GB))
                for kk in range(NK):
                    r = (u * NK + kk) * KPI + grp
                    j = tstart + r
                    if kf == "int4ch":
                        if j < end and j >= knext[grp]:
                            fold(grp, j)
                        dot = qs[grp] @ raw(kf, "k", stg, r) + qz[grp]
                    else:
                        dot = qv @ raw(kf, "k", stg, r)
                    ks, kz = scale_zero(kf, "kw", KW, stg, r)
                    x = dot * ks + kz * qsum
                    if a["cap2"] > 0:
                        x = a["cap2"] * np.tanh(x)
                    s_[kk] = x if j < end else NEG
                p = np.zeros((NK, GB))
                for g in range(GB):
                    bm = s_[:, g].max()
                    m_new = max(m[grp, g], bm)
                    if m_new == NEG:
                        f = 1.0
                    else:
                        f = 0.0 if m[grp, g] == NEG else 2.0 ** (m[grp, g] - m_new)
                        d[grp, g] *= f
                        m[grp, g] = m_new
                    for kk in range(NK):
                        p[kk, g] = 0.0 if s_[kk, g] == NEG else 2.0 ** (s_[kk, g] - m[grp, g])
                    d[grp, g] += p[:, g].sum()
                    o[grp, g] *= f
                    zacc[grp, g] *= f
                for kk in range(NK):
                    r = (u * NK + kk) * KPI + grp
                    vsc, vz = scale_zero(vf, "vw", VW, stg, r)
                    vr = raw(vf, "v", stg, r)
                    for g in range(GB):
                        zacc[grp, g] += p[kk, g] * vz
                        o[grp, g] = o[grp, g] + (p[kk, g] * vsc) * vr
    pipe.wait(0)
    o = o + zacc[:, :, None]  # the V zero point, added to every dim before the merge
    for g in range(GB):
        if g >= gcount:
            continue
        M = m[:, g].max()
        D = 0.0
        acc = np.zeros(HD)
        if M != NEG:
            for k in range(KPI):
                if m[k, g] == NEG:
                    continue
                w = 2.0 ** (m[k, g] - M)
                D += d[k, g] * w
                acc += o[k, g] * w
        inv = 1.0 / D if D > 0 else 0.0
        l = (M + math.log2(D)) * LN2 if D > 0 else NEG
        qh = qh0 + g
        if ns == 1:
            out[b, qh] = acc * inv
            lse[b, qh] = l
        else:
            o_part[split, b, qh] = acc * inv
            lse_part[split, b, qh] = l


def merge(ns, o_part, lse_part, out, lse):
    B, H = lse_part.shape[1:]
    for b in range(B):
        for h in range(H):
            ls = lse_part[:, b, h]
            M = ls.max()
            w = np.array([0.0 if (M == NEG or x == NEG) else math.exp(x - M) for x in ls])
            W = w.sum()
            inv = 1.0 / W if W > 0 else 0.0
            acc = np.zeros(o_part.shape[-1])
            for s in range(ns):
                if w[s] > 0:
                    acc += w[s] * o_part[s, b, h]
            out[b, h] = acc * inv
            lse[b, h] = M + math.log(W) if W > 0 else NEG


def dequant_side(side, HD):
    """Float64 values [rows, seq, kv_heads, HD] of one side (NaN where unwritten)."""
    if side["fmt"] == "f16":
        return side["data"].astype(np.float64)
    data, words = side["data"], side["words"]
    outv = np.full(data.shape[:3] + (HD,), np.nan)
    if side["fmt"] == "int4ch":
        G = group_size(HD)
        for row, t, kvh in np.ndindex(*data.shape[:3]):
            if not np.isnan(data[row, t, kvh]).any():
                b = data[row, t, kvh].astype(np.int64)
                codes = np.array([(int(b[i >> 1]) >> (4 * (i & 1))) & 0xF for i in range(HD)], np.float64)
                sc, ze = group_params(words, row, t // G, kvh, HD)
                outv[row, t, kvh] = codes * sc + ze
        return outv
    for idx in np.ndindex(*data.shape[:3]):
        if not np.isnan(data[idx]).any():
            outv[idx] = dequant_row(side["fmt"], data[idx].astype(np.int64), words[idx], HD)
    return outv


def reference(q, Kd, Vd, a):
    B, HQ, HD = q.shape
    out = np.zeros((B, HQ, HD))
    lse = np.full((B, HQ), NEG)
    for b in range(B):
        for h in range(HQ):
            kvh = h // a["group"]
            row, lo, L = key_range(a, b, kvh)
            if L - lo <= 0:
                continue
            x = a["scale"] * (Kd[row, lo:L, kvh] @ q[b, h].astype(np.float64))
            if a["softcap"] > 0:
                x = a["softcap"] * np.tanh(x / a["softcap"])
            mx = x.max()
            e = np.exp(x - mx)
            lse[b, h] = mx + math.log(e.sum())
            out[b, h] = (e / e.sum()) @ Vd[row, lo:L, kvh]
    return out, lse


def make_side(rng, fmt, rows, max_seq, HKV, HD, written):
    """One side of the cache: NaN everywhere, random values / bytes in the written slots."""
    if fmt == "f16":
        data = np.full((rows, max_seq, HKV, HD), np.nan)
        for r, n in written:
            data[r, :n] = rng.standard_normal((n, HKV, HD)).astype(np.float16)
        return dict(fmt=fmt, data=data, words=None)
    data = np.full((rows, max_seq, HKV, row_bytes(fmt, HD)), np.nan)
    if fmt == "int4ch":  # codes of the written tokens, parameters of every group they touch
        G = group_size(HD)
        assert max_seq % G == 0, "an int4_ch cache holds whole groups"
        words = np.full((rows, max_seq, HKV, CH_WORDS), np.nan)
        for r, n in written:
            data[r, :n] = rng.integers(0, 256, size=(n, HKV, row_bytes(fmt, HD)))
            for gi in range(cdiv(n, G)):
                sc = rng.uniform(0.1, 0.6, size=(HKV, HD))
                ze = rng.uniform(-4, 0, size=(HKV, HD))
                par = np.concatenate([sc, ze], -1).astype(np.float32).astype(np.float64)  # [HKV, 2 HD]
                for i in range(2 * HD):
                    words[r, gi * G + (i >> 2), :, i & 3] = par[:, i]
        return dict(fmt=fmt, data=data, words=words)
    words = np.full((rows, max_seq, HKV, FMT[fmt]["words"]), np.nan)
    for r, n in written:
        data[r, :n], words[r, :n] = random_side(rng, fmt, (n, HKV), HD)
    return dict(fmt=fmt, data=data, words=words)


def run(
    HD,
    B,
    HQ,
    HKV,
    lens,
    max_seq,
    window=-1,
    softcap=0.0,
    hint=-1,
    sms=132,
    occ=4,
    row_ids=None,
    head_lens=None,
    seed=0,
    name="",
    kf="f16",
    vf="f16",
    arch=80,
    bs=0,
    layout="NHD",
    share=True,
    bad_ids=False,
):
    rng = np.random.default_rng(seed)
    rows = max(B, 3)
    rl = [lens[b] if head_lens is None else max(head_lens[b]) for b in range(B)]
    rid = list(range(B)) if row_ids is None else row_ids
    written = [(rid[b], min(max(rl[b], 0), max_seq)) for b in range(B) if 0 <= rid[b] < rows]
    K = make_side(rng, kf, rows, max_seq, HKV, HD, written)
    V = make_side(rng, vf, rows, max_seq, HKV, HD, written)
    # The view: contiguous, or paged with bs tokens a block (shared / permuted blocks, bad ids).
    if bs:
        wd = {}
        for r, n in written:
            wd[r] = max(wd.get(r, 0), n)
        view = make_view(rng, rows, max_seq, bs, wd, share=share, bad_ids=bad_ids)
    else:
        view = View(rows, max_seq)
    for side in (K, V):  # flat storage; the reference then sees the rows through the table
        side["mem"] = Side(view, side["data"], layout)
        side["wmem"] = Side(view, side["words"], layout) if side["words"] is not None else None
        side["data"] = side["mem"].logical()
        if side["wmem"] is not None:
            side["words"] = side["wmem"].logical()
    q = rng.standard_normal((B, HQ, HD)).astype(np.float16)
    scale = 1 / math.sqrt(HD)
    group = HQ // HKV
    maxk = hint if hint >= 0 else max([0] + [x for x in (lens if head_lens is None else sum(head_lens, []))])
    GB, chunks, ns, chunk_host = make_plan(B, HQ, HKV, HD, maxk, max_seq, window, sms, occ, kf, vf)
    a = dict(
        HD=HD,
        group=group,
        head_chunks=chunks,
        chunk_host=chunk_host,
        num_rows=rows,
        max_seq=max_seq,
        row_ids=row_ids,
        seqlens=lens,
        head_lens=head_lens,
        window=window,
        scale=scale,
        softcap=softcap,
        q_scale=scale / softcap if softcap > 0 else scale * LOG2E,
        cap2=softcap * LOG2E if softcap > 0 else 0.0,
        covered=np.zeros((B, HKV, max_seq), np.int64),
        arch=arch,
        view=view,
    )
    out = np.full((B, HQ, HD), np.nan)
    lse = np.full((B, HQ), np.nan)
    o_part = np.full((ns, B, HQ, HD), np.nan)
    lse_part = np.full((ns, B, HQ), np.nan)
    for split in range(ns):
        for b in range(B):
            for z in range(HKV * chunks):
                cta(a, K, V, q, split, b, z, ns, GB, o_part, lse_part, out, lse)
    if ns > 1:
        merge(ns, o_part, lse_part, out, lse)
    ro, rlse = reference(q, dequant_side(K, HD), dequant_side(V, HD), a)
    ok = True
    for b in range(B):
        for kvh in range(HKV):
            row, lo, L = key_range(a, b, kvh)
            want = np.zeros(max_seq, np.int64)
            want[lo:L] = 1
            if not (a["covered"][b, kvh] == want).all():
                ok = False
                print(f"  coverage wrong for b={b} kvh={kvh}")
    if np.isnan(out).any() or np.isnan(lse).any():
        ok = False
        print("  NaN / unwritten output")
    err = np.nanmax(np.abs(out - ro)) if out.size else 0.0
    fin = np.isfinite(rlse)
    if not (np.isinf(lse) == ~fin).all():
        ok = False
        print("  lse -inf mismatch")
    lerr = np.abs(lse[fin] - rlse[fin]).max() if fin.any() else 0.0
    ok = ok and err < 1e-9 and lerr < 1e-9
    fmts = "" if kf == vf == "f16" else f" K={kf} V={vf} sm_{arch}"
    fmts += f" paged bs={bs} {layout} lookups={view.lookups}" if bs else (" HND" if layout == "HND" else "")
    print(
        f"{name}: HD={HD} B={B} HQ={HQ} HKV={HKV}{fmts} sms={sms} occ={occ} GB={GB} chunks={chunks} splits={ns} "
        f"chunk={chunk_host} "
        f"err {err:.1e} lse {lerr:.1e} {'OK' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


CASES = [
    dict(name="one split", HD=128, B=2, HQ=4, HKV=4, lens=[37, 5], max_seq=64, sms=1),
    dict(name="splits, hint exact", HD=128, B=1, HQ=8, HKV=2, lens=[700], max_seq=800, sms=2),
    dict(name="hint below real length", HD=64, B=2, HQ=2, HKV=1, lens=[900, 300], max_seq=1000, hint=260, sms=8),
    dict(name="GQA 3 -> 4 (padded head)", HD=96, B=1, HQ=6, HKV=2, lens=[300], max_seq=320, sms=4),
    dict(name="GQA 12 -> 2 chunks of 8", HD=64, B=1, HQ=12, HKV=1, lens=[77], max_seq=96, sms=1),
    dict(
        name="window + softcap", HD=128, B=2, HQ=4, HKV=2, lens=[600, 40], max_seq=640, window=300, softcap=20.0, sms=4
    ),
    dict(name="window 0", HD=256, B=1, HQ=2, HKV=1, lens=[50], max_seq=64, window=0, sms=1),
    dict(
        name="per-head lengths",
        HD=64,
        B=2,
        HQ=4,
        HKV=2,
        lens=[0, 0],
        head_lens=[[530, 0], [3, 260]],
        max_seq=600,
        sms=8,
    ),
    dict(
        name="empty rows, bad slot, L>capacity",
        HD=128,
        B=3,
        HQ=2,
        HKV=1,
        lens=[0, 90, 200],
        max_seq=100,
        row_ids=[0, 7, 2],
        sms=16,
    ),
    dict(name="HD 256, GQA 8, splits", HD=256, B=1, HQ=8, HKV=1, lens=[520], max_seq=530, sms=2),
    dict(
        name="HD 96, GQA 5 -> 8", HD=96, B=2, HQ=10, HKV=2, lens=[257, 31], max_seq=300, window=200, softcap=30.0, sms=4
    ),
    # Quantized K/V: every format on each side, both fp8 decode paths, sub-tiles, splits.
    dict(name="int8, splits", HD=128, B=1, HQ=4, HKV=2, lens=[300], max_seq=320, sms=4, kf="int8", vf="int8"),
    dict(
        name="fp8 (sm_80 bit trick), GQA 3 -> 4",
        HD=96,
        B=1,
        HQ=3,
        HKV=1,
        lens=[140],
        max_seq=160,
        sms=1,
        kf="fp8",
        vf="fp8",
        arch=80,
    ),
    dict(
        name="fp8 (sm_90 cvt), window",
        HD=64,
        B=2,
        HQ=4,
        HKV=2,
        lens=[200, 9],
        max_seq=256,
        window=100,
        sms=4,
        kf="fp8",
        vf="fp8",
        arch=90,
    ),
    dict(
        name="int4, splits, softcap",
        HD=64,
        B=1,
        HQ=2,
        HKV=1,
        lens=[600],
        max_seq=640,
        softcap=20.0,
        sms=8,
        kf="int4",
        vf="int4",
    ),
    dict(
        name="int8 K, int4 V, hint low",
        HD=128,
        B=2,
        HQ=4,
        HKV=1,
        lens=[150, 70],
        max_seq=200,
        hint=40,
        sms=4,
        kf="int8",
        vf="int4",
    ),
    dict(
        name="int4 K, fp8 V, per-head lengths",
        HD=256,
        B=1,
        HQ=2,
        HKV=2,
        lens=[0],
        head_lens=[[70, 5]],
        max_seq=80,
        sms=2,
        kf="int4",
        vf="fp8",
        arch=80,
    ),
    dict(name="int4 HD 96, GQA 8", HD=96, B=1, HQ=8, HKV=1, lens=[100], max_seq=128, sms=1, kf="int4", vf="int4"),
    # int4_ch keys: splits and tiles that start inside a group, windows, per-head lengths, G = 48.
    dict(
        name="int4ch K, int4 V, splits",
        HD=64,
        B=2,
        HQ=4,
        HKV=2,
        lens=[470, 33],
        max_seq=512,
        sms=8,
        kf="int4ch",
        vf="int4",
    ),
    dict(
        name="int4ch K, int8 V, window + softcap, GQA 3 -> 4",
        HD=128,
        B=1,
        HQ=6,
        HKV=2,
        lens=[555],
        max_seq=640,
        window=301,
        softcap=25.0,
        sms=4,
        kf="int4ch",
        vf="int8",
    ),
    dict(
        name="int4ch K, fp8 V, per-head lengths, hint low",
        HD=96,
        B=2,
        HQ=16,
        HKV=2,
        lens=[0, 0],
        head_lens=[[200, 7], [0, 150]],
        max_seq=240,
        hint=60,
        sms=2,
        kf="int4ch",
        vf="fp8",
        arch=90,
    ),
    dict(name="int4ch HD 256, GQA 8", HD=256, B=1, HQ=8, HKV=1, lens=[300], max_seq=384, sms=2, kf="int4ch", vf="int4"),
    # Paged views: block tables with permuted blocks, prefixes shared between rows, block sizes
    # 16 .. 512 (48: not a power of two), block boundaries inside tiles (windows start anywhere)
    # and inside split ranges, NHD and HND strides, every format, clamped out-of-range ids.
    dict(
        name="paged bs 16, splits, window",
        HD=128,
        B=3,
        HQ=8,
        HKV=2,
        lens=[700, 690, 130],
        max_seq=704,
        window=333,
        sms=4,
        bs=16,
    ),
    dict(
        name="paged bs 48 HND, per-head lengths",
        HD=64,
        B=2,
        HQ=4,
        HKV=2,
        lens=[0, 0],
        head_lens=[[530, 97], [530, 260]],
        max_seq=576,
        sms=8,
        bs=48,
        layout="HND",
    ),
    dict(
        name="paged bs 32 HND, int8, softcap, hint low",
        HD=128,
        B=2,
        HQ=4,
        HKV=2,
        lens=[300, 290],
        max_seq=320,
        softcap=20.0,
        hint=100,
        sms=4,
        kf="int8",
        vf="int8",
        bs=32,
        layout="HND",
    ),
    dict(
        name="paged bs 64, int4 K, fp8 V, window",
        HD=64,
        B=2,
        HQ=2,
        HKV=1,
        lens=[600, 610],
        max_seq=640,
        window=419,
        sms=8,
        kf="int4",
        vf="fp8",
        arch=90,
        bs=64,
    ),
    dict(
        name="paged bs 32 HND, int8 K, int4 V, GQA 3 -> 4, window",
        HD=96,
        B=2,
        HQ=6,
        HKV=2,
        lens=[250, 251],
        max_seq=256,
        window=170,
        sms=4,
        kf="int8",
        vf="int4",
        bs=32,
        layout="HND",
    ),
    dict(
        name="paged bs 128, int4ch K, int4 V, splits",
        HD=64,
        B=2,
        HQ=4,
        HKV=2,
        lens=[470, 461],
        max_seq=512,
        sms=8,
        kf="int4ch",
        vf="int4",
        bs=128,
    ),
    dict(
        name="paged bs 48 HND, int4ch K (G 48), fp8 V, per-head lengths",
        HD=96,
        B=2,
        HQ=4,
        HKV=2,
        lens=[0, 0],
        head_lens=[[200, 7], [150, 197]],
        max_seq=240,
        sms=2,
        kf="int4ch",
        vf="fp8",
        arch=90,
        bs=48,
        layout="HND",
    ),
    dict(
        name="paged bs 512, int4ch K, int8 V, splits",
        HD=128,
        B=2,
        HQ=2,
        HKV=1,
        lens=[1100, 700],
        max_seq=1536,
        sms=4,
        kf="int4ch",
        vf="int8",
        bs=512,
    ),
    dict(
        name="paged bs 16, bad ids clamped, bad slot, empty row",
        HD=256,
        B=3,
        HQ=2,
        HKV=1,
        lens=[0, 90, 200],
        max_seq=208,
        window=150,
        row_ids=[0, 7, 2],
        sms=4,
        bs=16,
        bad_ids=True,
    ),
    # Split counts from the occupancy (choose_splits): one exact wave, two whole waves, and a grid
    # wider than a wave split once more for fuller waves; real lengths below and above the hint.
    dict(name="occ 2: one whole wave", HD=128, B=1, HQ=8, HKV=2, lens=[2500], max_seq=2600, sms=3, occ=2),
    dict(name="occ 5: two whole waves", HD=96, B=2, HQ=6, HKV=2, lens=[1500, 700], max_seq=1600, sms=2, occ=5),
    dict(
        name="occ 1: wider than a wave, hint low",
        HD=64,
        B=1,
        HQ=4,
        HKV=4,
        lens=[1900],
        max_seq=2048,
        hint=1500,
        sms=3,
        occ=1,
    ),
]

# The plan checks: SM counts of the GPUs the plan must serve (1 = a tiny part, A100 108, H100 /
# H200 132, a 78-SM part) and every occupancy an instance can have up to 8.
PLAN_SMS = (1, 78, 108, 132)
PLAN_OCCS = tuple(range(1, 9))


def plan_problems(batch, hq, hkv, HD, max_seqlen_k, max_seq, window, sms, occ, kf="f16", vf="f16"):
    """What is wrong with the plan of one call (an empty list when nothing): bounds, whole waves,
    the split ranges covering every row exactly once, agreement with the exhaustive rule."""
    gb, chunks, splits, chunk = make_plan(batch, hq, hkv, HD, max_seqlen_k, max_seq, window, sms, occ, kf, vf)
    tile = cfg(HD, kf, vf)["TILE"]
    n = plan_n(max_seqlen_k, max_seq, window)
    base = batch * hkv * chunks
    wave = occ * sms
    max_s = max(1, min(cdiv(n, max(MIN_SPLIT_KEYS, tile)), MAX_SPLITS))
    top = real_splits(n, max_s, tile)  # the most splits the bounds allow
    ctas = base * splits
    bad = []
    if not 1 <= splits <= max_s:
        bad.append(f"splits {splits} outside [1, {max_s}]")
    if chunk % tile or cdiv(n, chunk) != splits or (splits - 1) * chunk >= n:
        bad.append(f"chunk {chunk} (tile {tile}) does not give {splits} non-empty splits of {n} keys")
    if ctas < wave and splits != top:
        bad.append(f"{ctas} CTAs < one wave of {wave} though the bounds allow {top} splits")
    if ctas < min(sms, base * top):
        bad.append(f"{ctas} CTAs leave SMs of {sms} idle")

    # Whole waves, or the last wave at least half full where the bounds allow it: where some
    # split count the rule may take (reachable with whole tiles, within the length bound and
    # kDecodeMaxSplits, filling one wave, at most twice the first that does) gives such a wave.
    def last_wave(r):
        return base * r - (cdiv(base * r, wave) - 1) * wave

    last = last_wave(splits)
    if base * top > wave and 2 * last < wave:
        first = min(r for r in range(1, top + 1) if real_splits(n, r, tile) == r and base * r >= wave)
        window_ = [r for r in range(first, min(top, 2 * first) + 1) if real_splits(n, r, tile) == r]
        if any(2 * last_wave(r) >= wave for r in window_):
            bad.append(f"last wave {last} / {wave} CTAs, less than half full")
    want = choose_splits_exhaustive(base, n, tile, sms, occ)
    if splits != want:
        bad.append(f"splits {splits}, the exhaustive rule gives {want}")
    # Coverage: rows as long as the hint, shorter, longer (the kernel grows the chunk), windowed.
    for L in sorted({n, max(n - 1000, 0), n // 3, n + 4097, 1}):
        lo = max(L - 1 - window, 0) if window >= 0 else 0
        pos = lo
        for split in range(splits):
            start, end = split_range(lo, L, split, splits, chunk, tile)
            if start != pos or end < start:
                bad.append(f"L={L}: split {split} covers [{start}, {end}), expected to start at {pos}")
                break
            pos = end
        if pos != L:
            bad.append(f"L={L}: splits end at {pos}, not {L}")
    return bad, dict(gb=gb, chunks=chunks, splits=splits, chunk=chunk, ctas=ctas, wave=wave, last=last, top=top)


def check_plans(verbose=True):
    """Plan checks: a single row of 32K keys with 8 kv heads (every group size, head dim and
    format tile) on every SM count and occupancy, must fill every SM (one whole wave of CTAs
    unless the length bound binds) with whole or at least half-full waves, stay in bounds and
    cover the row exactly once; plus a random sweep of grids and lengths against the exhaustive
    rule. Returns the list of problems."""
    problems, rows = [], []
    for HD in (64, 96, 128, 256):
        for kf, vf in (("f16", "f16"), ("int8", "int8"), ("int4", "int4"), ("int4ch", "int8")):
            for hq in (8, 24, 32, 64, 96):
                for sms in PLAN_SMS:
                    for occ in PLAN_OCCS:
                        args = (1, hq, 8, HD, 32768, 32768, -1, sms, occ, kf, vf)
                        bad, pl = plan_problems(*args)
                        problems += [f"{args}: {b}" for b in bad]
                        if HD == 128 and kf == "f16" and hq == 32:
                            rows.append((sms, occ, pl))
    rng = np.random.default_rng(12)
    for _ in range(1500):
        HD = int(rng.choice([64, 96, 128, 256]))
        kf, vf = [str(x) for x in rng.choice(["f16", "int8", "int4", "fp8", "int4ch"], 2)]
        if vf == "int4ch":  # values are stored per token
            vf = "int4"
        if kf == "int4ch" and vf == "f16" or kf == "f16" and vf != "f16":  # both plain or both quantized
            vf = "int8" if kf != "f16" else "f16"
        hkv = int(rng.choice([1, 2, 4, 8]))
        hq = hkv * int(rng.choice([1, 2, 3, 4, 5, 8, 12, 16]))
        batch = int(rng.choice([1, 1, 2, 3, 7, 16, 64, 300]))
        max_seq = int(rng.integers(1, 200000))
        hint = int(rng.integers(0, max_seq + 1))
        window = int(rng.choice([-1, -1, 0, int(rng.integers(0, max_seq + 1))]))
        sms, occ = int(rng.choice(PLAN_SMS)), int(rng.choice(PLAN_OCCS))
        args = (batch, hq, hkv, HD, hint, max_seq, window, sms, occ, kf, vf)
        bad, _ = plan_problems(*args)
        problems += [f"{args}: {b}" for b in bad]
    if verbose:
        print("plan (1 row, 32K keys, 32 q / 8 kv heads, HD 128 f16): sms occ -> splits chunk CTAs waves last-wave")
        for sms, occ, pl in rows:
            waves = cdiv(pl["ctas"], pl["wave"])
            print(
                f"  sms={sms:3d} occ={occ}: splits={pl['splits']:3d} chunk={pl['chunk']:5d} ctas={pl['ctas']:5d} "
                f"waves={waves} last={pl['last']}/{pl['wave']}"
            )
        for b in problems[:20]:
            print("  PLAN PROBLEM:", b)
        print(f"plan checks: {'OK' if not problems else f'{len(problems)} problems, FAIL'}", flush=True)
    return problems


if __name__ == "__main__":
    # Arguments: case indices, or --paged (the paged cases only, no plan checks: the self-test of
    # VATTN_EMU_BREAK in tests/test_kernel_emulation.py).
    paged_only = sys.argv[1:] == ["--paged"]
    if paged_only:
        sel = [c for c in CASES if c.get("bs")]
    else:
        sel = CASES if len(sys.argv) < 2 else [CASES[int(i)] for i in sys.argv[1:]]
    allok = check_decoders()
    allok = (paged_only or not check_plans()) and allok

    def run_case(c):
        try:
            return run(seed=CASES.index(c), **c)
        except (AssertionError, IndexError) as e:  # a read the kernel must never make
            print(f"{c['name']}: FAIL ({type(e).__name__}: {e})", flush=True)
            return False

    allok = all([run_case(c) for c in sel]) and allok
    print("ALL OK" if allok else "SOME FAILED")
