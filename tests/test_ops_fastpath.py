"""The eager fast path of the public wrappers (ops._direct_ok): it must give exactly what the
registered torch.ops.vattn.* ops give, and step aside whenever something could tell them apart."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vattn
from vattn import ops
from helpers import Case, build, cache_views, device_impls, randn


class OpLog(TorchDispatchMode):
    """Records the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _decode_case(device, seed, dtype=torch.float16):
    case = Case(
        lens=[5, 33, 1],
        hkv=2,
        group=3,
        dim=64,
        window_left=7 if seed % 2 else -1,
        softcap=30.0 if seed % 3 == 0 else 0.0,
    )
    return build(case, dtype, "token_major", device, seed)


def _prefill_case(device, seed, dtype=torch.float16):
    case = Case(lens=[9, 40], hkv=2, group=2, dim=64, q_lens=[9, 3], scale=0.3 if seed % 2 else None)
    return build(case, dtype, "layer_major", device, seed)


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wrappers_equal_the_ops_exactly(device, impl, seed):
    with ops.attention_impl(impl):
        q, kc, vc, kw = _decode_case(device, seed)
        assert ops._direct_ok(q, kc, vc)
        out, lse = vattn.decode_attention(q, kc, vc, return_lse=True, **kw)
        ref_out, ref_lse = torch.ops.vattn.decode_attention(
            q, kc, vc, kw["seqlens_k"], kw["row_ids"], None, None, kw["window_left"], kw["softcap"], -1
        )
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        assert torch.equal(vattn.decode_attention(q, kc, vc, **kw), ref_out)  # without lse: same out

        q, kc, vc, kw = _prefill_case(device, seed)
        out, lse = vattn.prefill_attention(q, kc, vc, return_lse=True, **kw)
        ref_out, ref_lse = torch.ops.vattn.prefill_attention(
            q, kc, vc, kw["cu_seqlens_q"], kw["seqlens_k"], kw["row_ids"], None, kw["scale"], -1, 0.0, -1, -1
        )
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        assert torch.equal(vattn.prefill_attention(q, kc, vc, **kw), ref_out)

        merged = vattn.merge_states(out, lse, ref_out.flip(0).contiguous(), ref_lse.flip(0).contiguous())
        ref_merged = torch.ops.vattn.merge_states(out, lse, ref_out.flip(0).contiguous(), ref_lse.flip(0).contiguous())
        assert torch.equal(merged[0], ref_merged[0]) and torch.equal(merged[1], ref_merged[1])


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("seed", [0, 1])
def test_append_fast_path_writes_and_bumps_versions(device, impl, seed):
    gen = torch.Generator().manual_seed(seed)
    kc, vc = cache_views(4, 16, 2, 64, torch.float16, "token_major", device)
    kc2, vc2 = kc.clone(), vc.clone()
    k = randn((5, 2, 64), gen, torch.float16).to(device)
    v = randn((5, 2, 64), gen, torch.float16).to(device)
    rows, pos = [3, 0, 3, 1, 2], [0, 7, 1, 15, 4]
    before = kc._version, vc._version
    vattn.append_kv_raw(kc, vc, k, v, rows, pos)
    assert kc._version > before[0] and vc._version > before[1]  # as the op's ADInplaceOrView kernel does
    torch.ops.vattn.append_kv(
        kc2,
        vc2,
        k,
        v,
        torch.tensor(rows, dtype=torch.int32, device=device),
        torch.tensor(pos, dtype=torch.int32, device=device),
    )
    assert torch.equal(kc.nan_to_num(), kc2.nan_to_num()) and torch.equal(vc.nan_to_num(), vc2.nan_to_num())
    assert torch.equal(kc[3, 1], k[2]) and torch.equal(vc[1, 15], v[3])


def test_fast_path_steps_aside():
    q, kc, vc, kw = _decode_case("cpu", 0, torch.float32)
    assert ops._direct_ok(q, kc, vc)
    # A dispatch mode (FakeTensorMode, make_fx, export use these) must see the op.
    with OpLog() as log:
        vattn.decode_attention(q, kc, vc, **kw)
        vattn.append_kv_raw(kc, vc, q[:, :2].contiguous(), q[:, :2].contiguous(), [0, 1, 2], [40, 40, 40])
    assert "vattn.decode_attention.default" in log.ops and "vattn.append_kv.default" in log.ops
    # Autograd would record the op: the output keeps its grad_fn as before.
    qg = q.clone().requires_grad_(True)
    assert not ops._direct_ok(qg, kc, vc)
    out = vattn.decode_attention(qg, kc, vc, **kw)
    assert out.requires_grad and out.grad_fn is not None
    with torch.no_grad():
        assert ops._direct_ok(qg, kc, vc)
        assert not vattn.decode_attention(qg, kc, vc, **kw).requires_grad
    # Tensor subclasses and the profiler go through the op too.
    assert not ops._direct_ok(torch.nn.Parameter(q, requires_grad=False), kc, vc)
    with torch.profiler.profile() as prof:
        vattn.decode_attention(q, kc, vc, **kw)
    assert any("vattn::decode_attention" in e.name for e in prof.events())


def test_fast_path_keeps_errors():
    q, kc, vc, kw = _decode_case("cpu", 1, torch.float32)
    with pytest.raises(TypeError, match="must match the q dtype"):
        vattn.decode_attention(q.half(), kc, vc, **kw)
    with pytest.raises(ValueError, match="last dimension contiguous"):
        vattn.decode_attention(q, kc.transpose(2, 3), vc.transpose(2, 3), **kw)
    with pytest.raises(ValueError, match="row_ids must have shape"):
        vattn.decode_attention(q, kc, vc, seqlens_k=kw["seqlens_k"], row_ids=kw["row_ids"][:2].clone())
    with pytest.raises(ValueError, match="k has shape"):
        vattn.append_kv_raw(kc, vc, torch.randn(2, 3, 64), torch.randn(2, 3, 64), [0, 1], [0, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kvcache_api_fast_path_matches_ops(seed):
    """vattn.attention / append_kv on a KVCache (checked geometry reused per layer) against the
    plain ops on the same views, over prefill and decode steps."""
    gen = torch.Generator().manual_seed(seed)
    cache = vattn.KVCache(
        num_layers=2,
        num_kv_heads=2,
        head_dim=32,
        max_batch=3,
        max_seq_len=64,
        dtype=torch.float32,
        device="cpu",
        page_bytes=4096,
    )
    slots = [cache.alloc(), cache.alloc()]
    for new in ([7, 3], [1, 1], [2, 1], [1, 1]):
        step = cache.begin_step(slots=slots, new_tokens=new)
        for layer in range(2):
            k = randn((step.total_new, 2, 32), gen)
            v = randn((step.total_new, 2, 32), gen)
            q = randn((step.total_new, 6, 32), gen)
            vattn.append_kv(cache, layer, step, k, v)
            out, lse = vattn.attention(q, cache, layer, step, return_lse=True, softcap=20.0 if seed else 0.0)
            kv = cache.kv(layer)
            if step.is_decode:
                ref = torch.ops.vattn.decode_attention(
                    q, kv[0], kv[1], step.seqlens, step.slot_ids, None, None, -1, 20.0 if seed else 0.0, -1
                )
            else:
                ref = torch.ops.vattn.prefill_attention(
                    q,
                    kv[0],
                    kv[1],
                    step.cu_seqlens_q,
                    step.seqlens,
                    step.slot_ids,
                    None,
                    None,
                    -1,
                    20.0 if seed else 0.0,
                    -1,
                    -1,
                )
            assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
            assert torch.equal(vattn.attention(q, cache, layer, step, softcap=20.0 if seed else 0.0), ref[0])
            with pytest.raises(TypeError, match="dtype"):
                vattn.attention(q.double(), cache, layer, step)
        cache.end_step(step)
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        vattn.attention(q, cache, 0, step)


def test_traced_wrappers_record_the_ops():
    """torch.compile (fullgraph) and make_fx trace through the wrappers to the registered ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, kc, vc, kw = _decode_case("cpu", 2, torch.float32)

    def f(x):
        return vattn.decode_attention(x * 2, kc, vc, kw["seqlens_k"], row_ids=kw["row_ids"], max_seqlen_k=33) + 1

    expected = f(q)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(q), expected)
    graph = make_fx(f)(q)
    assert any("vattn.decode_attention" in str(n.target) for n in graph.graph.nodes)
