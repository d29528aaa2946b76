"""The quick test tier's selection (tests/_tier.py, hooked up in tests/conftest.py; issue 15):
pytest runs in-process on a small test file that uses the project's own hooks."""

import os
import re
import types

import pytest
import torch

from tests import _tier

pytest_plugins = ["pytester"]

CONFTEST = """
from tests.conftest import (pytest_addoption, pytest_configure, pytest_collection_modifyitems,
                            pytest_runtest_logreport, pytest_terminal_summary)
"""

INI = """
[pytest]
markers =
    cuda: needs a CUDA GPU
    full_tier: left out of the quick tier
addopts = --strict-markers -p no:cacheprovider
"""

TESTS = """
import pytest
import torch


@pytest.mark.cuda
@pytest.mark.parametrize("b", ["x", "y"])
@pytest.mark.parametrize("a", [1, 2, 3])
def test_grid(a, b):
    pass


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype, n):
    pass


@pytest.mark.parametrize("b", ["x", "y"])
@pytest.mark.parametrize("a", [1, 2, 3])
def test_cpu_grid(a, b):
    pass


@pytest.mark.cuda
def test_cuda_single():
    pass


@pytest.mark.cuda
@pytest.mark.full_tier
def test_cuda_slow():
    pass
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.delenv(_tier.ENV, raising=False)
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_tiered=TESTS)
    return pytester


def collected(result):
    """{function name: [parameter ids]} of the collected tests."""
    got = {}
    for line in result.outlines:
        m = re.match(r"test_tiered\.py::(\w+)(?:\[(.*)\])?$", line.strip())
        if m:
            got.setdefault(m.group(1), []).append(m.group(2))
    return got


def test_full_tier_is_the_default_and_keeps_everything(suite):
    result = suite.runpytest("--collect-only", "-q")
    got = collected(result)
    assert [len(got[f]) for f in ("test_grid", "test_dtypes", "test_cpu_grid")] == [6, 6, 6]
    assert "test_cuda_single" in got and "test_cuda_slow" in got
    result.stdout.fnmatch_lines(["compile_ops test tier: full (0 of 14 CUDA tests deselected)"])


@pytest.mark.parametrize("how", ["option", "env"])
def test_quick_tier_covers_every_value(suite, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(_tier.ENV, "quick")
        result = suite.runpytest("--collect-only", "-q")
    else:
        result = suite.runpytest("--collect-only", "-q", "--tier", "quick")
    got = collected(result)
    grid = [ids.split("-") for ids in got["test_grid"]]
    assert len(grid) < 6
    assert {a for a, _ in grid} == {"1", "2", "3"} and {b for _, b in grid} == {"x", "y"}
    dtypes = got["test_dtypes"]  # dtype objects told apart (by repr), ids dtype0..dtype2
    assert len(dtypes) == 3 and len({ids.split("-")[0] for ids in dtypes}) == 3
    assert {ids.split("-")[1] for ids in dtypes} == {"1", "2"}
    assert len(got["test_cpu_grid"]) == 6  # CPU tests: untouched
    assert "test_cuda_single" in got  # every function keeps at least one test
    assert "test_cuda_slow" not in got  # full_tier: full tier only
    n = 14 - len(grid) - len(dtypes) - 1
    result.stdout.fnmatch_lines([f"compile_ops test tier: quick ({n} of 14 CUDA tests deselected)",
                                 f"*{n} deselected*"])


def test_option_beats_env_and_bad_values_are_refused(suite, monkeypatch):
    monkeypatch.setenv(_tier.ENV, "quick")
    result = suite.runpytest("--collect-only", "-q", "--tier", "full")
    assert len(collected(result)["test_grid"]) == 6
    monkeypatch.setenv(_tier.ENV, "fast")
    result = suite.runpytest("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown test tier 'fast'*"])


def test_quick_tier_with_marker_selection_and_cuda_skip(suite):
    """-m cuda first, the cover after; without a GPU the kept CUDA tests are still skipped."""
    result = suite.runpytest("-q", "-m", "cuda", "--tier", "quick", "-rs")
    outcomes = result.parseoutcomes()
    kept = outcomes.get("passed", 0) + outcomes.get("skipped", 0)
    assert 1 + 3 + 3 <= kept < 13  # grid (3 or more), dtypes (3), single
    assert outcomes["deselected"] == 6 + 14 - kept  # the CPU grid by -m, the rest by the tier
    if not torch.cuda.is_available():
        assert outcomes.get("skipped", 0) == kept and "passed" not in outcomes


def _fake(params, marks=()):
    """A stand-in for a collected item: callspec.params and the parametrize markers."""
    return types.SimpleNamespace(callspec=types.SimpleNamespace(params=params),
                                 iter_markers=lambda name: iter(marks))


def test_covering_subset_directly():
    mark_a = types.SimpleNamespace(args=("a",), kwargs={})
    mark_b = types.SimpleNamespace(args=("b, c",), kwargs={})
    items = [_fake({"a": a, "b": b, "c": c}, (mark_a, mark_b))
             for a in (1, 2, 3) for b, c in (("x", 0), ("y", 1))]
    kept = _tier.covering_subset(items)
    assert len(kept) == 3 and kept == [it for it in items if it in kept]  # collection order
    assert {it.callspec.params["a"] for it in kept} == {1, 2, 3}
    assert {it.callspec.params["b"] for it in kept} == {"x", "y"}
    # Cross pairs: every a with every (b, c) case (six), but b with c only as given together.
    assert len(_tier.covering_subset(items, cross_pairs=True)) == 6
    assert _tier.covering_subset(items[:1]) == items[:1]
    assert len(_tier.covering_subset([_fake({}), _fake({})])) == 1
    assert _tier.resolve_tier(None, {}) == "full"
    assert _tier.resolve_tier(None, {_tier.ENV: "quick"}) == "quick"
    with pytest.raises(ValueError):
        _tier.resolve_tier("slow", {})


def test_shards_partition_the_items_round_robin():
    items = list(range(11))
    shards = [_tier.select_shard(items, i, 3)[0] for i in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shards, [])) == items
    assert _tier.parse_shard("1/3") == (1, 3) and _tier.parse_shard(None) is None
    for bad in ("3/3", "-1/2", "a/2", "1"):
        with pytest.raises(ValueError, match="shard"):
            _tier.parse_shard(bad)


FAILING = """
import pytest


def test_passes():
    assert True


@pytest.mark.parametrize("v", [1, 2])
def test_fails(v):
    assert v == 0, f"message {v} kept"
"""


@pytest.mark.parametrize("xdist", [False, True])
def test_failure_log_gets_each_failure_once(pytester, monkeypatch, tmp_path, xdist):
    """$COMPILE_OPS_FAILURE_LOG: every failure's id and message, once each, with or without
    pytest-xdist (the workers leave the writing to the controller); nothing for a pass."""
    log = tmp_path / "failures.txt"
    monkeypatch.setenv("COMPILE_OPS_FAILURE_LOG", str(log))
    monkeypatch.delenv(_tier.ENV, raising=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))  # the subprocess imports tests
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_failing=FAILING)
    args = ["-n", "2"] if xdist else []
    result = pytester.runpytest_subprocess(*args) if xdist else pytester.runpytest(*args)
    result.assert_outcomes(passed=1, failed=2)
    text = log.read_text()
    for v in (1, 2):
        assert text.count(f"=== FAILED test_failing.py::test_fails[{v}] (call)") == 1, text
        assert f"message {v} kept" in text
    assert "test_passes" not in text
