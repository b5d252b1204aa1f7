# KV-cache addressing for the numpy kernel emulations (tools/emulate_decode_split.py,
# tools/emulate_prefill_fa2.py): contiguous and paged (block-table) views stored in flat memory
# with element strides, NHD or HND, and a port of the CUDA kernels' address math
# (cuda/include/vattn/cuda/kv_paged.cuh, the rule of cuda/include/vattn/kv_paging.h):
#   head_base(view, row, kvh, s_row, s_head)  kvh * s_head (+ row * s_row when contiguous)
#   head_tok(view, row, t, s_row, s_tok)      t * s_tok, or block * s_row + (t % bs) * s_tok
#   locate(view, row, t)                      (row, t), or (block, t % bs) -- one lookup a token
# The emulated kernels address the cache only through these and the flat arrays of Side, so a
# wrong block, offset, stride or head term reads other data (or NaN) and fails the comparison.
# The reference side of a check never uses them: Side.logical() maps every token through the
# block table independently (numpy indexing of the physical array in its natural shape).
#
# VATTN_EMU_BREAK (a self-test of the emulations, tests/test_kernel_emulation.py): a comma list
# of deliberate address-math mistakes, each of which the paged cases must catch:
#   offset   (t % bs) -> (t % bs) + 1 inside a block     block   block t // bs -> t // bs + 1
#   rowterm  the row term kept in a paged head base       stride  the block stride of K used for
#                                                                 every side (V, scale words)
#   noclamp  a block id outside [0, num_blocks) used as it is (not clamped to block 0)
import os

import numpy as np

BREAK = {b for b in os.environ.get("VATTN_EMU_BREAK", "").split(",") if b}
BREAKS = ("offset", "block", "rowterm", "stride", "noclamp")
assert BREAK <= set(BREAKS), f"unknown VATTN_EMU_BREAK {BREAK - set(BREAKS)}"


class View:
    """The paging of a KVCacheView: table None (contiguous), or the block table [rows, stride]
    (int64; entries past a row's blocks point at a NaN-filled poison block), bs, nb."""

    def __init__(self, rows, max_seq, table=None, bs=0, nb=0, bt_stride=0):
        self.rows, self.max_seq = rows, max_seq
        self.table, self.bs, self.nb, self.bt_stride = table, bs, nb, bt_stride
        self.lookups = 0

    @property
    def paged(self):
        return self.table is not None


def locate_paged(v, row, t):
    """kv_locate_paged: (physical block, offset in it) of token t of cache row `row`."""
    assert 0 <= t < v.max_seq, f"token {t} outside the view's {v.max_seq}"
    assert 0 <= row < v.rows, f"block-table row {row} outside {v.rows}"
    bi = t // v.bs
    if "block" in BREAK:
        bi = min(bi + 1, v.max_seq // v.bs - 1)
    flat = v.table.reshape(-1)
    idx = row * v.bt_stride + bi
    assert bi < v.max_seq // v.bs and idx < flat.size, f"block-table entry {bi} of row {row} is past the table"
    v.lookups += 1
    blk = int(flat[idx])
    if "noclamp" not in BREAK:
        blk = blk if 0 <= blk < v.nb else 0  # ids outside [0, num_blocks) address block 0
    off = t - (t // v.bs) * v.bs
    if "offset" in BREAK:
        off = (off + 1) % v.bs
    return blk, off


def locate(v, row, t):
    """kv_locate: (row, t) contiguous, (block, offset) paged; offset = loc[0] * s_row + loc[1] * s_tok."""
    return locate_paged(v, row, t) if v.paged else (row, t)


def head_base(v, row, kvh, s_row, s_head):
    """kv_head_base: element offset of (row, kv head)'s vectors from the side's storage."""
    if v.paged and "rowterm" not in BREAK:
        return kvh * s_head
    return kvh * s_head + row * s_row


def head_tok(v, row, t, s_row, s_tok):
    """kv_head_tok: offset of token t from a head base."""
    if not v.paged:
        return t * s_tok
    blk, off = locate_paged(v, row, t)
    return blk * s_row + off * s_tok


class Side:
    """One tensor of a cache side (K / V elements or codes, or scale words) in flat memory.
    logical: [rows, max_seq, heads, X] as the rows see it (NaN where never written)."""

    def __init__(self, view, logical, layout="NHD", fill=np.nan, dtype=np.float64):
        rows, max_seq, heads, X = logical.shape
        self.view, self.heads, self.X, self.layout = view, heads, X, layout
        if view.paged:
            nb, bs = view.nb, view.bs
            phys = np.full((nb, bs, heads, X), fill, dtype)
            for r in range(rows):
                for bi in range(max_seq // bs):
                    blk = int(view.table[r, bi])
                    if 0 <= blk < nb and not np.isnan(logical[r, bi * bs : (bi + 1) * bs].astype(np.float64)).all():
                        phys[blk] = logical[r, bi * bs : (bi + 1) * bs]
        else:
            phys = np.array(logical, dtype)
        self.phys = phys  # [rows or blocks, tokens, heads, X]
        n0, n1 = phys.shape[:2]
        if layout == "NHD":
            self.flat = phys.reshape(-1)
            self.s_row, self.s_tok, self.s_head = n1 * heads * X, heads * X, X
        else:  # HND: [blocks, heads, tokens, X] in memory, the same tensor as a permuted view
            self.flat = np.ascontiguousarray(phys.transpose(0, 2, 1, 3)).reshape(-1)
            self.s_row, self.s_tok, self.s_head = heads * n1 * X, X, n1 * X

    def logical(self):
        """[rows, max_seq, heads, X] through the block table (the reference's own mapping)."""
        v = self.view
        if not v.paged:
            return self.phys.copy()
        blk = np.where((v.table >= 0) & (v.table < v.nb), v.table, 0)[:, : v.max_seq // v.bs]  # [rows, bpr]
        g = self.phys[blk]  # [rows, bpr, bs, heads, X]
        return g.reshape(v.rows, v.max_seq, self.heads, self.X)

    def read(self, off, n):
        assert 0 <= off and off + n <= self.flat.size, f"read [{off}, {off + n}) outside the storage"
        return self.flat[off : off + n]


def strides_of(side, other):
    """The strides the kernel uses for a side: its own, or (VATTN_EMU_BREAK=stride) those of
    `other` for the block step."""
    s_row = other.s_row if ("stride" in BREAK and side.view.paged and other is not None) else side.s_row
    return s_row, side.s_tok, side.s_head


def make_view(rng, rows, max_seq, bs, written, share=True, bad_ids=False, spare=2):
    """A paged view of `rows` block-table rows of max_seq (a multiple of bs) tokens each, where
    row r holds written[r] tokens: each row's blocks are distinct physical blocks in random order;
    with share, consecutive rows share the full blocks their first min(full blocks) have in common
    (prefix sharing); entries past a row's blocks (and the table's padding columns) name a poison
    block (NaN, never written); bad_ids puts an out-of-range id (-> block 0, a full data block)
    into a used entry of each row. Returns the View; the caller builds Sides on it."""
    assert max_seq % bs == 0
    bpr = max_seq // bs
    used = [min(-(-written.get(r, 0) // bs), bpr) for r in range(rows)]
    full = [min(written.get(r, 0) // bs, bpr) for r in range(rows)]
    total = sum(used)
    nb = total + spare  # a poison block (NaN) and spare ones, never named by a used entry
    poison = total + int(rng.integers(0, spare))
    ids = rng.permutation(total)
    bt_stride = bpr + 3
    table = np.full((rows, bt_stride), poison, np.int64)
    k = 0
    owner = {}
    for r in range(rows):
        for bi in range(used[r]):
            table[r, bi] = ids[k]
            owner[int(ids[k])] = (r, bi)
            k += 1
    # id 0 on a full block, so a clamped id reads real data
    fulls = [int(table[r, bi]) for r in range(rows) for bi in range(full[r])]
    if fulls and 0 not in fulls:
        a = fulls[int(rng.integers(0, len(fulls)))]
        r0, b0 = owner[0]
        ra, ba = owner[a]
        table[r0, b0], table[ra, ba] = a, 0
    if share:
        for r in range(1, rows):
            common = min(full[r - 1], full[r])
            if common > 0:
                table[r, :common] = table[r - 1, :common]
    if bad_ids:  # one out-of-range id in the middle of each row's blocks (not the entry of block 0)
        for r in range(rows):
            cands = [bi for bi in range(used[r]) if table[r, bi] != 0]
            if cands:
                table[r, cands[len(cands) // 2]] = nb + 7 if r % 2 else -5
    return View(rows, max_seq, table, bs, nb, bt_stride)
