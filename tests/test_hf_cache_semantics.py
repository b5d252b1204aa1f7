"""VAttnCache as transformers code treats a Cache: copy.copy / copy.deepcopy, cache.update called
outside vattn's attention, and layers[i].keys / values (issue 13, the parts that need no page sharing).
Tiny random Llama (no download); SmolLM2 where it is installed."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

pytest.importorskip("transformers")

import vattn.hf as vhf  # noqa: E402
from vattn._models import tiny_llama  # noqa: E402

from hf_helpers import _one_thread, generate  # noqa: E402,F401

PROMPTS = ["Hi", "A longer prompt, so that the other rows are left padded.", "Virtual memory."]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def _cache(model, batch, layout="token_major", **kw):
    kw.setdefault("max_seq_len", 256)
    return vhf.VAttnCache.for_model(model, max_batch=batch, layout=layout, **kw)


def _continue(model, enc, seq, cache, n):
    """Greedy generation of n more tokens after `seq` (which extends enc's prompt) on `cache`."""
    prompt_mask = enc["attention_mask"]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(seq.shape[0], seq.shape[1] - prompt_mask.shape[1])], 1)
    return generate(model, {"input_ids": seq, "attention_mask": mask}, n, cache, logits=False).sequences


# ---------------------------------------------------------------------------- copy.copy


def test_shallow_copy_shares_and_does_not_release(tiny):
    model, tok = tiny
    enc = tok(PROMPTS)
    ref = generate(model, enc, 12, logits=False).sequences
    cache = _cache(model, 3, page_bytes=4096)
    first = generate(model, enc, 6, cache, logits=False).sequences
    assert torch.equal(first, ref[:, : first.shape[1]])
    other = copy.copy(cache)
    assert other.kv is cache.kv and other.get_seq_length() == cache.get_seq_length()
    kv_ref = weakref.ref(cache.kv)
    del other
    gc.collect()
    assert not cache.kv.closed and cache.stats()["mapped_bytes"] > 0
    out = _continue(model, enc, first, cache, 6)
    assert torch.equal(out, ref)
    # a copy outliving the original keeps it usable (and its layers still reach the cache)
    other = copy.copy(cache)
    del cache
    gc.collect()
    assert kv_ref() is not None and not other.kv.closed
    assert other.layers[0].get_seq_length() == other.get_seq_length() == ref.shape[1] - 1
    del other
    gc.collect()
    assert kv_ref() is None, "dropping the last handle must release the vattn.KVCache"


def test_shallow_copy_release_releases_for_all(tiny):
    model, tok = tiny
    enc = tok(PROMPTS[:1])
    cache = _cache(model, 1)
    generate(model, enc, 2, cache, logits=False)
    other = copy.copy(cache)
    other.release()
    with pytest.raises(RuntimeError, match="released"):
        generate(model, enc, 2, cache, logits=False)
