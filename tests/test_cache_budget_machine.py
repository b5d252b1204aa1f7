"""Random sequences of every state-changing KVCache call (alloc, free, reserve, shrink, steps that
commit, abort or stay open, fork, share_prefix, compact) on small host caches with a tight
physical budget (max_physical_bytes of a few pages), against a Python model of what each live
slot stores per (layer, kv head).

The promises checked (README "How the cache works", DESIGN.md "Errors"):
- a call that fails raises ValueError / TypeError / MemoryError / RuntimeError, of the kind its
  arguments call for, and leaves the cache exactly as it was: stats() (every field but event
  counters and measurements), lengths, per-head lengths, positions, live slots, shared pages and
  the stored K / V of every live slot;
- running out of the budget raises MemoryError and loses nothing already stored; a cache that
  never shared or compacted and keeps no idle pages raises it exactly when the pages its live
  slots would need exceed the budget;
- a call that succeeds does what the model says, to the bit (fp32 storage), and the cache never
  maps more than its budget.
Calls that take pages also run, some of the time, with their n-th page creation or map failing
(KVCache._inject_failure, the cache's test hook): rollback is then tried at every point of a call,
not only where the budget check refuses it up front.

VATTN_FUZZ_EXAMPLES=N (and VATTN_FUZZ_STEPS=M) run N examples of M steps instead of the defaults
(a longer bug hunt)."""

import math
import os
import random

import pytest
import torch

pytest.importorskip("hypothesis")  # in the [test] extra; a bare GPU machine may lack it
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

import vattn  # noqa: E402

L, H, D, B, S = 2, 2, 8, 4, 200
PAGE = 4096
HEAD_TOKEN = 2 * D * 4  # bytes of one token of one (layer, kv head): K and V, fp32
# Bytes of one token in one manager region: token_major has one region (all layers, K and V),
# layer_major one per (layer, K|V), head_major one per (layer, K|V, kv head).
REGION_TOKEN = {"token_major": L * 2 * H * D * 4, "layer_major": H * D * 4, "head_major": D * 4}
REGIONS = {"token_major": 1, "layer_major": 2 * L, "head_major": 2 * L * H}
# Event counters and measurements: a failed call may move them (a page created and destroyed
# again, a map undone); everything else in stats() is state and must come back exactly.
COUNTERS = frozenset(
    ("map_calls", "unmap_calls", "create_calls", "destroy_calls", "peak_mapped_bytes", "scrubbed_bytes")
    + ("resident_bytes", "pages_pending")
)
ERRORS = (MemoryError, ValueError, TypeError, RuntimeError)
# Prompt lengths around the page sizes of the three layouts (16 / 64 / 128 tokens a page), and the
# part of a slot a shrink or share_prefix keeps (uniform draws: hypothesis favours small numbers,
# which would keep slots too short to share a page).
PROMPT = st.sampled_from([1, 8, 15, 16, 17, 31, 48, 63, 64, 65, 100, 127, 128, 129])
FRACTION = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 1.0]), st.floats(0, 1))
# Calls that take pages run, some of the time, with their n-th page creation or map failing.
FAULT_AT = st.sampled_from([None] * 16 + [("create", 1), ("create", 2), ("map", 1), ("map", 2), ("map", 3)])


class Model:
    """What one live slot stores: per (layer, kv head) a [n, 2, head_dim] tensor of its (K, V)
    tokens in order, and its logical position (tokens seen, evicted ones included)."""

    def __init__(self, heads=None, position=0):
        self.heads = heads if heads is not None else [[torch.empty(0, 2, D) for _ in range(H)] for _ in range(L)]
        self.position = position

    def copy(self, n=None):
        return Model([[t[:n] if n is not None else t for t in row] for row in self.heads], self.position)

    def head_lengths(self):
        return [[len(t) for t in row] for row in self.heads]

    def length(self):
        return max(len(t) for row in self.heads for t in row)

    def compacted(self):
        """Whether the stored tokens are no longer the slot's positions (share_prefix refuses it)."""
        n = self.length()
        return self.position != n or any(len(t) != n for row in self.heads for t in row)


class BudgetMachine(RuleBasedStateMachine):
    @initialize(
        layout=st.sampled_from(["token_major", "layer_major", "head_major"]),
        budget=st.integers(0, 8),
        half_page=st.booleans(),
        watermark_pages=st.sampled_from([0, 0, 2, 1000]),
        prealloc_pages=st.sampled_from([0, 0, 2]),
    )
    def setup(self, layout, budget, half_page, watermark_pages, prealloc_pages):
        # The smallest slot that stores a token maps one page per region: budgets from one such
        # slot (head_major: 8 pages) to a few.
        base = {"token_major": 4 + budget, "layer_major": 4 + 2 * budget, "head_major": 8 + 2 * budget}[layout]
        self.cap_pages = base
        self.cap = base * PAGE + (PAGE // 2 if half_page else 0)  # a budget need not be whole pages
        self.layout = layout
        self.cache = vattn.KVCache(
            L,
            H,
            D,
            B,
            S,
            dtype=torch.float32,
            layout=layout,
            device="cpu",
            max_physical_bytes=self.cap,
            page_bytes=PAGE,
            reclaim_watermark_bytes=watermark_pages * PAGE,
            prealloc_bytes=prealloc_pages * PAGE,
        )
        # Exact memory accounting holds while no page is idle or pooled and none is shared: then the
        # live slots map exactly what their targets need, and MemoryError is predictable.
        self.exact = watermark_pages == 0 and prealloc_pages == 0
        self.slots = {}  # live slot -> Model
        self.target = {}  # live slot -> tokens mapped (reserve / begin_step / shrink), while exact
        self.open = None  # (step, {slot: per layer (k [n, H, D], v)}) of the one step left open
        self.closed = None  # a step already ended or aborted
        self.seed = 0

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()

    # ---------------------------------------------------------------- model helpers
    def region_pages(self, n):
        return REGIONS[self.layout] * math.ceil(n * REGION_TOKEN[self.layout] / PAGE)

    def need_pages(self, target):
        return sum(self.region_pages(n) for n in target.values())

    def leave_exact(self):
        self.exact = False
        self.target = {}

    def pick(self, i, order=1):
        """A slot: mostly a live one (the i-th longest, or with order=-1 the i-th shortest: small
        i are drawn most), sometimes any slot (free ones too), rarely one out of range."""
        live = sorted(self.slots, key=lambda s: (-order * self.slots[s].length(), s))
        if i < 58 and live:
            return live[i % len(live)]
        if i < 62:
            return i % B
        return B if i % 2 else -1

    def slot_errors(self, s, what=None):
        """The exceptions a call on slot s must raise ({} when s is live and free to change)."""
        if s not in self.slots:
            return {ValueError}  # out of range (IndexOutOfRange is a ValueError) or not allocated
        if what is not None and self.open is not None and s in self.open[1]:
            return {RuntimeError}  # the slot has an open step
        return set()

    def data(self, n, gen):
        return torch.randn(n, H, D, generator=gen), torch.randn(n, H, D, generator=gen)

    def snapshot(self):
        c = self.cache
        stats = {k: v for k, v in c.stats().items() if k not in COUNTERS}
        live = sorted(c.live_slots())
        heads = c.head_lengths()
        kv = {}
        for layer in range(L):
            k, v = c.kv(layer)
            for s in live:
                for h in range(H):
                    n = int(heads[s, layer, h])
                    kv[s, layer, h] = (k[s, :n, h].clone(), v[s, :n, h].clone())
        return {
            "stats": stats,
            "live": live,
            "lengths": c.lengths.tolist(),
            "heads": heads.tolist(),
            "positions": [c.position(s) for s in range(B)],
            "shared": [c.shared_pages(s) for s in range(B)],
            "kv": kv,
        }

    def assert_unchanged(self, before, what, err):
        after = self.snapshot()
        for key in ("live", "lengths", "heads", "positions", "shared"):
            assert after[key] == before[key], f"{what} raised {err!r} but changed {key}: {before[key]} -> {after[key]}"
        diff = {
            k: (before["stats"][k], after["stats"].get(k))
            for k in before["stats"]
            if before["stats"][k] != after["stats"].get(k)
        }
        assert not diff, f"{what} raised {err!r} but changed stats (before, after): {diff}"
        assert after["kv"].keys() == before["kv"].keys()
        for key, (k0, v0) in before["kv"].items():
            k1, v1 = after["kv"][key]
            assert torch.equal(k0, k1) and torch.equal(v0, v1), (
                f"{what} raised {err!r} but changed the data of (slot, layer, head) {key}"
            )

    def attempt(self, what, call, must=(), may=(), fault=None):
        """Runs call(): it must raise one of `must` when that is not empty (bad arguments), may
        raise one of `may` otherwise (MemoryError where it needs pages), and a call that raises
        must leave everything as it was. fault: (kind, n) makes the n-th page creation or map of
        the call fail (the cache's test hook, a RuntimeError), so that rollback is tried at every
        point of a call, not only where the budget runs out. Returns (succeeded, result or
        exception)."""
        before = self.snapshot()
        if fault is not None:
            self.cache._inject_failure(*fault)
        try:
            out = call()
        except ERRORS as e:
            injected = fault is not None and type(e) is RuntimeError and "injected failure" in str(e)
            allowed = tuple(must) or tuple(may)
            assert injected or (allowed and isinstance(e, allowed)), (
                f"{what} raised {e!r}; allowed: {allowed or 'nothing'}"
            )
            if fault is not None:
                self.cache._inject_failure("none", 0)
            self.assert_unchanged(before, what, e)
            return False, e
        finally:
            if fault is not None:
                self.cache._inject_failure("none", 0)
        assert not must, f"{what} succeeded; it must raise one of {tuple(must)}"
        return True, out

    # ---------------------------------------------------------------- rules
    @precondition(lambda self: len(self.slots) < B - 1)  # room left for fork / share_prefix, which fill it
    @rule()
    def alloc(self):
        ok, s = self.attempt("alloc()", self.cache.alloc)
        if ok:
            assert s not in self.slots and 0 <= s < B
            self.slots[s] = Model()
            if self.exact:
                self.target[s] = 0

    @precondition(lambda self: len(self.slots) == B)
    @rule()
    def alloc_when_full(self):
        self.attempt("alloc()", self.cache.alloc, must={RuntimeError})

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 63))
    def free(self, i):
        s = self.pick(i, order=-1 if i % 2 else 1)  # often an empty one: long slots are worth keeping
        ok, _ = self.attempt(f"free({s})", lambda: self.cache.free(s), must=self.slot_errors(s, "free"))
        if ok:
            del self.slots[s]
            self.target.pop(s, None)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 63), n=st.one_of(st.integers(0, S), st.sampled_from([-1, S + 1])), fault_at=FAULT_AT)
    def reserve(self, i, n, fault_at):
        self.do_reserve(self.pick(i), n, fault_at)

    def do_reserve(self, s, n, fault_at=None):
        must = self.slot_errors(s) | ({ValueError} if not 0 <= n <= S else set())
        may = (MemoryError,)
        if self.exact and not must:
            want = dict(self.target)
            want[s] = max(want[s], n)
            if self.need_pages(want) > self.cap_pages:
                must = {MemoryError}
            may = ()  # fits the budget: must succeed
        ok, _ = self.attempt(f"reserve({s}, {n})", lambda: self.cache.reserve(s, n), must=must, may=may, fault=fault_at)
        if ok and self.exact:
            self.target[s] = max(self.target[s], n)

    @precondition(lambda self: self.slots)
    @rule(
        picks=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 40)), min_size=1, max_size=B),
        fault=st.sampled_from([None] * 6 + ["dup", "long", "negative", "empty"]),
        finish=st.sampled_from(["end", "end", "abort", "open"]),
        fault_at=FAULT_AT,
    )
    def step(self, picks, fault, finish, fault_at):
        chosen = {}
        for i, n in picks:
            chosen.setdefault(self.pick(i), n)
        slots, new = list(chosen), list(chosen.values())
        must = set()
        for s, n in zip(slots, new):
            must |= self.slot_errors(s, "step")
            if s in self.slots and self.slots[s].length() + n > S:
                must.add(ValueError)
        if fault == "dup":
            slots, new = slots + slots[:1], new + new[:1]
            must.add(ValueError)
        elif fault == "long" and slots[0] in self.slots:
            new[0] = S - self.slots[slots[0]].length() + 1
            must.add(ValueError)
        elif fault == "negative":
            new[0] = -1
            must.add(ValueError)
        elif fault == "empty":
            slots, new, must = [], [], {ValueError}
        self.run_step(slots, new, must, finish, fault_at)

    @precondition(lambda self: self.slots)
    @rule(finish=st.sampled_from(["end", "end", "abort", "open"]), fault_at=FAULT_AT)
    def decode(self, finish, fault_at):
        """One token for every live slot without an open step (the usual decode step)."""
        slots = [s for s in sorted(self.slots) if self.open is None or s not in self.open[1]]
        if slots:
            self.run_step(
                slots,
                [1] * len(slots),
                {ValueError} if any(self.slots[s].length() >= S for s in slots) else set(),
                finish,
                fault_at,
            )

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 63), n=PROMPT, finish=st.sampled_from(["end", "end", "abort"]), fault_at=FAULT_AT)
    def prefill(self, i, n, finish, fault_at):
        """A prompt (or a chunk of one) for one slot."""
        s = self.pick(i)
        must = self.slot_errors(s, "step")
        if s in self.slots:
            n = min(n, S - self.slots[s].length())
        self.run_step([s], [n], must, finish, fault_at)

    def run_step(self, slots, new, must, finish, fault_at):
        may = (MemoryError,)
        if self.exact and not must:
            want = dict(self.target)
            for s, n in zip(slots, new):
                want[s] = max(want[s], self.slots[s].length() + n)
            if self.need_pages(want) > self.cap_pages:
                must = {MemoryError}
            may = ()
        what = f"begin_step({slots}, {new})"
        ok, step = self.attempt(
            what, lambda: self.cache.begin_step(slots=slots, new_tokens=new), must=must, may=may, fault=fault_at
        )
        if not ok:
            return
        if self.exact:
            for s, n in zip(slots, new):
                self.target[s] = max(self.target[s], self.slots[s].length() + n)
        assert step.start == [self.slots[s].length() for s in slots], what
        self.seed += 1
        gen = torch.Generator().manual_seed(self.seed)
        total = sum(new)
        written = {s: [] for s in slots}
        for layer in range(L):
            k, v = self.data(total, gen)
            vattn.append_kv(self.cache, layer, step, k, v)
            off = 0
            for s, n in zip(slots, new):
                written[s].append((k[off : off + n], v[off : off + n]))
                off += n
        if finish == "open" and self.open is None:
            self.open = (step, written)
        else:
            self.close_step(step, written, finish != "abort")

    def close_step(self, step, written, commit):
        if commit:
            self.cache.end_step(step)
            for s, per_layer in written.items():
                m = self.slots[s]
                for layer, (k, v) in enumerate(per_layer):
                    for h in range(H):
                        m.heads[layer][h] = torch.cat([m.heads[layer][h], torch.stack([k[:, h], v[:, h]], 1)])
                m.position += len(per_layer[0][0])
        else:
            self.cache.abort_step(step)
        self.closed = step

    @precondition(lambda self: self.open is not None)
    @rule(commit=st.booleans())
    def finish_open_step(self, commit):
        step, written = self.open
        self.open = None
        self.close_step(step, written, commit)

    @precondition(lambda self: self.closed is not None)
    @rule(commit=st.booleans())
    def finish_closed_step(self, commit):
        step = self.closed
        call = self.cache.end_step if commit else self.cache.abort_step
        self.attempt(f"{'end' if commit else 'abort'}_step(closed step)", lambda: call(step), must={ValueError})

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 63), frac=FRACTION, fault=st.sampled_from([None] * 8 + [-1, 1]))
    def shrink(self, i, frac, fault):
        s = self.pick(i)
        length = self.slots[s].length() if s in self.slots else 0
        n = int(length * frac) if fault is None else (length + 1 if fault == 1 else -1)
        must = self.slot_errors(s, "shrink") | ({ValueError} if fault is not None else set())
        ok, _ = self.attempt(f"shrink({s}, {n})", lambda: self.cache.shrink(s, n), must=must)
        if ok:
            m = self.slots[s]
            m.heads = [[t[:n] for t in row] for row in m.heads]
            m.position -= length - n
            if self.exact:
                self.target[s] = n

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 63), fault_at=FAULT_AT)
    def fork(self, i, fault_at):
        s = self.pick(i)
        must = self.slot_errors(s, "fork") or ({RuntimeError} if len(self.slots) == B else set())
        ok, t = self.attempt(f"fork({s})", lambda: self.cache.fork(s), must=must, may=(MemoryError,), fault=fault_at)
        if ok:
            assert t not in self.slots and 0 <= t < B
            self.slots[t] = self.slots[s].copy()
            self.leave_exact()

    @precondition(lambda self: self.slots)
    @rule(
        i=st.integers(0, 63),
        j=st.integers(0, 63),
        frac=FRACTION,
        fresh=st.booleans(),
        reserved=st.sampled_from([0, 0, 10, 40, 64]),
        fault=st.sampled_from([False] * 5 + [True]),
        fault_at=FAULT_AT,
    )
    def share_prefix(self, i, j, frac, fresh, reserved, fault, fault_at):
        src = self.pick(i)
        if fresh and len(self.slots) < B:  # into a new slot, the usual case (with pages reserved, maybe)
            ok, dst = self.attempt("alloc()", self.cache.alloc)
            assert ok
            self.slots[dst] = Model()
            if self.exact:
                self.target[dst] = 0
            if reserved:
                self.do_reserve(dst, reserved)
        else:
            dst = self.pick(j, order=-1)
        length = self.slots[src].length() if src in self.slots else 0
        n = length + 1 if fault else int(length * frac)
        must = self.slot_errors(src, "share") | self.slot_errors(dst, "share")
        if src == dst or (dst in self.slots and self.slots[dst].length() != 0) or fault:
            must.add(ValueError)
        if src in self.slots and self.slots[src].compacted():
            must.add(ValueError)
        ok, _ = self.attempt(
            f"share_prefix({src}, {dst}, {n})",
            lambda: self.cache.share_prefix(src, dst, n),
            must=must,
            may=(MemoryError,),
            fault=fault_at,
        )
        if ok:
            self.slots[dst] = self.slots[src].copy(n)
            self.slots[dst].position = n
            self.leave_exact()

    @precondition(lambda self: self.slots)
    @rule(
        picks=st.lists(st.integers(0, 63), min_size=0, max_size=3),
        mode=st.sampled_from(["same", "per_head", "per_head", "prefix", "all"]),
        fault=st.sampled_from([None] * 6 + ["order", "index", "len", "dtype", "dup"]),
        pad=st.integers(0, 2),
        seed=st.integers(0, 2**31 - 1),
        fault_at=FAULT_AT,
    )
    def compact(self, picks, mode, fault, pad, seed, fault_at):
        rng = random.Random(seed)
        slots = list(dict.fromkeys(self.pick(i) for i in picks))
        must = set()
        for s in slots:
            must |= self.slot_errors(s, "compact")
        keeps = []  # per slot, per (layer, head) the kept indices
        for s in slots:
            heads = self.slots[s].head_lengths() if s in self.slots else [[0] * H for _ in range(L)]
            shortest = min(min(row) for row in heads)
            same = sorted(rng.sample(range(shortest), rng.randint(0, shortest)))
            per = []
            for layer in range(L):
                row = []
                for h in range(H):
                    n = heads[layer][h]
                    if mode == "same":
                        idx = same
                    elif mode == "prefix":
                        idx = list(range(rng.randint(0, n)))
                    elif mode == "all":
                        idx = list(range(n))
                    else:
                        idx = sorted(rng.sample(range(n), rng.randint(0, n)))
                    row.append(idx)
                per.append(row)
            keeps.append(per)
        kmax = max([len(idx) for per in keeps for row in per for idx in row] + [0]) + pad
        keep = torch.randint(-5, S + 5, (len(slots), L, H, kmax), generator=torch.Generator().manual_seed(seed))
        lens = torch.zeros(len(slots), L, H, dtype=torch.int64)
        for a, per in enumerate(keeps):
            for layer in range(L):
                for h in range(H):
                    idx = per[layer][h]
                    keep[a, layer, h, : len(idx)] = torch.tensor(idx, dtype=torch.int64)
                    lens[a, layer, h] = len(idx)
        longest = [
            (a, layer, h)
            for a, per in enumerate(keeps)
            for layer in range(L)
            for h in range(H)
            if len(per[layer][h]) >= 2
        ]
        if fault == "order" and longest:
            a, layer, h = longest[0]
            keep[a, layer, h, 1] = keep[a, layer, h, 0]
            must.add(ValueError)
        elif fault == "index" and slots:
            a = 0
            lens[a, 0, 0] = min(int(lens[a, 0, 0]) + 1, kmax) if kmax else 0
            if kmax:
                keep[a, 0, 0, int(lens[a, 0, 0]) - 1] = S + 1  # past the tokens the head stores
                must.add(ValueError)
        elif fault == "len" and slots:
            lens[0, L - 1, H - 1] = kmax + 1
            must.add(ValueError)
        elif fault == "dtype" and slots:
            keep = keep.float()
            must.add(TypeError)
        elif fault == "dup" and slots:
            slots = slots + slots[:1]
            keep, lens = torch.cat([keep, keep[:1]]), torch.cat([lens, lens[:1]])
            must.add(ValueError)
        # Copy-on-write copies of shared pages take pages; nothing else in compact does.
        may = (MemoryError,) if any(s in self.slots and self.cache.shared_pages(s) for s in slots) else ()
        ok, _ = self.attempt(
            f"compact({slots}, mode={mode})",
            lambda: self.cache.compact(slots, keep, lens),
            must=must,
            may=may,
            fault=fault_at,
        )
        if ok:
            for s, per in zip(slots, keeps):
                m = self.slots[s]
                m.heads = [[m.heads[layer][h][per[layer][h]] for h in range(H)] for layer in range(L)]
            if slots:
                self.leave_exact()

    # ---------------------------------------------------------------- checks
    @invariant()
    def matches_model(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        st_ = c.stats()
        assert sorted(c.live_slots()) == sorted(self.slots)
        assert st_["live_slots"] == len(self.slots)
        want_len = [self.slots[s].length() if s in self.slots else 0 for s in range(B)]
        assert c.lengths.tolist() == want_len
        assert [c.length(s) for s in range(B)] == want_len
        heads = c.head_lengths()
        for s in range(B):
            want = self.slots[s].head_lengths() if s in self.slots else [[0] * H for _ in range(L)]
            assert heads[s].tolist() == want, f"slot {s}: head lengths {heads[s].tolist()} != {want}"
            assert c.position(s) == (self.slots[s].position if s in self.slots else 0), f"slot {s}: position"
            if s not in self.slots:
                assert c.shared_pages(s) == 0, f"free slot {s} maps shared pages"
        stored = sum(len(t) for m in self.slots.values() for row in m.heads for t in row)
        assert st_["used_bytes"] == stored * HEAD_TOKEN
        # The budget: never more mapped, nor more created (mapped + pooled), than max_physical_bytes.
        assert st_["mapped_bytes"] <= self.cap, f"mapped {st_['mapped_bytes']} > budget {self.cap}"
        assert st_["physical_bytes"] <= self.cap, f"physical {st_['physical_bytes']} > budget {self.cap}"
        assert st_["mapped_bytes"] == st_["pages_mapped"] * PAGE
        assert st_["pages_created"] == st_["pages_mapped"] + st_["pages_pooled"]
        assert st_["physical_bytes"] == st_["pages_created"] * PAGE
        if self.exact:
            need = self.need_pages(self.target)
            assert st_["live_mapped_bytes"] == st_["mapped_bytes"] == need * PAGE
            assert st_["pages_shared"] == 0 and st_["idle_bytes"] == 0
        for layer in range(L):
            k, v = c.kv(layer)
            for s, m in self.slots.items():
                for h in range(H):
                    t = m.heads[layer][h]
                    n = len(t)
                    assert torch.equal(k[s, :n, h], t[:, 0]), f"K of slot {s}, layer {layer}, head {h} differs"
                    assert torch.equal(v[s, :n, h], t[:, 1]), f"V of slot {s}, layer {layer}, head {h} differs"


_examples = int(os.environ.get("VATTN_FUZZ_EXAMPLES", "0") or 0)
BudgetMachine.TestCase.settings = settings(
    max_examples=_examples or 250,
    stateful_step_count=int(os.environ.get("VATTN_FUZZ_STEPS", "0") or 0) or 40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheBudgetMachine = BudgetMachine.TestCase
