"""The short path of vattn.append_kv / vattn.attention for decode steps of a KVCache (vattn/_fast.py):
the same results and the same errors as the general path, no shared outputs, and it is really taken."""

import contextlib
from unittest import mock

import pytest
import torch

import vattn
from vattn import _fast, ops
from helpers import device_impls

LAYERS, HKV, DIM = 3, 2, 64


def _cache(device, kv_format="auto", layout="token_major", dtype=torch.float32):
    if device == "cuda":
        dtype = torch.float16
    return vattn.KVCache(LAYERS, HKV, DIM, max_batch=4, max_seq_len=256, dtype=dtype, kv_format=kv_format,
                         layout=layout, device=device, page_bytes=4096 if device == "cpu" else None)  # fmt: skip


def _fill(cache, lens, gen, compact=False):
    """Live slots holding `lens` tokens; with compact, every (layer, head) keeps a different subset."""
    slots = [cache.alloc() for _ in lens]
    step = cache.begin_step(slots, lens)
    for layer in range(LAYERS):
        k = torch.randn(sum(lens), HKV, DIM, generator=gen).to(cache.device, cache.dtype)
        v = torch.randn(sum(lens), HKV, DIM, generator=gen).to(cache.device, cache.dtype)
        vattn.append_kv(cache, layer, step, k, v)
    cache.end_step(step)
    if compact:
        n = max(lens)
        keep = torch.zeros(len(lens), LAYERS, HKV, n, dtype=torch.int64)
        keep_lens = torch.zeros(len(lens), LAYERS, HKV, dtype=torch.int64)
        for i, length in enumerate(lens):
            for layer in range(LAYERS):
                for h in range(HKV):
                    m = max(1, length - 1 - 3 * layer - h)  # a different count per (layer, head)
                    idx = torch.randperm(length, generator=gen)[:m].sort().values
                    keep[i, layer, h, :m] = idx
                    keep_lens[i, layer, h] = m
        cache.compact(slots, keep, keep_lens)
    return slots


def _decode_both(cache, slots, gen, group=3, **kw):
    """One decode step run twice from the same cache state, general path then short path: the
    outputs of every layer and the cache contents after the step."""
    results = []
    q = [torch.randn(len(slots), HKV * group, DIM, generator=gen).to(cache.device, cache.dtype) for _ in range(LAYERS)]
    k = [torch.randn(len(slots), HKV, DIM, generator=gen).to(cache.device, cache.dtype) for _ in range(LAYERS)]
    for enabled in (False, True):
        _fast.enabled = enabled
        # the short path must not reach the general launchers (so this compares two paths)
        guard = (mock.patch.object(ops, "run_decode", _general), mock.patch.object(ops, "run_append", _general))
        try:
            with guard[0] if enabled else contextlib.nullcontext(), guard[1] if enabled else contextlib.nullcontext():
                step = cache.begin_step(slots, [1] * len(slots))
                outs = []
                for layer in range(LAYERS):
                    vattn.append_kv(cache, layer, step, k[layer], -k[layer])
                    outs.append(vattn.attention(q[layer], cache, layer, step, **kw))
                stored = [tuple(t.clone() for t in cache.kv(layer)) for layer in range(LAYERS)]
                stored += [tuple(t.clone() for t in cache.kv_scales(layer) if t is not None) for layer in range(LAYERS)]
                cache.abort_step(step)
        finally:
            _fast.enabled = True
        results.append((outs, stored))
    return results


def _general(*a, **k):
    raise AssertionError("general path taken")


def _same(a, b):
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))  # bit for bit


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize(
    "kv_format,layout,compact",
    [
        ("auto", "token_major", False),
        ("auto", "layer_major", True),
        ("auto", "head_major", True),
        (("int8", "int4"), "token_major", False),
        ("fp8_e4m3", "token_major", True),
    ],
)
def test_short_path_equals_general_path(device, impl, kv_format, layout, compact):
    gen = torch.Generator().manual_seed(hash((str(kv_format), layout, compact)) % 1000)
    with ops.attention_impl(impl):
        # fp8 / int8 keys are smoothed by default, which the short path leaves to the general one:
        # turn smoothing off so both paths really run
        cache = vattn.KVCache(LAYERS, HKV, DIM, max_batch=4, max_seq_len=256,
                              dtype=torch.float32 if device == "cpu" else torch.float16, kv_format=kv_format,
                              layout=layout, device=device, smooth_keys=False)  # fmt: skip
        slots = _fill(cache, [5, 40, 17], gen, compact=compact)
        for kw in ({}, {"scale": 0.2, "window_left": 6}, {"softcap": 5.0, "return_lse": True}):
            (out_a, kv_a), (out_b, kv_b) = _decode_both(cache, slots, gen, **kw)
            assert all(_same(x, y) for x, y in zip(out_a, out_b)), kw
            assert all(_same(x, y) for x, y in zip(kv_a, kv_b)), kw


def test_short_path_is_taken(monkeypatch):
    """With the short path on, a plain decode step never reaches the general launch functions."""
    cache = _cache("cpu")
    slots = _fill(cache, [9, 3], torch.Generator().manual_seed(0))

    monkeypatch.setattr(ops, "run_decode", _general)
    monkeypatch.setattr(ops, "run_append", _general)
    step = cache.begin_step(slots, [1, 1])
    k = torch.randn(2, HKV, DIM)
    for layer in range(LAYERS):
        vattn.append_kv(cache, layer, step, k, k)
        vattn.attention(torch.randn(2, HKV * 2, DIM), cache, layer, step)
    cache.end_step(step)
    # ... and with it off, the same calls do reach them
    _fast.enabled = False
    try:
        step = cache.begin_step(slots, [1, 1])
        with pytest.raises(AssertionError, match="general path"):
            vattn.append_kv(cache, 0, step, k, k)
    finally:
        _fast.enabled = True


def test_outputs_are_never_shared():
    cache = _cache("cpu")
    slots = _fill(cache, [12], torch.Generator().manual_seed(1))
    step = cache.begin_step(slots, [1])
    k = torch.randn(1, HKV, DIM)
    outs = []
    for layer in range(LAYERS):
        vattn.append_kv(cache, layer, step, k, k)
        outs.append(vattn.attention(torch.randn(1, HKV, DIM), cache, layer, step))
    first = outs[0].clone()
    again = vattn.attention(torch.randn(1, HKV, DIM) * 3, cache, 0, step)  # layer 0 a second time
    assert not torch.equal(again, first)
    assert torch.equal(outs[0], first)  # the first result was not overwritten
    ptrs = {o.data_ptr() for o in outs + [again]}
    assert len(ptrs) == LAYERS + 1
    cache.end_step(step)
    assert torch.equal(outs[0], first)  # outputs outlive their step


def test_short_path_keeps_the_errors():
    """Bad calls fall through to the general path and raise there, leaving the cache unchanged."""
    cache = _cache("cpu")
    slots = _fill(cache, [6], torch.Generator().manual_seed(2))
    step = cache.begin_step(slots, [1])
    good_q, good_k = torch.randn(1, HKV * 2, DIM), torch.randn(1, HKV, DIM)
    before = [t.clone() for t in cache.kv(0)]
    bad = [
        (TypeError, lambda: vattn.attention(good_q.double(), cache, 0, step)),
        (ValueError, lambda: vattn.attention(torch.randn(2, HKV * 2, DIM), cache, 0, step)),
        (ValueError, lambda: vattn.attention(torch.randn(1, 3, DIM), cache, 0, step)),
        (ValueError, lambda: vattn.attention(good_q, cache, LAYERS, step)),
        (TypeError, lambda: vattn.attention(good_q, cache, 0, step, window_left=1.5)),
        (ValueError, lambda: vattn.attention(good_q, cache, 0, step, softcap=-1.0)),
        (ValueError, lambda: vattn.attention(good_q, cache, 0, step, scale=float("nan"))),
        (TypeError, lambda: vattn.append_kv(cache, 0, step, good_k.half(), good_k.half())),
        (ValueError, lambda: vattn.append_kv(cache, 0, step, torch.randn(1, HKV + 1, DIM), good_k)),
        (ValueError, lambda: vattn.append_kv(cache, -1, step, good_k, good_k)),
        (TypeError, lambda: vattn.append_kv(cache, 0, None, good_k, good_k)),
        (TypeError, lambda: vattn.attention(good_q, cache, 0, "step")),
        (TypeError, lambda: vattn.attention([[0.0]], cache, 0, step)),
    ]
    for exc, call in bad:
        with pytest.raises(exc):
            call()
    assert all(_same(a, b) for a, b in zip(before, cache.kv(0)))
    cache.end_step(step)
    with pytest.raises(ValueError, match="not open"):  # an ended step, on either path
        vattn.attention(good_q, cache, 0, step)
    with pytest.raises(ValueError, match="not open"):
        vattn.append_kv(cache, 0, step, good_k, good_k)


def test_non_contiguous_and_grad_inputs_take_the_general_path():
    cache = _cache("cpu")
    slots = _fill(cache, [20], torch.Generator().manual_seed(3))
    step = cache.begin_step(slots, [1])
    k = torch.randn(1, HKV, DIM)
    vattn.append_kv(cache, 0, step, k, k)
    q = torch.randn(1, DIM, HKV * 2).transpose(1, 2)  # last dim strided: the general path copes or raises
    want = vattn.attention(q.contiguous(), cache, 0, step)
    with pytest.raises(ValueError):
        vattn.attention(q, cache, 0, step)
    qg = q.contiguous().requires_grad_(True)
    got = vattn.attention(qg, cache, 0, step)  # through the registered op
    assert torch.equal(got.detach(), want)
    cache.end_step(step)


def test_strided_inputs_take_the_short_path(monkeypatch):
    """Tokens with any non-negative strides and a contiguous last dimension (what the kernels read)
    stay on the short path and give what contiguous copies give."""
    cache = _cache("cpu")
    slots = _fill(cache, [30, 7], torch.Generator().manual_seed(4))
    big = torch.randn(2, 3 * HKV, DIM)
    k, v = big[:, :HKV], big[:, HKV : 2 * HKV]  # head stride DIM, token stride 3 * HKV * DIM
    q = torch.randn(2, 2 * HKV * 2, DIM)[:, ::2]  # head stride 2 * DIM
    assert not (k.is_contiguous() or q.is_contiguous())
    outs = []
    for enabled in (True, False):
        _fast.enabled = enabled
        try:
            with mock.patch.object(ops, "run_decode", _general) if enabled else contextlib.nullcontext():
                step = cache.begin_step(slots, [1, 1])
                vattn.append_kv(cache, 0, step, k if enabled else k.contiguous(), v if enabled else v.contiguous())
                outs.append(vattn.attention(q if enabled else q.contiguous(), cache, 0, step))
                cache.abort_step(step)
        finally:
            _fast.enabled = True
    assert _same(outs[0], outs[1])


def test_outputs_follow_inference_mode():
    """An output is an inference tensor exactly when the call ran under inference_mode, as the
    general path's torch.empty would make it."""
    cache = _cache("cpu")
    slots = _fill(cache, [10], torch.Generator().manual_seed(5))
    step = cache.begin_step(slots, [1])
    k = torch.randn(1, HKV, DIM)
    q = torch.randn(1, HKV, DIM)
    for layer in range(LAYERS):
        vattn.append_kv(cache, layer, step, k, k)
    with torch.inference_mode():
        a = vattn.attention(q, cache, 0, step)
    b = vattn.attention(q, cache, 1, step)
    assert a.is_inference() and not b.is_inference()
    (b * torch.ones(1, requires_grad=True)).sum().backward()  # usable by autograd outside the mode
    cache.end_step(step)
