"""pytest-benchmark versions of the append_kv and merge_states microbenchmarks (bench/run.py),
each checked against its torch anchor on the same data."""

import pytest
import torch

import bench_utils as bu

DEVICES = bu.devices()


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("who", ["vattn", "torch"])
@pytest.mark.parametrize("rows,tokens", [(16, 1), (1, 512)], ids=["decode-append", "prefill-append"])
@pytest.mark.parametrize("device", DEVICES)
def test_bench_append_kv(bench, device, rows, tokens, who):
    import vattn

    _, hkv, d = bu.MODELS["llama3-8b"]
    dt = _dtype(device)
    g = bu.seeded(11, device)
    cap = 2 * tokens + 64
    kc = torch.randn(rows, cap, hkv, d, generator=g, device=device, dtype=dt)
    vc = torch.randn_like(kc)
    n = rows * tokens
    k = torch.randn(n, hkv, d, generator=g, device=device, dtype=dt)
    v = torch.randn_like(k)
    # Rows in a non-trivial order, positions past a prefix.
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(1)).to(device)
    row_ids = perm.to(torch.int32).repeat_interleave(tokens)
    pos = (torch.arange(tokens, device=device, dtype=torch.int32) + 5).repeat(rows)
    kc2, vc2 = kc.clone(), vc.clone()

    def vfn():
        vattn.append_kv_raw(kc, vc, k, v, row_ids, pos)

    def tfn():
        kc2[row_ids.long(), pos.long()] = k
        vc2[row_ids.long(), pos.long()] = v

    bench.benchmark.group = f"append_kv {device} rows={rows} tokens={tokens}"
    if who == "vattn":
        bench(vfn, device)
        tfn()
    else:
        bench(tfn, device)
        vfn()
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(kc[int(perm[0]), 5], k[0])


@pytest.mark.parametrize("who", ["vattn", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_bench_merge_states(bench, device, who):
    import vattn

    dt = _dtype(device)
    n, h, d = (512, 32, 128) if device == "cpu" else (16384, 32, 128)
    g = bu.seeded(12, device)
    oa = torch.randn(n, h, d, generator=g, device=device, dtype=dt)
    ob = torch.randn(n, h, d, generator=g, device=device, dtype=dt)
    la = torch.randn(n, h, generator=g, device=device) * 3
    lb = torch.randn(n, h, generator=g, device=device) * 3

    def vfn():
        return vattn.merge_states(oa, la, ob, lb)

    def tfn():
        return bu.merge_states_eager(oa, la, ob, lb)

    bench.benchmark.group = f"merge_states {device} n={n}"
    vo, vl = bench(vfn, device) if who == "vattn" else vfn()
    to, tl = bench(tfn, device) if who == "torch" else tfn()
    assert bu.max_abs_err(vo, to) <= bu.tolerance(dt)
    assert bu.max_abs_err(vl, tl) <= 1e-4
