"""The shared input checks: overlap detection against a brute-force element comparison."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compile_ops import _checks as C


def _elements(t: torch.Tensor) -> set:
    """Storage offsets of every element of a view (brute force)."""
    base = t.storage_offset()
    idx = torch.zeros((), dtype=torch.long)
    for size, stride in zip(t.shape, t.stride()):
        idx = idx.unsqueeze(-1) + torch.arange(size) * stride
    return set((idx.flatten() + base).tolist())


def _raises(a, b) -> bool:
    try:
        C.check_no_partial_overlap("op", "a", a, "b", b, allow_same=False)
    except ValueError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(2, 24), data=st.data())
def test_column_slices_of_one_buffer(rows, width, data):
    buf = torch.zeros(rows, width)
    a0 = data.draw(st.integers(0, width - 1))
    a1 = data.draw(st.integers(a0 + 1, width))
    b0 = data.draw(st.integers(0, width - 1))
    b1 = data.draw(st.integers(b0 + 1, width))
    r0 = data.draw(st.integers(0, rows - 1))
    a = buf[:, a0:a1]
    b = buf[r0:, b0:b1]
    overlap = bool(_elements(a) & _elements(b))
    assert _raises(a, b) == overlap


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 40), data=st.data())
def test_flat_ranges(n, data):
    buf = torch.zeros(n)
    i0 = data.draw(st.integers(0, n - 1))
    i1 = data.draw(st.integers(i0 + 1, n))
    j0 = data.draw(st.integers(0, n - 1))
    j1 = data.draw(st.integers(j0 + 1, n))
    a, b = buf[i0:i1], buf[j0:j1]
    assert _raises(a, b) == bool(_elements(a) & _elements(b))


def test_separate_storages_and_same_view():
    a, b = torch.zeros(4, 8), torch.zeros(4, 8)
    assert not _raises(a, b)
    with pytest.raises(ValueError, match="a and b overlap in memory"):
        C.check_no_partial_overlap("op", "a", a, "b", a, allow_same=False)
    C.check_no_partial_overlap("op", "a", a, "b", a, allow_same=True)  # in place is allowed


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 4), a=st.integers(1, 4), b=st.integers(1, 5), data=st.data())
def test_permuted_halves_of_one_buffer(n, a, b, data):
    """FlashInfer's HND caches: key = kv[:, 0] and value = kv[:, 1] of one [n, 2, a, b] buffer,
    each with its inner dims permuted or not (issue 15: rejected as overlapping before); the same
    half twice does overlap."""
    kv = torch.zeros(n, 2, a, b)
    i, j = data.draw(st.integers(0, 1)), data.draw(st.integers(0, 1))
    pa, pb = data.draw(st.permutations([1, 2])), data.draw(st.permutations([1, 2]))
    x, y = kv[:, i].permute(0, *pa), kv[:, j].permute(0, *pb)
    assert _raises(x, y) == bool(_elements(x) & _elements(y))
