"""KVCache.begin_step's index buffer (cache._pack_step): both ways of building it (Python lists for
small steps, numpy for large ones) give the same, correct int32 tensors; Step fields follow."""

import random

import pytest
import torch

import vattn
from vattn import cache as cache_mod


def _expected(slots, new, start):
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    token_slots = [s for s, n in zip(slots, new) for _ in range(n)]
    positions = [a + i for a, n in zip(start, new) for i in range(n)]
    return slots + [a + n for a, n in zip(start, new)] + cu + token_slots + positions


@pytest.mark.parametrize("seed", range(6))
def test_pack_step_paths_agree(seed, monkeypatch):
    rng = random.Random(seed)
    for _ in range(40):
        b = rng.randint(1, 40)
        slots = rng.sample(range(1000), b)
        if rng.random() < 0.4:
            new = [1] * b  # decode
        else:
            new = [rng.choice([0, 1, 2, rng.randint(0, 30)]) for _ in range(b)]
        start = [rng.randint(0, 5000) for _ in range(b)]
        ends = [a + n for a, n in zip(start, new)]
        total = sum(new)
        want = torch.tensor(_expected(slots, new, start), dtype=torch.int32)
        monkeypatch.setattr(cache_mod, "_PACK_LIST_MAX_TOKENS", 10**9)
        small = cache_mod._pack_step(slots, new, start, ends, total)
        monkeypatch.setattr(cache_mod, "_PACK_LIST_MAX_TOKENS", -1)
        large = cache_mod._pack_step(slots, new, start, ends, total)
        assert small.dtype == large.dtype == torch.int32
        assert torch.equal(small, want) and torch.equal(large, want)


@pytest.mark.parametrize("new", [[1, 1, 1], [5, 0, 2], [200, 1, 3], [0, 0, 0]])
def test_step_fields(new):
    c = vattn.KVCache(
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        max_batch=4,
        max_seq_len=512,
        dtype=torch.float32,
        device="cpu",
        page_bytes=4096,
    )
    slots = [c.alloc() for _ in range(4)][::-1][:3]
    st = c.begin_step(slots=slots, new_tokens=[3, 1, 4])
    c.end_step(st)
    st = c.begin_step(slots=slots, new_tokens=new)
    start = [3, 1, 4]
    assert st.start == start and st.slots == slots and st.new_tokens == new
    assert st.total_new == sum(new) and st.is_decode == all(n == 1 for n in new)
    assert st.max_seqlen_q == max(new) and st.max_seqlen_k == max(a + n for a, n in zip(start, new))
    flat = torch.cat([st.slot_ids, st.seqlens, st.cu_seqlens_q, st.token_slots, st.positions]).tolist()
    assert flat == _expected(slots, new, start)
    c.end_step(st)
    assert [c.length(s) for s in slots] == [a + n for a, n in zip(start, new)]
    assert c.lengths.tolist() == [c.length(s) for s in range(4)]
