"""Random alloc / reserve / append / shrink / free sequences on vattn.KVCache against a small
Python model of the expected state; stats and stored data are checked after every step."""

import math

import pytest
import torch

pytest.importorskip("hypothesis")  # in the [test] extra; a bare GPU machine may lack it
from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

import vattn  # noqa: E402

L, H, D, B, S = 2, 2, 8, 3, 200
PAGE = 4096  # the OS page: many page boundaries in few tokens
ELEM = 4
TOKEN = L * 2 * H * D * ELEM  # 256 bytes: 16 tokens per page in token_major


class CacheMachine(RuleBasedStateMachine):
    @initialize(
        layout=st.sampled_from(["token_major", "layer_major"]),
        watermark_pages=st.sampled_from([0, 3, 1000]),
        prealloc_pages=st.sampled_from([0, 2]),
    )
    def setup(self, layout, watermark_pages, prealloc_pages):
        self.cache = vattn.KVCache(
            L,
            H,
            D,
            B,
            S,
            dtype=torch.float32,
            layout=layout,
            device="cpu",
            page_bytes=PAGE,
            reclaim_watermark_bytes=watermark_pages * PAGE,
            prealloc_bytes=prealloc_pages * PAGE,
        )
        self.layout = layout
        self.limit_pages = max(watermark_pages, prealloc_pages)
        self.exact = watermark_pages == 0 and prealloc_pages == 0
        self.data = {}  # live slot -> tensor [length, L, 2, H, D]
        self.target = {}  # live slot -> tokens the user asked to keep mapped
        self.seed = 0

    # ---------------------------------------------------------------- model helpers
    def pages_for(self, n):
        if self.layout == "token_major":
            return math.ceil(n * TOKEN / PAGE)
        return 2 * L * math.ceil(n * H * D * ELEM / PAGE)

    def write(self, slot, start, n):
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        new = torch.randn(n, L, 2, H, D, generator=g)
        for layer in range(L):
            k, v = self.cache.kv(layer)
            k[slot, start : start + n] = new[:, layer, 0]
            v[slot, start : start + n] = new[:, layer, 1]
        return new

    def live(self):
        return sorted(self.data)

    # ---------------------------------------------------------------- rules
    @precondition(lambda self: len(self.data) < B)
    @rule()
    def alloc(self):
        s = self.cache.alloc()
        assert s not in self.data
        self.data[s] = torch.empty(0, L, 2, H, D)
        self.target[s] = 0

    @precondition(lambda self: self.data)
    @rule(i=st.integers(0, B - 1), n=st.integers(0, S))
    def reserve(self, i, n):
        s = self.live()[i % len(self.data)]
        self.cache.reserve(s, n)
        self.target[s] = max(self.target[s], n)
        assert self.cache._m.mapped_tokens(s) >= n

    @precondition(lambda self: self.data)
    @rule(picks=st.lists(st.tuples(st.integers(0, B - 1), st.integers(0, 40)), min_size=1, max_size=B))
    def step(self, picks):
        live = self.live()
        chosen = {}
        for i, n in picks:
            s = live[i % len(live)]
            chosen.setdefault(s, min(n, S - len(self.data[s])))
        slots, new = list(chosen), list(chosen.values())
        step = self.cache.begin_step(slots=slots, new_tokens=new)
        for s, n, a in zip(slots, new, step.start):
            assert a == len(self.data[s])
            self.data[s] = torch.cat([self.data[s], self.write(s, a, n)])
            self.target[s] = max(self.target[s], len(self.data[s]))
        self.cache.end_step(step)

    @precondition(lambda self: self.data)
    @rule(i=st.integers(0, B - 1), frac=st.floats(0, 1))
    def shrink(self, i, frac):
        s = self.live()[i % len(self.data)]
        n = int(len(self.data[s]) * frac)
        self.cache.shrink(s, n)
        self.data[s] = self.data[s][:n]
        self.target[s] = n

    @precondition(lambda self: self.data)
    @rule(i=st.integers(0, B - 1))
    def free(self, i):
        s = self.live()[i % len(self.data)]
        self.cache.free(s)
        del self.data[s]
        del self.target[s]

    # ---------------------------------------------------------------- checks
    @invariant()
    def state_matches(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        st_ = c.stats()
        assert sorted(c.live_slots()) == self.live()
        want_len = [len(self.data.get(s, ())) for s in range(B)]
        assert c.lengths.tolist() == want_len
        assert st_["used_bytes"] == sum(want_len) * TOKEN
        need = sum(self.pages_for(t) for t in self.target.values())
        assert st_["live_mapped_bytes"] >= need * PAGE
        if self.exact:
            assert st_["live_mapped_bytes"] == need * PAGE
            assert st_["mapped_bytes"] == need * PAGE and st_["pages_pooled"] == 0
        assert st_["pages_created"] == st_["pages_mapped"] + st_["pages_pooled"]
        assert st_["resident_bytes"] == st_["physical_bytes"]
        for s, d in self.data.items():
            for layer in range(L):
                k, v = c.kv(layer)
                assert torch.equal(k[s, : len(d)], d[:, layer, 0])
                assert torch.equal(v[s, : len(d)], d[:, layer, 1])

    @invariant()
    def idle_under_watermark_after_free_or_shrink(self):
        if not hasattr(self, "cache"):
            return
        st_ = self.cache.stats()
        # idle pages only grow by free/shrink, which reclaim down to the watermark; a freed slot
        # reused by alloc turns idle pages live, so the bound always holds (up to one page group).
        group = 1 if self.layout == "token_major" else 2 * L
        assert st_["idle_bytes"] <= (self.limit_pages + group - 1) * PAGE


CacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestCacheStateMachine = CacheMachine.TestCase
