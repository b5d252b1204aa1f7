"""The build reports how it was made, and imports without a GPU."""

import os

import vattn


def test_build_info_fields():
    info = vattn.info()
    for key in ("version", "built_with_cuda", "cuda_architectures", "cuda_devices", "cpu_simd"):
        assert key in info
    assert info["version"] == vattn.__version__
    if info["built_with_cuda"]:
        assert info["cuda_architectures"], "a CUDA build must list its architectures"
    else:
        assert info["cuda_architectures"] == []


def test_ci_built_what_it_asked_for():
    expect = os.environ.get("VATTN_EXPECT_CUDA")
    if expect is None:
        return  # only CI states an expectation
    assert vattn._C.built_with_cuda == (expect == "1"), "CUDA build expectation not met"


def test_device_count_never_raises_without_gpu():
    n = vattn._C.cuda_device_count()
    assert isinstance(n, int) and n >= 0
