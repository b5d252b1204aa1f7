"""Test helpers shared by tests/ (the gpu marker logic lives in the root conftest.py)."""
import pytest


def devices():
    """Devices every op test runs on: cpu always, cuda (marked gpu) too."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
