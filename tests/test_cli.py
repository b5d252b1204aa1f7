"""The `vattn` command: info, demo on the tiny model, generate, and its one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys

import pytest

import vattn
from vattn import cli


def run(*argv, timeout=600):
    """`python -m vattn ...` in a subprocess (what the console script runs)."""
    env = dict(os.environ)
    env.pop("VATTN_DEBUG", None)
    env["OMP_NUM_THREADS"] = "1"  # tiny models; extra threads only spin against other processes
    return subprocess.run(
        [sys.executable, "-m", "vattn", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_inproc(*argv):
    """cli.main(argv) in this process (fast: no interpreter start, torch already imported)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return _Result(code, out.getvalue(), err.getvalue())


def one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("vattn: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_info():
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    assert f"vattn {vattn.__version__}" in proc.stdout
    assert "build:" in proc.stdout and "torch:" in proc.stdout
    assert ("CUDA" in proc.stdout) or ("CPU only" in proc.stdout)
    assert "page granularity [host]" in proc.stdout
    assert f"cpu simd: {vattn.info()['cpu_simd']}" in proc.stdout


def test_help_and_no_command(capsys):
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "generate" in out and "info" in out


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_demo_tiny(layout):
    pytest.importorskip("transformers")
    proc = run("demo", "--tiny", "--device", "cpu", "--max-new-tokens", "12", "--layout", layout)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in (
        "[0] ",
        "[3] ",
        "tokens/s",
        "virtual reserved",
        "physical mapped",
        "live tokens",
        "static, max length",
        f"layout {layout}",
    ):
        assert needle in out, out
    assert "generating:" in proc.stderr  # progress
    assert "12/12" in proc.stderr


def test_demo_tiny_in_process_memory_numbers(capsys, monkeypatch):
    """The memory table's numbers are consistent: live <= mapped <= reserved, static > live."""
    pytest.importorskip("transformers")
    import torch

    captured = {}
    original = cli.print_report

    def spy(prompts, r):
        captured.update(r)
        original(prompts, r)

    monkeypatch.setattr(cli, "print_report", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin against other processes
    try:
        assert (
            cli.main(
                [
                    "demo",
                    "--tiny",
                    "--device",
                    "cpu",
                    "--max-new-tokens",
                    "8",
                    "--prompt",
                    "one",
                    "--prompt",
                    "a longer second prompt",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    s = captured["stats"]
    assert 0 < s["used_bytes"] <= s["mapped_bytes"] <= s["reserved_bytes"]
    assert captured["static_max_bytes"] > s["used_bytes"]
    assert captured["batch"] == 2 and captured["generated"] == 8
    assert len(captured["texts"]) == 2


@pytest.mark.parametrize("kv_format", ["int4", "int8,int4"])
def test_demo_tiny_quantized_memory_table(capsys, monkeypatch, kv_format):
    """--kv-format stores the cache quantized: the table shows the format, and the live bytes are the
    unquantized bytes times the format's fraction (int4: 5 bits of 32 per element at head_dim 64 plus
    record padding; never more than half)."""
    pytest.importorskip("transformers")
    import torch

    captured = {}
    original = cli.print_report

    def spy(prompts, r):
        captured.update(r)
        original(prompts, r)

    monkeypatch.setattr(cli, "print_report", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            cli.main(
                [
                    "demo",
                    "--tiny",
                    "--device",
                    "cpu",
                    "--max-new-tokens",
                    "6",
                    "--prompt",
                    "one",
                    "--kv-format",
                    kv_format,
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"KV format {kv_format}" in out and "saves" in out
    s = captured["stats"]
    assert s["v_format"] == "int4"
    assert 0 < s["used_bytes"] < 0.5 * captured["plain_used_bytes"]


def test_demo_sampled_tiny():
    pytest.importorskip("transformers")
    proc = run("demo", "--tiny", "--device", "cpu", "--max-new-tokens", "6", "--sample", "--seed", "3")
    assert proc.returncode == 0, proc.stderr


def test_generate_with_a_saved_model(tmp_path):
    """`vattn generate --model DIR` on a local transformers model directory (the tiny Llama saved)."""
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vattn._models import tiny_llama

    model, _ = tiny_llama()
    model.save_pretrained(tmp_path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(i): i - 29 for i in range(32, 127)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(tmp_path)
    proc = run(
        "generate",
        "--model",
        str(tmp_path),
        "--prompt",
        "hello",
        "--prompt",
        "a second prompt",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
        "--no-chat-template",
        "--layout",
        "layer_major",
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1] a second prompt" in proc.stdout and "physical mapped" in proc.stdout


def test_error_missing_model(tmp_path):
    proc = run_inproc("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    one_line_error(proc, 1, "does not exist")


def test_error_missing_gguf(tmp_path):
    proc = run_inproc("generate", "--model", str(tmp_path), "--gguf-file", "missing.gguf", "--prompt", "hi")
    one_line_error(proc, 1, "missing.gguf")


def test_error_empty_model_dir(tmp_path):
    proc = run_inproc("generate", "--model", str(tmp_path), "--prompt", "hi")
    one_line_error(proc, 1, "config.json")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["demo", "--layout", "diagonal"], "--layout"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["demo", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["demo", "--max-physical-bytes", "lots"], "--max-physical-bytes"),
        (["demo", "--device", "tpu"], "tpu"),
        (["demo", "--kv-format", "int3"], "--kv-format"),
        (["generate", "--policy", "nope:0.5", "--prompt", "hi"], "--policy"),
        (["demo", "--policy", "snapkv"], "--policy"),
        (["demo", "--policy", "snapkv:1.5"], "--policy"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_error_bad_option(argv, needle):
    one_line_error(run_inproc(*argv), 2, needle)


def test_demo_with_a_policy_prints_the_memory_before_and_after():
    proc = run_inproc("demo", "--tiny", "--device", "cpu", "--policy", "streamingllm:8", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "before eviction" in proc.stdout and "after eviction" in proc.stdout


def test_demo_head_major_small_pages_releases_memory_after_adakv():
    proc = run_inproc(
        "demo", "--tiny", "--device", "cpu", "--layout", "head_major", "--page-bytes", "4KiB",
        "--policy", "adakv:0.25", "--max-new-tokens", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pages of 4.0 KiB" in proc.stdout
    row = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if "eviction" in ln}
    before, after = (float(row[k].split()[2]) for k in ("before", "after"))  # KiB: 4 rows, small prompts
    assert "KiB" in row["before"] and "KiB" in row["after"] and after < before / 2


def test_error_bad_option_console():
    """The same through the interpreter entry point (python -m vattn): exit status and one line."""
    one_line_error(run("demo", "--layout", "diagonal"), 2, "--layout")


def test_error_absent_device():
    import torch

    if torch.cuda.is_available() and vattn._C.built_with_cuda:
        proc = run_inproc("demo", "--tiny", "--device", f"cuda:{torch.cuda.device_count()}")
    else:
        proc = run_inproc("demo", "--tiny", "--device", "cuda")
    one_line_error(proc, 1, "cuda")


def test_bytes_option_parsing():
    assert cli._bytes_arg("512MiB") == 512 << 20
    assert cli._bytes_arg("2G") == 2 << 30
    assert cli._bytes_arg("1000") == 1000
    assert cli._bytes_arg("1.5GB") == 1_500_000_000
    for bad in ("infKiB", "1e400", "nan", "-1M", "0", "12X", "9e18G"):
        with pytest.raises(argparse.ArgumentTypeError, match="byte count"):
            cli._bytes_arg(bad)


def test_memory_error_from_cli_is_one_line():
    pytest.importorskip("transformers")
    proc = run("demo", "--tiny", "--device", "cpu", "--max-new-tokens", "32", "--max-physical-bytes", "4MiB")
    one_line_error(proc, 1, "MemoryError", "max_physical_bytes")


@pytest.mark.gpu
def test_demo_tiny_cuda():
    proc = run("demo", "--tiny", "--device", "cuda", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert "bfloat16" in proc.stdout


def test_e2e_generate_bench_tiny(capsys):
    """bench/e2e_generate.py runs on the generation helpers it shares with the CLI (vattn.generation)."""
    pytest.importorskip("transformers")
    import importlib.util

    import torch

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "e2e_generate.py")
    spec = importlib.util.spec_from_file_location("e2e_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert (
            bench.main(
                [
                    "--tiny",
                    "--device",
                    "cpu",
                    "--max-new-tokens",
                    "4",
                    "--batches",
                    "2",
                    "--repeats",
                    "1",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    assert "| 2 |" in table and "| yes |" in table, table
