# Development check of the CUDA split-KV decode path without a GPU: run with python.
# A line-by-line numpy port of make_plan (cuda/kernels/decode.cu), decode_split_kernel
# (cuda/include/vattn/cuda/decode_split_kernel.cuh) and decode_split_merge_kernel, run per CTA
# and compared with a float64 reference. Keep it in step when the kernels change.
# What it checks beyond the math: the split ranges cover [lo, L) exactly once whatever the host
# length hint; no K/V slot outside [lo, L) of the row is read (the cache holds NaN there);
# padded GQA heads never write; the cp.async pipeline: a stage being refilled reads as NaN
# from the copy's issue until a wait_group lands it, so a read of a stage in flight (a missing
# wait or __syncthreads, a wrong stage index) poisons the output.
import math, pathlib, sys
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from emulate_headers import decode_split  # noqa: E402  (the constants, read from the sources)

H = decode_split()

NEG = -np.inf
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MIN_SPLIT_KEYS, CTAS_PER_SM, MAX_SPLITS = H['min_split_keys'], H['ctas_per_sm'], H['max_splits']


def next_pow2(x):
    return 1 if x <= 1 else 2 * next_pow2((x + 1) // 2)


def cfg(HD, EPC=H['elems_per_chunk']):
    CH = HD // EPC
    TD = next_pow2(CH)
    KPW = 32 // TD
    KPI = H['warps'] * KPW
    NK = H['iters_per_tile']
    return dict(EPC=EPC, CH=CH, TD=TD, KPW=KPW, KPI=KPI, NK=NK, TILE=KPI * NK, STAGES=H['stages'])


def cdiv(a, b):
    return (a + b - 1) // b


def make_plan(batch, hq, hkv, HD, max_seqlen_k, max_seq, window, sms):
    group = hq // hkv
    gb = 1 if group <= 1 else 2 if group <= 2 else 4 if group <= 4 else 8
    chunks = cdiv(group, gb)
    tile = cfg(HD)['TILE']
    n = max_seqlen_k if max_seqlen_k > 0 else max_seq
    n = min(n, max_seq)
    if window >= 0 and n > window + 1:
        n = window + 1
    n = max(n, 1)
    base = batch * hkv * chunks
    splits = cdiv(CTAS_PER_SM * sms, base)
    splits = min(splits, cdiv(n, max(MIN_SPLIT_KEYS, tile)), MAX_SPLITS)
    splits = max(splits, 1)
    chunk = cdiv(cdiv(n, splits), tile) * tile
    splits = cdiv(n, chunk)
    return gb, chunks, splits, chunk


def key_range(a, b, kvh):
    r = a['row_ids'][b] if a['row_ids'] is not None else b
    L = a['head_lens'][b][kvh] if a['head_lens'] is not None else a['seqlens'][b]
    if r < 0 or r >= a['num_rows']:
        r, L = 0, 0
    L = max(0, min(L, a['max_seq']))
    first = L - 1 - a['window'] if a['window'] >= 0 else 0
    return r, max(first, 0), L


class Pipe:
    """cp.async groups: a copy poisons its destination at issue and lands at a wait."""
    def __init__(s, shape):
        s.m = np.full(shape, np.nan)
        s.groups, s.cur = [], []

    def copy(s, idx, val):
        s.m[idx] = np.nan
        s.cur.append((idx, val))

    def commit(s):
        s.groups.append(s.cur)
        s.cur = []

    def wait(s, n):
        while len(s.groups) > n:
            for idx, val in s.groups.pop(0):
                s.m[idx] = val


def cta(a, K, V, q, split, b, z, ns, GB, o_part, lse_part, out, lse):
    c = cfg(a['HD'])
    HD, EPC, CH, TD, KPI, NK, TILE, ST = a['HD'], c['EPC'], c['CH'], c['TD'], c['KPI'], c['NK'], c['TILE'], c['STAGES']
    kvh = z // a['head_chunks']
    g0 = (z % a['head_chunks']) * GB
    gcount = min(GB, a['group'] - g0)
    qh0 = kvh * a['group'] + g0
    row, lo, L = key_range(a, b, kvh)
    n = L - lo
    need = cdiv(cdiv(n, ns), TILE) * TILE
    chunk = max(a['chunk_host'], need)
    start64 = lo + split * chunk
    start = min(start64, L)
    end = min(start64 + chunk, L)
    ntiles = cdiv(end - start, TILE)
    a['covered'][b, kvh, start:end] += 1 if g0 == 0 else 0

    qv = np.zeros((GB, HD))
    for g in range(GB):
        if g < gcount:
            qv[g] = q[b, qh0 + g].astype(np.float64) * a['q_scale']
    pipe = Pipe((ST, 2, TILE, HD))

    def load_tile(t, st):
        tstart = start + t * TILE
        for r in range(TILE):
            j = tstart + r
            valid = j < end
            if valid:
                assert lo <= j < L, f"read key {j} outside [{lo}, {L})"
                kr, vr = K[row, j, kvh], V[row, j, kvh]
                assert not np.isnan(kr).any() and not np.isnan(vr).any(), f"read unwritten slot {j}"
            else:
                kr = vr = np.zeros(HD)
            pipe.copy((st, 0, r), kr)
            pipe.copy((st, 1, r), vr)

    m = np.full((KPI, GB), NEG)
    d = np.zeros((KPI, GB))
    o = np.zeros((KPI, GB, HD))
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
        for grp in range(KPI):
            s_ = np.zeros((NK, GB))
            for kk in range(NK):
                r = kk * KPI + grp
                j = tstart + r
                dot = qv @ pipe.m[stg, 0, r]
                valid = j < end
                x = dot * (1.0 if valid else 0.0)
                if a['cap2'] > 0:
                    x = a['cap2'] * np.tanh(x)
                s_[kk] = x if valid else NEG
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
            for kk in range(NK):
                r = kk * KPI + grp
                j = tstart + r
                vsc = 1.0 if j < end else 0.0
                vf = pipe.m[stg, 1, r]
                for g in range(GB):
                    o[grp, g] = o[grp, g] + (p[kk, g] * vsc) * vf
    pipe.wait(0)
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


def reference(q, K, V, a):
    B, HQ, HD = q.shape
    out = np.zeros((B, HQ, HD))
    lse = np.full((B, HQ), NEG)
    for b in range(B):
        for h in range(HQ):
            kvh = h // a['group']
            row, lo, L = key_range(a, b, kvh)
            if L - lo <= 0:
                continue
            x = a['scale'] * (K[row, lo:L, kvh].astype(np.float64) @ q[b, h].astype(np.float64))
            if a['softcap'] > 0:
                x = a['softcap'] * np.tanh(x / a['softcap'])
            mx = x.max()
            e = np.exp(x - mx)
            lse[b, h] = mx + math.log(e.sum())
            out[b, h] = (e / e.sum()) @ V[row, lo:L, kvh].astype(np.float64)
    return out, lse


def run(HD, B, HQ, HKV, lens, max_seq, window=-1, softcap=0.0, hint=-1, sms=132, row_ids=None, head_lens=None,
        seed=0, name=""):
    rng = np.random.default_rng(seed)
    rows = max(B, 3)
    K = np.full((rows, max_seq, HKV, HD), np.nan)
    V = np.full((rows, max_seq, HKV, HD), np.nan)
    rl = [lens[b] if head_lens is None else max(head_lens[b]) for b in range(B)]
    rid = list(range(B)) if row_ids is None else row_ids
    for b in range(B):
        r = rid[b]
        if 0 <= r < rows:
            n = min(max(rl[b], 0), max_seq)
            K[r, :n] = rng.standard_normal((n, HKV, HD)).astype(np.float16)
            V[r, :n] = rng.standard_normal((n, HKV, HD)).astype(np.float16)
    q = rng.standard_normal((B, HQ, HD)).astype(np.float16)
    scale = 1 / math.sqrt(HD)
    group = HQ // HKV
    maxk = hint if hint >= 0 else max([0] + [x for x in (lens if head_lens is None else sum(head_lens, []))])
    GB, chunks, ns, chunk_host = make_plan(B, HQ, HKV, HD, maxk, max_seq, window, sms)
    a = dict(HD=HD, group=group, head_chunks=chunks, chunk_host=chunk_host, num_rows=rows, max_seq=max_seq,
             row_ids=row_ids, seqlens=lens, head_lens=head_lens, window=window, scale=scale, softcap=softcap,
             q_scale=scale / softcap if softcap > 0 else scale * LOG2E, cap2=softcap * LOG2E if softcap > 0 else 0.0,
             covered=np.zeros((B, HKV, max_seq), np.int64))
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
    ro, rlse = reference(q, K, V, a)
    ok = True
    for b in range(B):
        for kvh in range(HKV):
            row, lo, L = key_range(a, b, kvh)
            want = np.zeros(max_seq, np.int64)
            want[lo:L] = 1
            if not (a['covered'][b, kvh] == want).all():
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
    print(f"{name}: HD={HD} B={B} HQ={HQ} HKV={HKV} GB={GB} chunks={chunks} splits={ns} chunk={chunk_host} "
          f"err {err:.1e} lse {lerr:.1e} {'OK' if ok else 'FAIL'}", flush=True)
    return ok


CASES = [
    dict(name="one split", HD=128, B=2, HQ=4, HKV=4, lens=[37, 5], max_seq=64, sms=1),
    dict(name="splits, hint exact", HD=128, B=1, HQ=8, HKV=2, lens=[700], max_seq=800, sms=2),
    dict(name="hint below real length", HD=64, B=2, HQ=2, HKV=1, lens=[900, 300], max_seq=1000, hint=260, sms=8),
    dict(name="GQA 3 -> 4 (padded head)", HD=96, B=1, HQ=6, HKV=2, lens=[300], max_seq=320, sms=4),
    dict(name="GQA 12 -> 2 chunks of 8", HD=64, B=1, HQ=12, HKV=1, lens=[77], max_seq=96, sms=1),
    dict(name="window + softcap", HD=128, B=2, HQ=4, HKV=2, lens=[600, 40], max_seq=640, window=300, softcap=20.0, sms=4),
    dict(name="window 0", HD=256, B=1, HQ=2, HKV=1, lens=[50], max_seq=64, window=0, sms=1),
    dict(name="per-head lengths", HD=64, B=2, HQ=4, HKV=2, lens=[0, 0], head_lens=[[530, 0], [3, 260]], max_seq=600, sms=8),
    dict(name="empty rows, bad slot, L>capacity", HD=128, B=3, HQ=2, HKV=1, lens=[0, 90, 200], max_seq=100,
         row_ids=[0, 7, 2], sms=16),
    dict(name="HD 256, GQA 8, splits", HD=256, B=1, HQ=8, HKV=1, lens=[520], max_seq=530, sms=2),
    dict(name="HD 96, GQA 5 -> 8", HD=96, B=2, HQ=10, HKV=2, lens=[257, 31], max_seq=300, window=200, softcap=30.0, sms=4),
]

if __name__ == "__main__":
    sel = CASES if len(sys.argv) < 2 else [CASES[int(i)] for i in sys.argv[1:]]
    allok = all([run(seed=i, **c) for i, c in enumerate(sel)])
    print("ALL OK" if allok else "SOME FAILED")
