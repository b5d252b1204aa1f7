"""No sequence of public calls kills the process or leaves Python and native state apart.

Randomized sequences (hypothesis) of ordinary calls — steps used after end / abort / free, foreign
steps, reads of every element of kv() views (free, shrunk, never used slots), raw ops on the cache's
own views past what is mapped, shrink, compact, free, close, threads — run in a worker child process,
so a crash is a test failure (with the sequence that caused it) and not the end of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_WORKER = textwrap.dedent(
    r"""
    import json, sys, threading, torch, vattn

    FORMAT = sys.argv[1] if len(sys.argv) > 1 else "auto"  # "int4": int4_ch keys, whole-group mapping

    def make(seed):
        return vattn.KVCache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch=3, max_seq_len=256,
                             dtype=torch.float32, device="cpu", page_bytes=16384, reclaim_watermark_bytes=0,
                             kv_format=FORMAT)

    def scales(c, layer):
        return c.kv_scales(layer) if FORMAT != "auto" else (None, None)

    def consistent(c):
        if c.closed:
            return
        for s in range(c.max_batch):
            live = c._m.is_live(s)
            n = c.length(s)
            assert n == (c._m.length(s) if live else 0), ("length", s, n, c._m.length(s))
            assert int(c.lengths[s]) == n, ("lengths tensor", s)
            assert n <= c._m.mapped_tokens(s) or not live, ("unmapped tokens", s)
            assert int(c.head_lengths(s).max()) == n or n == 0
            assert live or c._m.shared_pages(s) == 0, ("an idle slot maps shared pages", s)
        st = c.stats()
        assert st["pages_mapped"] * st["page_bytes"] == st["mapped_bytes"]

    def run(ops):
        torch.manual_seed(0)
        c, other = make(0), make(1)
        steps, errors = [], []
        for op, a, b in ops:
            try:
                live = c.live_slots() if not c.closed else []
                if op == "alloc":
                    c.alloc()
                elif op == "free" and live:
                    c.free(live[a % len(live)])
                elif op == "begin" and live:
                    slots = sorted({live[a % len(live)], live[b % len(live)]})
                    steps.append(c.begin_step(slots, [1 + (a * 7 + i) % 40 for i in range(len(slots))]))
                elif op == "begin_other":
                    s = other.alloc() if other.live_slots() == [] else other.live_slots()[0]
                    steps.append(other.begin_step([s], [1 + a % 20]))
                elif op in ("append", "attend") and steps:
                    stp = steps[a % len(steps)]
                    layer = b % 2
                    if op == "append":
                        vattn.append_kv(c, layer, stp, torch.randn(stp.total_new, 2, 64), torch.randn(stp.total_new, 2, 64))
                    else:
                        vattn.attention(torch.randn(stp.total_new, 4, 64), c, layer, stp)
                elif op == "end" and steps:
                    c.end_step(steps[a % len(steps)])
                elif op == "abort" and steps:
                    c.abort_step(steps[a % len(steps)])
                elif op == "shrink" and live:
                    s = live[a % len(live)]
                    c.shrink(s, b % (c.length(s) + 1))
                elif op == "reserve" and live:
                    c.reserve(live[a % len(live)], b * 3)
                elif op == "read":
                    k, v = c.kv(b % 2)
                    assert torch.isfinite(k.sum()) or True  # reading every element must not crash
                    v.abs().max()
                elif op == "raw_append":
                    k, v = c.kv(b % 2)
                    ks, vs = scales(c, b % 2)
                    vattn.ops.append_kv_raw(k, v, torch.randn(1, 2, 64), torch.randn(1, 2, 64), [a % 3], [(b * 37) % 256],
                                            k_scale=ks, v_scale=vs)
                elif op == "raw_decode":
                    k, v = c.kv(b % 2)
                    ks, vs = scales(c, b % 2)
                    vattn.decode_attention(torch.randn(3, 4, 64), k, v, [(a * 91) % 257, b % 257, 256], k_scale=ks, v_scale=vs)
                elif op == "compact" and live:
                    s = live[a % len(live)]
                    n = c.length(s)
                    k = min(n, b % 50)
                    keep = torch.arange(n - k, n).expand(1, 2, 2, k).contiguous() if k else torch.zeros(1, 2, 2, 1, dtype=torch.int64)
                    c.compact([s], keep, torch.full((1, 2, 2), k))
                elif op == "threads" and live:
                    s = live[a % len(live)]
                    def work():
                        for _ in range(20):
                            try:
                                stp = c.begin_step([s], [1])
                                c.end_step(stp)
                            except (RuntimeError, ValueError, MemoryError):
                                pass
                            try:
                                c.free(s); c.alloc()
                            except (RuntimeError, ValueError):
                                pass
                    ts = [threading.Thread(target=work) for _ in range(3)]
                    [t.start() for t in ts]
                    [t.join() for t in ts]
                elif op == "fork" and live:
                    c.fork(live[a % len(live)])
                elif op == "share" and live:
                    d = c.alloc()
                    src = live[a % len(live)]
                    c.share_prefix(src, d, b % (c.length(src) + 2))  # n past the length: ValueError
                elif op == "close":
                    c.close()
            except (ValueError, TypeError, RuntimeError, IndexError, MemoryError) as e:
                errors.append(type(e).__name__)
            consistent(c)
        return errors

    for line in sys.stdin:
        try:
            errors = run(json.loads(line))
            print(json.dumps({"ok": True, "errors": errors}), flush=True)
        except AssertionError as e:
            print(json.dumps({"ok": False, "why": "invariant: " + repr(e)}), flush=True)
    """
)

_OPS = [
    "alloc",
    "free",
    "begin",
    "begin_other",
    "append",
    "attend",
    "end",
    "abort",
    "shrink",
    "reserve",
    "read",
    "raw_append",
    "raw_decode",
    "compact",
    "threads",
    "fork",
    "share",
    "close",
]


class _Worker:
    def __init__(self, kv_format="auto"):
        self.proc = None
        self.kv_format = kv_format

    def start(self):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, self.kv_format],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, ops):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(ops) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            err = self.proc.stderr.read()[-2000:]
            self.proc = None
            return {"ok": False, "why": f"worker died (exit code {rc}): {err}"}
        return json.loads(line)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = _Worker()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def worker_int4():
    w = _Worker("int4")
    yield w
    w.stop()


_op = st.tuples(st.sampled_from(_OPS), st.integers(0, 1000), st.integers(0, 1000))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=30))
def test_random_call_sequences_never_crash(worker, ops):
    r = worker.run([list(o) for o in ops])
    assert r["ok"], f"{r['why']}\nsequence: {ops}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=30))
def test_random_call_sequences_never_crash_int4(worker_int4, ops):
    # The same on an int4 cache (int4_ch keys): groups re-encoded by appends and compaction, the
    # parameter words of whole groups mapped, raw ops with scales.
    r = worker_int4.run([list(o) for o in ops])
    assert r["ok"], f"{r['why']}\nsequence: {ops}"


def test_known_crash_cases(worker):
    # The sequences that used to kill the interpreter or silently succeed (issue 11).
    # (sequence, whether it must raise a Python exception)
    cases = [
        ([["read", 0, 0]], False),  # view of never-used slots: zeros
        ([["alloc", 0, 0], ["begin", 0, 0], ["end", 0, 0], ["shrink", 0, 0], ["read", 0, 0]], False),
        ([["alloc", 0, 0], ["begin", 0, 0], ["end", 0, 0], ["append", 0, 0]], True),  # step after end
        ([["alloc", 0, 0], ["begin", 0, 0], ["abort", 0, 0], ["free", 0, 0], ["attend", 0, 0]], True),
        ([["begin_other", 5, 0], ["append", 0, 0]], True),  # a foreign step
        ([["raw_append", 1, 3]], True),  # raw write into unmapped memory
        ([["raw_decode", 3, 256]], False),  # raw read past what is mapped: zeros, no crash
        ([["alloc", 0, 0], ["close", 0, 0], ["read", 0, 0]], True),
    ]
    for ops, must_raise in cases:
        r = worker.run(ops)
        assert r["ok"], (ops, r)
        assert bool(r["errors"]) == must_raise, (ops, r)


_CLOSED_VIEWS = textwrap.dedent(
    """
    import gc, sys, torch, vattn
    from vattn import _guard
    how = sys.argv[1]
    c = vattn.KVCache(num_layers=1, num_kv_heads=2, head_dim=64, max_batch=2, max_seq_len=4096,
                      dtype=torch.float32, device="cpu", page_bytes=4096)
    a = c.alloc()
    step = c.begin_step(slots=[a], new_tokens=[3])
    vattn.append_kv(c, 0, step, torch.randn(3, 2, 64), torch.randn(3, 2, 64))
    c.end_step(step)
    K, V = c.kv(0)
    stored = K[a, :3].clone()
    if how == "close":
        c.close()
    else:
        del c, step
        gc.collect()
    k, v = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    raised = []
    for pos in (4000, 1):  # unmapped, and a mapped position: neither is written
        try:
            vattn.append_kv_raw(K, V, k, v, torch.tensor([a]), torch.tensor([pos]))
        except ValueError as e:
            raised.append("closed vattn.KVCache" in str(e))
    try:
        torch.ops.vattn.append_kv(K, V, k, v, torch.tensor([a], dtype=torch.int32),
                                  torch.tensor([4000], dtype=torch.int32))
    except ValueError as e:
        raised.append("closed vattn.KVCache" in str(e))
    try:
        vattn.compact_kv(K, V, torch.tensor([a], dtype=torch.int32), torch.tensor([[[1], [1]]], dtype=torch.int32),
                         torch.tensor([[1, 1]], dtype=torch.int32))
    except ValueError as e:
        raised.append("closed vattn.KVCache" in str(e))
    same = bool(torch.equal(K[a, :3], stored))
    del K, V
    gc.collect()
    print(raised, same, _guard.retired_ranges())
    """
)


@pytest.mark.parametrize("how", ["close", "collect"])
def test_raw_writes_into_views_of_a_closed_cache_raise(how):
    """kv()'s views outlive close() (and the cache object): their memory stays, but what is mapped
    there is no longer known, so a raw append or compaction into them raises ValueError instead of
    faulting on an unmapped page, and writes nothing; once the views are gone the range is
    forgotten (it may be reused by other memory)."""
    r = subprocess.run([sys.executable, "-c", _CLOSED_VIEWS, how], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[-2] == "[True, True, True, True] True 0", r.stdout


_STEP_RACES = textwrap.dedent(
    """
    import copy, sys, threading, torch, vattn
    torch.set_num_threads(1)
    what = sys.argv[1]
    if what == "copy":  # a shallow copy shared the memory check: closing it left the original unguarded
        c = vattn.KVCache(1, 2, 64, 2, 4096, dtype=torch.float32, device="cpu", page_bytes=4096)
        try:
            copy.copy(c)
        except TypeError:
            print("refused")
    elif what == "trusted":  # an open step's positions with other rows / head positions were trusted
        c = vattn.KVCache(1, 2, 64, 2, 4096, dtype=torch.float32, device="cpu", page_bytes=4096)
        a, b = c.alloc(), c.alloc()
        st = c.begin_step([a], [2])
        K, V = c.kv(0)
        k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
        raised = []
        for rows, hp in ((torch.tensor([b, b], dtype=torch.int32), None),
                         (st.token_slots, torch.full((2, 2), 3000, dtype=torch.int32))):
            try:
                vattn.append_kv_raw(K, V, k, v, rows, st.positions, head_positions=hp)
            except ValueError:
                raised.append(True)
        # ... or on a sliced view of the cache (row 0 of K[1:] is slot b, never mapped)
        try:
            vattn.append_kv_raw(K[1:], V[1:], k, v, st.token_slots, st.positions)
        except ValueError:
            raised.append(True)
        vattn.append_kv_raw(K, V, k, v, st.token_slots, st.positions)  # the step's own tensors pass
        # the step's tensors changed in place (an unallocated slot, an unmapped position): every
        # op refuses the step, the raw append checks the pages; the step can still be aborted
        st.token_slots.fill_(b)
        st.positions.fill_(4000)
        for call in (lambda: vattn.append_kv(c, 0, st, k, v),
                     lambda: vattn.attention(torch.randn(2, 2, 64), c, 0, st),
                     lambda: vattn.append_kv_raw(K, V, k, v, st.token_slots, st.positions)):
            try:
                call()
            except ValueError:
                raised.append(True)
        try:
            st.positions = torch.zeros(2, dtype=torch.int32)
        except AttributeError:
            raised.append(True)
        c.abort_step(st)
        print(raised)
    else:  # another thread aborts the step and frees its slot while appends on it run
        N = 4096
        c = vattn.KVCache(1, 8, 128, 2, N, dtype=torch.float32, device="cpu", page_bytes=4096,
                          reclaim_watermark_bytes=0)
        k, v = torch.randn(N, 8, 128), torch.randn(N, 8, 128)
        for trial in range(60):
            s = c.alloc()
            st = c.begin_step([s], [N])
            go = threading.Event()
            def appends():
                go.set()
                try:
                    for _ in range(20):
                        vattn.append_kv(c, 0, st, k, v)
                except ValueError:
                    pass
            t = threading.Thread(target=appends)
            t.start()
            go.wait()
            c.abort_step(st) if trial % 2 else c.end_step(st)
            c.free(s)
            t.join()
        print("done")
    """
)


@pytest.mark.parametrize("what,out", [("copy", "refused"), ("trusted", str([True] * 7)), ("race", "done")])
def test_step_misuse_and_races_do_not_crash(what, out):
    """copy.copy(cache) raises TypeError; a raw append is trusted only with an open step's own row,
    position and head-position tensors, unchanged since begin_step, on the cache's whole views; ending or aborting a step waits for appends in flight on it,
    so freeing its slot right after cannot unmap pages under a write (each was a segfault)."""
    r = subprocess.run([sys.executable, "-c", _STEP_RACES, what], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[-2] == out, r.stdout
