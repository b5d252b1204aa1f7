"""Key smoothing (KVCache(smooth_keys=...)): quantized keys are stored as (key - mean) / scale with a
per-(slot, layer, kv head) channel mean and scale from the request's first step, and attention
multiplies q by the same scale. Softmax ignores the mean's shift, so attention is the same function
of the true keys, the lse is corrected back, and outlier channels no longer inflate every key's
quantization step."""

from __future__ import annotations

import pytest
import torch

import vattn
from vattn import formats, reference

H, D, HQ = 2, 64, 6


def _cache(fmt, smooth, layers=2):
    return vattn.KVCache(
        num_layers=layers,
        num_kv_heads=H,
        head_dim=D,
        max_batch=3,
        max_seq_len=1024,
        dtype=torch.float32,
        kv_format=fmt,
        device="cpu",
        page_bytes=16384,
        smooth_keys=smooth,
    )


def _outlier_keys(n, g):
    k = torch.randn(n, H, D, generator=g)
    k[..., 3] += 25.0  # an outlier channel, as real keys have
    k[..., 17] -= 12.0
    return k


def _run(cache, steps, g, return_lse=True):
    slots = [cache.alloc(), cache.alloc()]
    outs, keys = [], {s: [] for s in slots}
    for new in steps:
        st = cache.begin_step(slots, new)
        k = _outlier_keys(sum(new), g)
        v = torch.randn(sum(new), H, D, generator=g)
        q = torch.randn(sum(new), HQ, D, generator=g)
        vattn.append_kv(cache, 0, st, k, v)
        outs.append((q, k, v, st, vattn.attention(q, cache, 0, st, return_lse=return_lse)))
        cache.end_step(st)
        keys[slots[0]].append(k[: new[0]])
        keys[slots[1]].append(k[new[0] :])
    return slots, outs, keys


def test_stored_keys_are_quantized_minus_the_first_steps_mean():
    g = torch.Generator().manual_seed(0)
    cache = _cache("int4_tok", "auto")  # per-token int4 keys: smoothed by default
    assert cache.smooth_keys
    slots, _, keys = _run(cache, [[30, 9], [1, 1], [4, 1]], g)
    kc, _ = cache.kv(0)
    ks, _ = cache.kv_scales(0)
    means, scales = cache.key_means(0), cache.key_scales(0)
    for s in slots:
        allk = torch.cat(keys[s])
        first = keys[s][0]
        torch.testing.assert_close(means[s], first.mean(0))
        spread = (first - first.mean(0)).abs().amax(0).sqrt()
        torch.testing.assert_close(scales[s], spread / spread.log().mean(-1, keepdim=True).exp())
        codes, _ = reference.quantize((allk - means[s]) / scales[s], "int4")
        assert torch.equal(kc[s, : allk.shape[0]], codes)
        deq, _ = cache.kv(0, dequantize=True)  # undoes the smoothing
        want = reference.dequantize(codes, ks[s, : allk.shape[0]], "int4", D, torch.float32) * scales[s] + means[s]
        torch.testing.assert_close(deq[s, : allk.shape[0]], want)


@pytest.mark.parametrize("first", [1, 2, 3, 4])
def test_a_short_first_step_takes_the_mean_but_no_scales(first):
    """From fewer than 4 tokens the channel ranges are one or two differences (near 0 in some
    channels, which the division would blow up): such a first step sets the mean and leaves the
    scales at 1; from 4 tokens on it takes them."""
    g = torch.Generator().manual_seed(3)
    cache = _cache("int8", "auto")
    slots, _, keys = _run(cache, [[first, 6], [1, 1]], g)
    means, scales = cache.key_means(0), cache.key_scales(0)
    torch.testing.assert_close(means[slots[0]], keys[slots[0]][0].mean(0))
    assert bool((scales[slots[0]] == 1).all()) == (first < 4)
    assert not bool((scales[slots[1]] == 1).all())


@pytest.mark.parametrize("fmt", ["int4_tok", "fp8_e4m3", "int8", ("int4_tok", "int8")], ids=str)
def test_attention_is_the_true_keys_attention_and_closer_with_smoothing(fmt):
    errs = {}
    for smooth in (False, True):
        g = torch.Generator().manual_seed(1)
        cache = _cache(fmt, smooth)
        slots, outs, _ = _run(cache, [[40, 25], [1, 1], [1, 1]], g)
        worst, worst_lse = 0.0, 0.0
        # Reference over the TRUE keys and values (float64): what the model means.
        hist_k = {s: [] for s in slots}
        hist_v = {s: [] for s in slots}
        for q, k, v, st, (out, lse) in outs:
            off = 0
            for i, s in enumerate(st.slots):
                n = st.new_tokens[i]
                hist_k[s].append(k[off : off + n])
                hist_v[s].append(v[off : off + n])
                off += n
            kk = torch.nn.utils.rnn.pad_sequence([torch.cat(hist_k[s]) for s in slots], batch_first=True)
            vv = torch.nn.utils.rnn.pad_sequence([torch.cat(hist_v[s]) for s in slots], batch_first=True)
            want, want_lse = reference.attention(
                q, kk, vv, st.seqlens, None if st.is_decode else st.cu_seqlens_q, torch.tensor([0, 1])
            )
            worst = max(worst, float((out.double() - want).abs().max()))
            worst_lse = max(worst_lse, float((lse.double() - want_lse).abs().max()))
        errs[smooth] = (worst, worst_lse)
    # Outlier channels no longer set each key's scale: smaller output and lse errors. The lse with
    # smoothing is the true keys' lse (corrected back by scale * q . mean), so its error is only the
    # quantization's too (a missing correction would be off by ~ scale * q . mean, several units).
    assert errs[True][0] < errs[False][0], errs
    assert errs[True][1] < errs[False][1], errs
    bits = formats.resolve(fmt, torch.float32)[0].bits
    assert errs[True][1] < (0.5 if bits <= 4 else 0.1), errs


def test_smoothing_is_exact_on_a_plain_cache_and_refuses_softcap():
    outs = []
    for smooth in (False, True):
        g = torch.Generator().manual_seed(2)
        cache = _cache("auto", smooth)
        _, o, _ = _run(cache, [[20, 7], [1, 1]], g)
        outs.append(o)
    for (q, _, _, _, (a, la)), (_, _, _, _, (b, lb)) in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(la, lb, atol=2e-4, rtol=1e-5)
    cache = _cache("int8", True)
    s = cache.alloc()
    st = cache.begin_step([s], [3])
    vattn.append_kv(cache, 0, st, torch.randn(3, H, D), torch.randn(3, H, D))
    with pytest.raises(ValueError, match="smooth_keys=False"):
        vattn.attention(torch.randn(3, HQ, D), cache, 0, st, softcap=30.0)
    cache.abort_step(st)
    with pytest.raises(ValueError):
        _cache("int8", "yes")


def test_a_freed_slot_takes_a_new_mean():
    g = torch.Generator().manual_seed(3)
    cache = _cache("int8", True, layers=1)
    s = cache.alloc()
    st = cache.begin_step([s], [10])
    k1 = _outlier_keys(10, g)
    vattn.append_kv(cache, 0, st, k1, torch.randn(10, H, D))
    cache.end_step(st)
    torch.testing.assert_close(cache.key_means(0)[s], k1.mean(0))
    cache.free(s)
    s2 = cache.alloc()
    st = cache.begin_step([s2], [6])
    k2 = _outlier_keys(6, g) + 3.0
    vattn.append_kv(cache, 0, st, k2, torch.randn(6, H, D))
    cache.end_step(st)
    torch.testing.assert_close(cache.key_means(0)[s2], k2.mean(0))


def test_dequantize_kv_gives_the_appended_keys_back():
    g = torch.Generator().manual_seed(5)
    cache = _cache("int8", "auto")
    assert cache.smooth_keys
    slots, _, keys = _run(cache, [[30, 9]], g, return_lse=False)
    kd, _ = vattn.dequantize_kv(cache, 0)
    for s in slots:
        allk = torch.cat(keys[s])
        err = (kd[s, : allk.shape[0]] - allk).abs().max()
        assert err < 0.2, err  # int8 quantization error of the smoothed keys, smoothing undone
    kc, _ = cache.kv(0)
    ks, _ = cache.kv_scales(0)
    raw = vattn.dequantize_kv(kc, ks, "int8")
    assert raw.shape == kc.shape and raw.dtype == torch.float32
    with pytest.raises(ValueError):
        vattn.dequantize_kv(kc, ks, "auto")


@pytest.mark.parametrize("how", ["refused_append", "aborted_step"])
def test_a_failed_first_step_leaves_no_statistics(how):
    """The channel statistics come from a slot's first append that succeeds in a step that is
    committed: an append refused for its v, or an aborted step, leaves them unset, so the retried
    step is stored and attended exactly as on a cache that never saw the failure."""
    g = torch.Generator().manual_seed(7)
    k_bad, k = _outlier_keys(6, g) * 3 + 1, _outlier_keys(6, g)
    v, q = torch.randn(6, H, D, generator=g), torch.randn(6, HQ, D, generator=g)

    def run(cache, fail):
        s = cache.alloc()
        if fail:
            st = cache.begin_step([s], [6])
            if how == "refused_append":
                with pytest.raises(ValueError, match="contiguous"):
                    vattn.append_kv(cache, 0, st, k_bad, torch.randn(6, H, 2 * D)[..., ::2])
                assert not cache.key_means(0)[s].any()
            else:
                vattn.append_kv(cache, 0, st, k_bad, v)
                assert cache.key_means(0)[s].any()
                cache.abort_step(st)
                assert not cache.key_means(0)[s].any()
                st = cache.begin_step([s], [6])
        else:
            st = cache.begin_step([s], [6])
        vattn.append_kv(cache, 0, st, k, v)
        out = vattn.attention(q, cache, 0, st)
        cache.end_step(st)
        return out, cache.kv(0, dequantize=True)[0][s, :6]

    a, ka = run(_cache("int8", True), True)
    b, kb = run(_cache("int8", True), False)
    assert torch.equal(a, b) and torch.equal(ka, kb)
