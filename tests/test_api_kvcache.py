"""vattn.append_kv / vattn.attention through a real vattn.KVCache: a decode loop of many steps with
pages mapped between steps, chunked prefill, both layouts, checked against the reference each step."""

import pytest
import torch

import vattn
from vattn import reference
from helpers import randn


def _devices():
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


class History:
    """The K/V every slot should hold, per layer, to build the reference's plain cache."""

    def __init__(self, layers, heads, dim):
        self.k = {}
        self.v = {}
        self.layers, self.heads, self.dim = layers, heads, dim

    def add(self, layer, slot, k, v):
        self.k.setdefault((layer, slot), []).append(k.cpu())
        self.v.setdefault((layer, slot), []).append(v.cpu())

    def reference(self, q, layer, step):
        """Reference attention of the step's queries over plain caches built from the history."""
        rows = len(step.slots)
        lens = [a + n for a, n in zip(step.start, step.new_tokens)]
        seq = max(lens)
        kc = torch.full((rows, seq, self.heads, self.dim), float("nan"), dtype=torch.float64)
        vc = kc.clone()
        for b, s in enumerate(step.slots):
            k = torch.cat(self.k[(layer, s)])
            v = torch.cat(self.v[(layer, s)])
            assert k.shape[0] == lens[b]
            kc[b, : lens[b]] = k.double()
            vc[b, : lens[b]] = v.double()
        return reference.attention(q.cpu(), kc, vc, torch.tensor(lens), cu_seqlens_q=step.cu_seqlens_q.cpu())


def _check(out, ref, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)


def _run_step(cache, hist, step, gen, group, dtype, device, check=True):
    heads, dim = cache.num_kv_heads, cache.head_dim
    offsets = [0]
    for n in step.new_tokens:
        offsets.append(offsets[-1] + n)
    for layer in range(cache.num_layers):
        k = randn((step.total_new, heads, dim), gen, dtype).to(device)
        v = randn((step.total_new, heads, dim), gen, dtype).to(device)
        q = randn((step.total_new, heads * group, dim), gen, dtype).to(device)
        vattn.append_kv(cache, layer, step, k, v)
        for b, s in enumerate(step.slots):
            hist.add(layer, s, k[offsets[b] : offsets[b + 1]], v[offsets[b] : offsets[b + 1]])
        out = vattn.attention(q, cache, layer, step)
        if check:
            _check(out, hist.reference(q, layer, step)[0], dtype)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_loop_through_kvcache(device, layout, dtype):
    layers, heads, dim, group = 2, 2, 64, 3
    page = 16 * 1024 if device == "cpu" else None  # small host pages: new pages get mapped every few steps
    cache = vattn.KVCache(
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=dim,
        max_batch=6,
        max_seq_len=512,
        dtype=dtype,
        layout=layout,
        device=device,
        page_bytes=page,
    )
    hist = History(layers, heads, dim)
    gen = torch.Generator().manual_seed(11)
    slots = [cache.alloc() for _ in range(4)]
    order = [slots[2], slots[0], slots[3], slots[1]]  # batch order differs from slot order
    step = cache.begin_step(slots=order, new_tokens=[7, 30, 1, 64])
    _run_step(cache, hist, step, gen, group, dtype, device)
    cache.end_step(step)
    mapped = [cache.stats()["mapped_bytes"]]
    for i in range(40):
        step = cache.begin_step(slots=order, new_tokens=[1] * len(order))
        assert step.is_decode
        _run_step(cache, hist, step, gen, group, dtype, device)
        cache.end_step(step)
        mapped.append(cache.stats()["mapped_bytes"])
    if device == "cpu":
        assert mapped[-1] > mapped[0], "the loop should have mapped new pages between steps"
    assert [cache.length(s) for s in order] == [47, 70, 41, 104]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_chunked_prefill_through_kvcache(device, layout):
    dtype = torch.float16
    layers, heads, dim, group = 1, 1, 128, 4
    page = 16 * 1024 if device == "cpu" else None
    cache = vattn.KVCache(
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=dim,
        max_batch=3,
        max_seq_len=1024,
        dtype=dtype,
        layout=layout,
        device=device,
        page_bytes=page,
    )
    hist = History(layers, heads, dim)
    gen = torch.Generator().manual_seed(12)
    a, b = cache.alloc(), cache.alloc()
    # Two prompts prefilled in chunks of different sizes, then decoded together.
    for new in ([100, 37], [1, 200], [250, 63], [0, 1]):
        slots = [s for s, n in zip((a, b), new)]
        step = cache.begin_step(slots=slots, new_tokens=new)
        _run_step(cache, hist, step, gen, group, dtype, device)
        cache.end_step(step)
    for _ in range(3):
        step = cache.begin_step(slots=[b, a], new_tokens=[1, 1])
        _run_step(cache, hist, step, gen, group, dtype, device)
        cache.end_step(step)
    # A freed slot's pages come back to a new request; attention sees only the new tokens.
    cache.free(a)
    for layer in range(layers):
        hist.k.pop((layer, a))
        hist.v.pop((layer, a))
    c = cache.alloc()
    step = cache.begin_step(slots=[c], new_tokens=[20])
    _run_step(cache, hist, step, gen, group, dtype, device)
    cache.end_step(step)
    assert cache.length(c) == 20
