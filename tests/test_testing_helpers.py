"""compile_ops.testing's mismatch report (the message a byte-exact FP8 / INT8 test prints on the
GPU) and the test session's CPU-thread share under pytest-xdist."""

import torch

from compile_ops.testing import quant_mismatch
from tests import conftest

FP8 = torch.float8_e4m3fn


def _quantized(rows=3, cols=256):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    s = x.abs().amax(-1, keepdim=True) / 448
    return x, s, (x / s).to(FP8)


def test_equal_outputs_give_no_message():
    x, s, q = _quantized()
    assert quant_mismatch(q, q.clone(), source=x, scales=s, want_scales=s.clone()) == ""
    assert quant_mismatch(torch.empty(0, 4, dtype=FP8), torch.empty(0, 4, dtype=FP8)) == ""


def test_reports_count_distance_positions_source_and_scales():
    x, s, q = _quantized()
    bad = q.clone()
    u = bad.view(torch.uint8)
    u[1, 5] = u[1, 5] ^ 1  # one code away (same sign)
    u[2, 7] = 0x80 | 0x05 if u[2, 7] < 0x80 else 0x05  # the sign flipped: far away
    msg = quant_mismatch(bad, q, source=x, scales=s, want_scales=s)
    assert msg.startswith("2 of 768 codes differ (max code distance ")
    assert "[1, 5]: got " in msg and "[2, 7]: got " in msg
    assert f"source {x[1, 5].item()!r}" in msg and f"scale {s[1, 0].item()!r}" in msg
    dist = int(msg.split("max code distance ")[1].split(")")[0])
    assert dist > 1  # the sign flip; a lone one-code rounding would report 1


def test_one_rounding_reports_distance_one_and_limit():
    _, _, q = _quantized()
    bad = q.clone()
    u = bad.view(torch.uint8)
    for c in range(10):  # each code one step towards zero (a zero one step up)
        v = int(u[0, c])
        mag = v & 0x7F
        u[0, c] = (v & 0x80) | (mag - 1 if mag else 1)
    msg = quant_mismatch(bad, q, limit=2)
    assert "(max code distance 1)" in msg and msg.count("]: got ") == 2


def test_scales_only_and_int8_and_groups():
    x, s, q = _quantized()
    msg = quant_mismatch(q, q, scales=s, want_scales=torch.nextafter(s, torch.full_like(s, 1)))
    assert msg.startswith("codes equal; 3 of 3 scales differ, first at flat index 0")
    i = torch.randint(-128, 127, (2, 8), dtype=torch.int8)
    j = i.clone()
    j[0, 3] = j[0, 3] + 1 if j[0, 3] < 127 else 126
    assert quant_mismatch(j, i).startswith("1 of 16 codes differ (max code distance 1); [0, 3]")
    # per-group scales [rows, groups]: the column's group is reported
    gs = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 1
    bad = q.clone()
    bad.view(torch.uint8)[2, 200] ^= 1
    assert quant_mismatch(bad, q, scales=gs).endswith("scale 6.0")
    assert quant_mismatch(q[:2], q).startswith("shapes differ")


def test_xdist_workers_share_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "64")
        conftest._share_cpu_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins: left alone
        torch.set_num_threads(before)
        conftest._share_cpu_threads()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_emulated_sample_keeps_every_nth_and_the_last_of_each_function():
    from types import SimpleNamespace

    from tests.emulated.conftest import sample_items

    items = [SimpleNamespace(path=f"/t/{f}.py", originalname=fn, name=f"{fn}[{i}]")
             for f, fn, n in (("a", "t1", 7), ("a", "t2", 1), ("b", "t1", 3)) for i in range(n)]
    kept, dropped = sample_items(items, 3)
    assert [it.name for it in kept] == ["t1[0]", "t1[3]", "t1[6]", "t2[0]", "t1[0]", "t1[2]"]
    assert len(kept) + len(dropped) == len(items) and not {id(i) for i in kept} & {
        id(i) for i in dropped}
    assert sample_items(items, 1) == (items, [])
