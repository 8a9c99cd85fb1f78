"""The suite's own set-up: which tests the CUDA skip applies to."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


def test_only_tests_marked_gpu_are_skipped_without_cuda(pytester: pytest.Pytester):
    """A checkout (or any folder above a test) named `gpu` must not make its tests count as gpu tests."""
    from tests.conftest import _cuda_available

    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    folder = pytester.mkpydir("gpu")
    (folder / "test_sample.py").write_text(
        "import pytest\n\n\ndef test_plain():\n    pass\n\n\n@pytest.mark.gpu\ndef test_needs_cuda():\n    pass\n",
        encoding="utf-8",
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    if _cuda_available():
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
