# Development check of cuda/include/vattn/cuda/prefill_fa2.cuh without a GPU: run with python.
# It mirrors the kernel by hand, so keep it in step when the kernel changes.
# Line-by-line numpy port of prefill_fa2_kernel (addresses, ldmatrix, mma fragments, masks,
# online softmax, epilogue), run per CTA, compared with a float64 reference. Quantized K/V
# (fp8 / int8 / int4) go through a model of QuantTileLoader (unit -> thread mapping, swizzled
# chunk offsets, row masks, the bit operations of the code conversions); int4_ch keys ("int4ch")
# through a model of Int4ChTileLoader (each row's group parameters, 4 words a load, from the
# words of the group's tokens; code * scale rounded, + zero rounded).
# KV views (tools/emulate_paging.py): the cache is 3 rows x 2 kv heads in flat memory (NHD or HND
# strides), contiguous or paged (permuted and shared blocks, block sizes 16..512 incl. 48, block
# boundaries inside the 64-key tiles); the CTA reads row 1, kv head 1 through a port of the
# loaders' KvTileSide addressing (head bases once, each tile row's block looked up once for its
# codes and scale words), the reference through the block table on its own.
import numpy as np
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from emulate_headers import prefill_fa2  # noqa: E402  (the constants, read from the sources)
from emulate_paging import Side, View, head_base, locate_paged, make_view, strides_of  # noqa: E402

NEG = -np.inf
H = prefill_fa2()
NT_CTA = H["threads"]  # Fa2Config::kThreads
ROWS_PER_MT = 16 * H["warps"]  # BM = 16 * MT * kWarps


def offset(r, c, kch):
    return (r * kch + (c ^ (r & 7))) * 16


class Smem:
    def __init__(s, nbytes):
        s.m = np.full(nbytes // 2, np.nan, np.float32)
        s.pending = []

    def land(s):  # cp_async_wait_all + __syncthreads
        for dst, val in s.pending:
            s.m[dst : dst + 8] = val
        s.pending = []

    def ldm(s, addrs, trans=False):
        regs = [[None] * 4 for _ in range(32)]
        for l in range(32):
            g, t = l >> 2, l & 3
            for i in range(4):
                if not trans:
                    a = addrs[8 * i + g] // 2
                    regs[l][i] = (s.m[a + 2 * t], s.m[a + 2 * t + 1])
                else:
                    regs[l][i] = (s.m[addrs[8 * i + 2 * t] // 2 + g], s.m[addrs[8 * i + 2 * t + 1] // 2 + g])
        return regs


def mma(c, a, b0, b1):  # c: [32][4] lists; a: [32][4] pairs; b0,b1: [32] pairs
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for l in range(32):
        g, t = l >> 2, l & 3
        A[g, 2 * t : 2 * t + 2] = a[l][0]
        A[g + 8, 2 * t : 2 * t + 2] = a[l][1]
        A[g, 2 * t + 8 : 2 * t + 10] = a[l][2]
        A[g + 8, 2 * t + 8 : 2 * t + 10] = a[l][3]
        B[2 * t : 2 * t + 2, g] = b0[l]
        B[2 * t + 8 : 2 * t + 10, g] = b1[l]
        C[g, 2 * t : 2 * t + 2] = c[l][0:2]
        C[g + 8, 2 * t : 2 * t + 2] = c[l][2:4]
    Dm = A @ B + C
    for l in range(32):
        g, t = l >> 2, l & 3
        c[l][0], c[l][1] = Dm[g, 2 * t], Dm[g, 2 * t + 1]
        c[l][2], c[l][3] = Dm[g + 8, 2 * t], Dm[g + 8, 2 * t + 1]


def r16(x):
    return float(np.float16(x))


def load_tile(sm, base_off, rows, D, src, row0, lo, hi, NT=NT_CTA):
    # cp.async model: the destination reads as NaN from the issue until cp_async_wait_all lands
    # it (sm.land), so a read of a tile still in flight poisons the output.
    kch = D // 8
    assert (rows * kch) % NT == 0
    for it in range(rows * kch // NT):
        for tid in range(NT):
            idx = it * NT + tid
            r = idx // kch
            c = idx % kch
            dst = (base_off + offset(r, c, kch)) // 2
            if lo <= r < hi:
                g = row0 + r
                assert 0 <= g < src.shape[0] and not np.isnan(src[g, c * 8 : c * 8 + 8]).any(), (
                    "read invalid row %d" % g
                )
                val = src[g, c * 8 : c * 8 + 8].copy()
            else:
                val = np.zeros(8, np.float32)
            sm.m[dst : dst + 8] = np.nan
            sm.pending.append((dst, val))


class TileSide:
    """KvTileSide of one (cache row, kv head): head bases of the elements / codes and of the scale
    words (kv_head_base: the row term only when contiguous) and their strides; offsets(tok) is
    tile_token_offsets (paged: one block lookup for both)."""

    def __init__(self, view, row, kvh, data, words=None, other=None):
        self.view, self.row, self.data, self.words = view, row, data, words
        self.s_row, self.s_tok, s_head = strides_of(data, other)
        self.base = head_base(view, row, kvh, self.s_row, s_head)
        if words is not None:
            self.ss_row, self.ss_tok, ss_head = strides_of(words, other)
            self.sbase = head_base(view, row, kvh, self.ss_row, ss_head)

    def offsets(self, tok):
        if self.view.paged:
            blk, t = locate_paged(self.view, self.row, tok)
            return blk * self.s_row + t * self.s_tok, (blk * self.ss_row + t * self.ss_tok if self.words else 0)
        return tok * self.s_tok, (tok * self.ss_tok if self.words else 0)


def load_tile_kv(sm, base_off, rows, D, side, row0, lo, hi, NT=NT_CTA):
    """KVTileLoader<PlainFormat>: load_kv_tile_16bit_impl, cp.async per 16-byte chunk from the
    chunk's tile row's token address."""
    kch = D // 8
    assert (rows * kch) % NT == 0
    for it in range(rows * kch // NT):
        for tid in range(NT):
            idx = it * NT + tid
            r = idx // kch
            c = idx % kch
            dst = (base_off + offset(r, c, kch)) // 2
            if lo <= r < hi:
                off, _ = side.offsets(row0 + r)
                val = side.data.read(side.base + off + c * 8, 8).astype(np.float32)
                assert not np.isnan(val).any(), "read invalid row %d" % (row0 + r)
            else:
                val = np.zeros(8, np.float32)
            sm.m[dst : dst + 8] = np.nan
            sm.pending.append((dst, val))


# ---- quantized K/V: QuantTileLoader / QuantChunk of prefill_tile.cuh -------------------------
# A quantized cache side is (codes uint8 [max_seq, D * bits / 8], words float32 [max_seq, n]).
# The loader is synchronous: its shared stores land at once (no sm.pending), which is what the
# kernel's schedule must tolerate. Conversions mirror the CUDA bit operations.
QUANT = {
    "fp8": dict(bits=8, words=1),
    "int8": dict(bits=8, words=1),
    "int4": dict(bits=4, words=2),
    "int4ch": dict(bits=4, words=4),  # words of a token; a group's 2 * D parameters span its G tokens
}
TWO23 = np.float32(8388608.0)


def u32_as_f32(u):
    return np.array([u], np.uint32).view(np.float32)[0]


def small_uint_to_float(u):
    return np.float32(u32_as_f32(0x4B000000 | u) - TWO23)


def byte_perm(a, b, sel):  # __byte_perm(a, b, sel): result byte i = byte (sel >> 4i) & 7 of {a, b}
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def half_bits_to_f32(h):
    return np.float32(np.array([h], np.uint16).view(np.float16)[0])


def chunk_values(fmt, cw, w):
    """QuantChunk<Format>::to: 8 fp32 values of one chunk (before the rounding to T); the codes are
    decoded as DeviceKvFormat<Format>::decode_words (kv_device_format.cuh) does."""
    x = []
    if fmt == "int8":
        for k in range(8):
            biased = cw[k >> 2] ^ 0x80808080  # s -> s + 128 per byte
            v = u32_as_f32(byte_perm(biased, 0x4B000000, 0x7540 | (k & 3))) - np.float32(8388736.0)
            x.append(np.float32(v) * np.float32(w[0]))
    elif fmt == "int4":
        for k in range(8):
            c = small_uint_to_float((cw[0] >> (4 * k)) & 0xF)
            x.append(np.float32(np.float32(c * np.float32(w[0])) + np.float32(w[1])))
    else:  # fp8, the bit-trick path (sm_80): fp16 bits of value * 2^-8, 2^8 folded into the multiplier
        s = np.float32(w[0]) * np.float32(256)
        for j in range(2):
            for pair in (0, 1):
                y = byte_perm(cw[j] >> (16 * pair), 0, 0x1404)
                h = (y & 0x80008000) | ((y & 0x7F007F00) >> 1)
                x += [half_bits_to_f32(h & 0xFFFF) * s, half_bits_to_f32(h >> 16) * s]
    return [np.float32(v) for v in x]


def load_tile_quant(sm, base_off, rows, D, side, fmt, row0, lo, hi, NT=NT_CTA):
    bits, nw = QUANT[fmt]["bits"], QUANT[fmt]["words"]
    code_words = 2 if bits == 8 else 1  # QuantChunk::kCodeWords
    cpu = 4 // code_words  # kChunksPerUnit
    epu = 8 * cpu  # kElemsPerUnit
    assert D % epu == 0
    upr = D // epu  # kUnitsPerRow
    assert (rows * upr) % NT == 0
    kch = D // 8
    for it in range(rows * upr // NT):
        for tid in range(NT):
            idx = it * NT + tid
            r = idx // upr
            u = idx % upr
            raw, w = np.zeros(16, np.uint8), np.zeros(nw, np.float32)
            if lo <= r < hi:
                g = row0 + r
                off, soff = side.offsets(g)
                raw = side.data.read(side.base + off + u * 16, 16).astype(np.uint8)
                w = side.words.read(side.sbase + soff, nw).astype(np.float32)
                assert not np.isnan(w).any(), "read invalid row %d" % g
            cw = [int(v) for v in raw.view("<u4")]
            for c in range(cpu):
                vals = chunk_values(fmt, cw[c * code_words : (c + 1) * code_words], w)
                dst = (base_off + offset(r, u * cpu + c, kch)) // 2
                sm.m[dst : dst + 8] = np.array(vals, np.float32).astype(np.float16)  # rounded to T once


def load_tile_int4ch(sm, base_off, rows, D, side, row0, lo, hi, NT=NT_CTA):
    """Int4ChTileLoader::load: units of 32 codes per thread as QuantTileLoader's; a live row's
    group parameters (scale i at word i % 4 of the group's token i / 4, zero i at parameter D + i)
    read 4 at a time (the group's first token: in the row's block, at the in-block offset rounded
    down to a multiple of G -- a paged block holds whole groups)."""
    G = D // 2
    upr = D // 32
    assert (rows * upr) % NT == 0
    kch = D // 8
    for it in range(rows * upr // NT):
        for tid in range(NT):
            idx = it * NT + tid
            r, u = idx // upr, idx % upr
            for c in range(4):
                dst = (base_off + offset(r, u * 4 + c, kch)) // 2
                if not lo <= r < hi:
                    sm.m[dst : dst + 8] = 0.0
                    continue
                tok = row0 + r
                off, _ = side.offsets(tok)
                cw = int(side.data.read(side.base + off + u * 16 + 4 * c, 4).astype(np.uint8).view("<u4")[0])
                e0 = u * 32 + c * 8
                if side.view.paged:
                    blk, t = locate_paged(side.view, side.row, tok)
                    gw = side.sbase + blk * side.ss_row + (t - t % G) * side.ss_tok
                else:
                    gw = side.sbase + (tok - tok % G) * side.ss_tok

                def par4(i):
                    w = side.words.read(gw + (i >> 2) * side.ss_tok, 4)
                    assert not np.isnan(w).any(), "read unwritten parameters of token %d's group" % tok
                    return [np.float32(x) for x in w]

                sc = par4(e0) + par4(e0 + 4)
                ze = par4(D + e0) + par4(D + e0 + 4)
                vals = []
                for k in range(8):
                    code = small_uint_to_float((cw >> (4 * k)) & 0xF)
                    vals.append(np.float32(np.float32(code * np.float32(sc[k])) + np.float32(ze[k])))
                sm.m[dst : dst + 8] = np.array(vals, np.float32).astype(np.float16)  # rounded to T once


def fp8_value(b):  # e4m3fn by definition (independent of the bit trick)
    sgn = -1.0 if b & 0x80 else 1.0
    e = (b >> 3) & 0xF
    m = b & 7
    return sgn * (m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def quant_side(rng, fmt, L, max_seq, D):
    """Random codes and scale words for tokens < L (garbage codes, NaN words past L), and the
    float values they stand for (reference.py's dequantize, computed independently)."""
    bits = QUANT[fmt]["bits"]
    codes = np.full((max_seq, D * bits // 8), 0xFF, np.uint8)
    words = np.full((max_seq, QUANT[fmt]["words"]), np.nan, np.float32)
    vals = np.zeros((L, D), np.float32)
    if fmt == "int4ch":  # codes of tokens < L, the parameters of every group they touch
        G = D // 2
        assert max_seq % G == 0
        c = rng.integers(0, 16, (L, D))
        codes[:L] = (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
        for gi in range(-(-L // G)):
            sc = rng.uniform(0.1, 0.4, D).astype(np.float32)
            ze = rng.uniform(-2, -0.5, D).astype(np.float32)
            par = np.concatenate([sc, ze])
            for i in range(2 * D):  # quant.h int4_ch_param: word i % 4 of token i / 4
                words[gi * G + i // 4, i % 4] = par[i]
            t = slice(gi * G, min(L, gi * G + G))
            vals[t] = (c[t].astype(np.float32) * sc).astype(np.float32) + ze
        return (codes, words), vals
    for j in range(L):
        if fmt == "int8":
            c = rng.integers(-127, 128, D)
            s = np.float32(rng.uniform(0.005, 0.03))
            codes[j] = c.astype(np.int8).view(np.uint8)
            words[j, 0] = s
            vals[j] = c.astype(np.float32) * s
        elif fmt == "int4":
            c = rng.integers(0, 16, D)
            s = np.float32(rng.uniform(0.1, 0.4))
            z = np.float32(rng.uniform(-2, -0.5))
            codes[j] = (c[0::2] | (c[1::2] << 4)).astype(np.uint8)
            words[j] = (s, z)
            vals[j] = (c.astype(np.float32) * s).astype(np.float32) + z
        else:
            c = rng.integers(0, 256, D)
            c[(c & 0x7F) == 0x7F] = 0x7E  # no NaN codes
            s = np.float32(rng.uniform(0.002, 0.01))
            codes[j] = c.astype(np.uint8)
            words[j, 0] = s
            vals[j] = np.array([fp8_value(int(b)) for b in c], np.float32) * s
    return (codes, words), vals


def load_kv(sm, base_off, rows, D, src, fmt, row0, lo, hi):
    if fmt is None:
        load_tile_kv(sm, base_off, rows, D, src, row0, lo, hi)
    elif fmt == "int4ch":
        load_tile_int4ch(sm, base_off, rows, D, src, row0, lo, hi)
    else:
        load_tile_quant(sm, base_off, rows, D, src, fmt, row0, lo, hi)


def cta(q, K, V, n_b, L, max_seq, m_block, D, MT, BN, scale, softcap, wl, out, lse, kfmt=None, vfmt=None):
    BM = ROWS_PER_MT * MT
    kch = D // 8
    m0 = m_block * BM
    if m0 >= n_b:
        return
    m_valid = min(BM, n_b - m0)
    readable = min(L, max_seq)  # RowKeys::readable (key_range.h)
    shift = L - n_b
    pos_first = shift + m0
    pos_last = shift + m0 + m_valid - 1
    k_hi = min(pos_last, readable - 1)
    k_lo = max(0, pos_first - wl) if wl >= 0 else 0
    if k_hi < k_lo:
        out[m0 : m0 + m_valid] = 0
        lse[m0 : m0 + m_valid] = NEG
        return
    sm = Smem((BM + 2 * BN) * D * 2)
    sQ = 0
    sK = BM * D * 2
    sV = sK + BN * D * 2
    tf, tl = k_lo // BN, k_hi // BN
    load_tile(sm, sQ, BM, D, q, m0, 0, m_valid)
    load_kv(sm, sK, BN, D, K, kfmt, tf * BN, k_lo - tf * BN, k_hi + 1 - tf * BN)
    sm.land()
    warps = []
    for w in range(H["warps"]):
        qf = [[None] * (D // 16) for _ in range(MT)]
        for mt in range(MT):
            for kk in range(D // 16):
                addrs = [sQ + offset((w * MT + mt) * 16 + (l & 15), kk * 2 + (l >> 4), kch) for l in range(32)]
                qf[mt][kk] = sm.ldm(addrs)
        koff = [
            [sK + offset((l & 7) + ((l >> 4) << 3), 2 * j + ((l >> 3) & 1), kch) for l in range(32)] for j in range(4)
        ]
        voff = [
            [sV + offset((l & 7) + (((l >> 3) & 1) << 3), 2 * j + (l >> 4), kch) for l in range(32)] for j in range(4)
        ]
        o = [[[[0.0] * 4 for _ in range(32)] for _ in range(D // 8)] for _ in range(MT)]
        rm = [[[NEG] * 2 for _ in range(32)] for _ in range(MT)]
        rd = [[[0.0] * 2 for _ in range(32)] for _ in range(MT)]
        warps.append(dict(qf=qf, koff=koff, voff=voff, o=o, rm=rm, rd=rd))
    capped = softcap > 0
    sl2 = scale * math.log2(math.e)
    cap_in = scale / softcap if capped else 0
    cap_out = softcap * math.log2(math.e) if capped else 0
    pos_row_last = shift + m0 + BM - 1
    rowB = D * 2
    for t in range(tf, tl + 1):
        n0 = t * BN
        if t != tf:
            sm.land()  # K(t) landed; every warp done with P*V of tile t-1
        load_kv(sm, sV, BN, D, V, vfmt, n0, k_lo - n0, k_hi + 1 - n0)
        full = (n0 + BN - 1 <= min(pos_first, k_hi)) and (wl < 0 or n0 >= pos_row_last - wl)
        S_all = []
        for w in range(4):
            W = warps[w]
            s = [[[[0.0] * 4 for _ in range(32)] for _ in range(BN // 8)] for _ in range(MT)]
            for kk in range(D // 16):
                for np_ in range(BN // 16):
                    addrs = [W["koff"][kk & 3][l] + (kk >> 2) * 128 + np_ * 16 * rowB for l in range(32)]
                    kb = sm.ldm(addrs)
                    for mt in range(MT):
                        mma(
                            s[mt][2 * np_],
                            W["qf"][mt][kk],
                            [kb[l][0] for l in range(32)],
                            [kb[l][1] for l in range(32)],
                        )
                        mma(
                            s[mt][2 * np_ + 1],
                            W["qf"][mt][kk],
                            [kb[l][2] for l in range(32)],
                            [kb[l][3] for l in range(32)],
                        )
            for l in range(32):
                g, tg = l >> 2, l & 3
                for mt in range(MT):
                    for nt in range(BN // 8):
                        for c in range(4):
                            x = cap_out * math.tanh(s[mt][nt][l][c] * cap_in) if capped else s[mt][nt][l][c] * sl2
                            if not full:
                                pos = shift + m0 + (w * MT + mt) * 16 + g + 8 * (c >> 1)
                                key = n0 + 8 * nt + 2 * tg + (c & 1)
                                hi_r = min(pos, k_hi)
                                lo_r = pos - wl if wl >= 0 else 0
                                if key > hi_r or key < lo_r:
                                    x = NEG
                            s[mt][nt][l][c] = x
            for mt in range(MT):
                for rh in range(2):
                    # quad max
                    mx_l = [
                        max([max(s[mt][nt][l][2 * rh], s[mt][nt][l][2 * rh + 1]) for nt in range(BN // 8)])
                        for l in range(32)
                    ]
                    for l in range(32):
                        q4 = (l // 4) * 4
                        mx = max(mx_l[q4 : q4 + 4])
                        m_new = max(W["rm"][mt][l][rh], mx)
                        m_use = 0.0 if m_new == NEG else m_new
                        f = 2.0 ** (W["rm"][mt][l][rh] - m_use)
                        W["rm"][mt][l][rh] = m_new
                        sm_ = 0.0
                        for nt in range(BN // 8):
                            p0 = 2.0 ** (s[mt][nt][l][2 * rh] - m_use)
                            p1 = 2.0 ** (s[mt][nt][l][2 * rh + 1] - m_use)
                            s[mt][nt][l][2 * rh] = p0
                            s[mt][nt][l][2 * rh + 1] = p1
                            sm_ += p0 + p1
                        W["rd"][mt][l][rh] = W["rd"][mt][l][rh] * f + sm_
                        for dt in range(D // 8):
                            W["o"][mt][dt][l][2 * rh] *= f
                            W["o"][mt][dt][l][2 * rh + 1] *= f
            S_all.append(s)
        sm.land()  # V(t) landed; every warp done reading K(t)
        if t < tl:  # K(t+1) is in flight during P*V (which must read only V)
            n1 = n0 + BN
            load_kv(sm, sK, BN, D, K, kfmt, n1, k_lo - n1, k_hi + 1 - n1)
        for w in range(4):
            W = warps[w]
            s = S_all[w]
            for kk in range(BN // 16):
                pa = [
                    [
                        [
                            (r16(s[mt][2 * kk][l][0]), r16(s[mt][2 * kk][l][1])),
                            (r16(s[mt][2 * kk][l][2]), r16(s[mt][2 * kk][l][3])),
                            (r16(s[mt][2 * kk + 1][l][0]), r16(s[mt][2 * kk + 1][l][1])),
                            (r16(s[mt][2 * kk + 1][l][2]), r16(s[mt][2 * kk + 1][l][3])),
                        ]
                        for l in range(32)
                    ]
                    for mt in range(MT)
                ]
                for dp in range(D // 16):
                    addrs = [W["voff"][dp & 3][l] + (dp >> 2) * 128 + kk * 16 * rowB for l in range(32)]
                    vb = sm.ldm(addrs, trans=True)
                    for mt in range(MT):
                        mma(W["o"][mt][2 * dp], pa[mt], [vb[l][0] for l in range(32)], [vb[l][1] for l in range(32)])
                        mma(
                            W["o"][mt][2 * dp + 1], pa[mt], [vb[l][2] for l in range(32)], [vb[l][3] for l in range(32)]
                        )
    for w in range(4):
        W = warps[w]
        for mt in range(MT):
            for rh in range(2):
                for l in range(32):
                    g, tg = l >> 2, l & 3
                    q4 = (l // 4) * 4
                    d = sum(W["rd"][mt][q4 + k][rh] for k in range(4))
                    inv = 1.0 / d if d > 0 else 0.0
                    r = (w * MT + mt) * 16 + g + 8 * rh
                    if r < m_valid:
                        for dt in range(D // 8):
                            col = dt * 8 + 2 * tg
                            out[m0 + r, col] = W["o"][mt][dt][l][2 * rh] * inv
                            out[m0 + r, col + 1] = W["o"][mt][dt][l][2 * rh + 1] * inv
                        if tg == 0:
                            lse[m0 + r] = (W["rm"][mt][l][rh] + math.log2(d)) * math.log(2) if d > 0 else NEG


def reference(q, K, V, n_b, L, scale, softcap, wl):
    out = np.zeros((n_b, q.shape[1]))
    lse = np.full(n_b, NEG)
    for i in range(n_b):
        pos = L - n_b + i
        lo = max(0, pos - wl) if wl >= 0 else 0
        js = [j for j in range(lo, pos + 1) if 0 <= j < L]
        if not js:
            continue
        x = np.array([scale * float(np.dot(q[i].astype(np.float64), K[j].astype(np.float64))) for j in js])
        if softcap > 0:
            x = softcap * np.tanh(x / softcap)
        m = x.max()
        e = np.exp(x - m)
        lse[i] = m + math.log(e.sum())
        out[i] = (e / e.sum()) @ V[js].astype(np.float64)
    return out, lse


def side_values(fmt, codes, words, L, D):
    """Float values [L, D] of tokens < L of one (row, kv head) from the stored codes and words as
    the rows see them (reference.py's dequantize, as quant_side computes them)."""
    c8 = codes[:L].astype(np.uint8)
    if fmt in ("int4", "int4ch"):
        c = np.zeros((L, D), np.int64)
        c[:, 0::2], c[:, 1::2] = c8 & 0xF, c8 >> 4
    w = words[:L].astype(np.float32)
    if fmt == "int8":
        return c8.view(np.int8).astype(np.float32) * w[:, :1]
    if fmt == "fp8":
        return np.array([[fp8_value(int(b)) for b in r] for r in c8], np.float32).reshape(L, D) * w[:, :1]
    if fmt == "int4":
        return (c.astype(np.float32) * w[:, :1]).astype(np.float32) + w[:, 1:2]
    G = D // 2
    out = np.zeros((L, D), np.float32)
    for gi in range(-(-L // G)):
        par = np.array([words[gi * G + i // 4, i % 4] for i in range(2 * D)], np.float32)
        t = slice(gi * G, min(L, gi * G + G))
        out[t] = (c[t].astype(np.float32) * par[:D]).astype(np.float32) + par[D:]
    return out


ROWS, HEADS, ROW, KVH = 3, 2, 1, 1  # the cache the emulation builds; the CTA reads (ROW, KVH)


def make_cache_side(rng, fmt, lens, max_seq, D):
    """Logical arrays [ROWS, max_seq, HEADS, X] of one side: elements (plain), or codes and
    words, random for tokens < lens[row] (NaN / garbage past)."""
    if fmt is None:
        x = np.full((ROWS, max_seq, HEADS, D), np.nan, np.float32)
        for r, n in enumerate(lens):
            x[r, :n] = rng.standard_normal((n, HEADS, D)).astype(np.float16)
        return x, None
    nbytes, nw = D * QUANT[fmt]["bits"] // 8, QUANT[fmt]["words"]
    codes = np.zeros((ROWS, max_seq, HEADS, nbytes), np.uint8)
    words = np.zeros((ROWS, max_seq, HEADS, nw), np.float32)
    for r, n in enumerate(lens):
        for h in range(HEADS):
            (codes[r, :, h], words[r, :, h]), _ = quant_side(rng, fmt, n, max_seq, D)
    return codes, words


def run(D, MT, BN, n_b, L, wl, softcap, seed, kfmt=None, vfmt=None, max_seq=None, bs=0, layout="NHD", bad_ids=False):
    rng = np.random.default_rng(seed)
    max_seq = max_seq or L + 37
    if kfmt == "int4ch":  # whole groups
        max_seq = -(-max_seq // (D // 2)) * (D // 2)
    if bs:  # whole blocks (an int4ch block holds whole groups: bs % G == 0)
        assert kfmt != "int4ch" or bs % (D // 2) == 0
        max_seq = -(-max_seq // bs) * bs
    # Rows 0 and 1 share their common full blocks (paged); row 2 is shorter.
    lens = [min(L + 5, max_seq), L, max(L // 3, 1)]
    if bs:
        view = make_view(rng, ROWS, max_seq, bs, dict(enumerate(lens)), share=True, bad_ids=bad_ids)
    else:
        view = View(ROWS, max_seq)
    q = rng.standard_normal((n_b, D)).astype(np.float16).astype(np.float32)
    sides, vals = [], []
    for fmt in (kfmt, vfmt):
        data, words = make_cache_side(rng, fmt, lens, max_seq, D)
        dmem = Side(view, data, layout, fill=np.nan if fmt is None else 0xFF, dtype=np.float64)
        wmem = Side(view, words, layout) if words is not None else None
        sides.append((dmem, wmem))
        dl = dmem.logical()[ROW, :, KVH]
        if fmt is None:
            vals.append(dl[:L].astype(np.float32))
        else:  # the dequantized values rounded to T (what the tile holds by design)
            vals.append(side_values(fmt, dl, wmem.logical()[ROW, :, KVH], L, D).astype(np.float16).astype(np.float32))
    kmem = sides[0][0]
    K = TileSide(view, ROW, KVH, sides[0][0], sides[0][1], other=kmem)
    V = TileSide(view, ROW, KVH, sides[1][0], sides[1][1], other=kmem)
    Kv, Vv = vals
    assert not np.isnan(Kv).any() and not np.isnan(Vv).any()
    scale = 1 / math.sqrt(D)
    out = np.full((n_b, D), np.nan)
    lse = np.full(n_b, np.nan)
    BM = ROWS_PER_MT * MT
    for mb in range((n_b + BM - 1) // BM + 1):  # one extra block: must exit
        cta(q, K, V, n_b, L, max_seq, mb, D, MT, BN, scale, softcap, wl, out, lse, kfmt, vfmt)
    ro, rl = reference(q, Kv, Vv, n_b, L, scale, softcap, wl)
    assert not np.isnan(out).any() and not np.isnan(lse).any(), "unwritten/NaN output"
    err = np.abs(out - ro).max()
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are -inf (masked by the where)
        lerr = np.nanmax(np.abs(np.where(np.isinf(rl), 0, lse - rl)))
    assert (np.isinf(rl) == np.isinf(lse)).all(), "lse -inf mismatch"
    ok = err < 2e-2 and lerr < 1e-3
    fmts = f" K={kfmt} V={vfmt}" if kfmt or vfmt else ""
    fmts += f" paged bs={bs} {layout} lookups={view.lookups}" if bs else (" HND" if layout == "HND" else "")
    print(
        f"D={D} MT={MT} BN={BN} n_b={n_b} L={L} wl={wl} cap={softcap}{fmts}: max err {err:.2e} lse {lerr:.2e} {'OK' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


if __name__ == "__main__":
    cases = [
        (64, 2, 64, 5, 5, -1, 0, 1),
        (128, 1, 64, 70, 70, -1, 0, 2),
        (64, 2, 64, 130, 200, -1, 30.0, 3),
        (128, 1, 64, 20, 150, 17, 0, 4),
        (64, 2, 64, 40, 30, -1, 0, 5),
        (128, 1, 64, 65, 300, 100, 5.0, 6),
        (64, 2, 64, 3, 1, -1, 0, 7),
        (128, 1, 64, 1, 129, 0, 0, 8),
        (64, 1, 64, 64, 64, -1, 0, 9),
        (64, 1, 64, 50, 400, 150, 0, 10),
        # Quantized K/V (prefill.cu: D = 64 runs MT = 1 for them; D = 128 its one config).
        (64, 1, 64, 70, 150, 40, 0, 11, "int4", "int8"),
        (128, 1, 64, 30, 95, -1, 0, 12, "fp8", "int4"),
        (64, 1, 64, 20, 20, -1, 10.0, 13, "int8", "fp8"),
        # int4_ch keys: G = 32 (two groups a tile) and 64 (one), windows, a partial last group.
        (64, 1, 64, 70, 150, 40, 0, 14, "int4ch", "int4"),
        (128, 1, 64, 65, 300, 100, 5.0, 15, "int4ch", "int8"),
        (128, 1, 64, 3, 77, -1, 0, 16, "int4ch", "fp8"),
        # Paged views (a trailing dict: block size, strides, bad ids): block boundaries inside the
        # 64-key tiles (bs 16 / 32 / 48, windows that start anywhere), whole-tile blocks (64, 512),
        # NHD and HND, every loader (cp.async, quantized, int4_ch with G = 32 and 64).
        (128, 1, 64, 70, 200, -1, 0, 21, None, None, dict(bs=16)),
        (64, 2, 64, 130, 300, -1, 30.0, 22, None, None, dict(bs=48, layout="HND")),
        (64, 1, 64, 40, 250, 70, 0, 23, None, None, dict(bs=32, layout="HND")),
        (128, 1, 64, 65, 300, 100, 5.0, 24, "int8", "int4", dict(bs=16, layout="HND")),
        (64, 1, 64, 70, 150, 40, 0, 25, "fp8", "int8", dict(bs=48)),
        (64, 1, 64, 70, 200, -1, 0, 26, "int4ch", "int4", dict(bs=32, layout="HND")),
        (128, 1, 64, 65, 300, 100, 0, 27, "int4ch", "fp8", dict(bs=64)),
        (128, 1, 64, 30, 600, -1, 0, 28, "int4", "int4", dict(bs=512)),
        (128, 1, 64, 20, 130, -1, 0, 29, None, None, dict(bs=16, bad_ids=True)),
    ]
    # The cases run exactly the (D, MT, BN) configurations prefill.cu instantiates.
    assert sorted({c[:3] for c in cases}) == H["configs"], (sorted({c[:3] for c in cases}), H["configs"])
    # Arguments: case indices, or --paged (the paged cases only: the self-test of VATTN_EMU_BREAK
    # in tests/test_kernel_emulation.py).
    if sys.argv[1:] == ["--paged"]:
        sel = [c for c in cases if isinstance(c[-1], dict)]
    else:
        sel = cases if len(sys.argv) < 2 else [cases[int(a)] for a in sys.argv[1:]]

    def run_case(c):
        kw = c[-1] if isinstance(c[-1], dict) else {}
        pos = c[:-1] if kw else c
        try:
            return run(*pos, **kw)
        except (AssertionError, IndexError) as e:  # a read the kernel must never make
            print(f"{c}: FAIL ({type(e).__name__}: {e})", flush=True)
            return False

    allok = all([run_case(c) for c in sel])
    print("ALL OK" if allok else "SOME FAILED")
