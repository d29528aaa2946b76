"""fused_allreduce_add_rms_norm: the reference (pure and over gloo), errors before any write, the
fake kernel, opcheck, torch.compile; on >= 2 GPUs the symmetric-memory kernels (one-shot and
two-shot) against the reference and the NCCL fallback, byte for byte.

The distributed cases run in ONE pair of processes per device kind (spawned once per module:
starting processes dominates the time), every rank saving its results; the tests compare them.
"""

import os
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch

import compile_ops
from compile_ops.allreduce_norm import fused_allreduce_add_rms_norm_ref
from compile_ops.norm import fused_add_rms_norm_ref
from compile_ops.testing import assert_close, assert_raises_eager_and_fake, rows_tensor

ops = torch.ops.compile_ops
EPS = 1e-6
WORLD = 2

# (name, dtype, shape, row_pad): odd token counts, hidden sizes that are and are not a multiple
# of a 128-bit pack, a strided and a misaligned row layout, a 3-D input.
CPU_CASES = [
    (f"{str(dt)[6:]}-{t}x{h}", dt, (t, h), 0)
    for dt in (torch.float32, torch.bfloat16, torch.float16)
    for t in (1, 7, 33)
    for h in (64, 96)
] + [
    ("bfloat16-strided", torch.bfloat16, (7, 96), 64),
    ("float32-misaligned", torch.float32, (5, 64), 11),
    ("float16-3d", torch.float16, (2, 5, 96), 0),
    ("float32-hidden-97", torch.float32, (3, 97), 0),
]


def _inputs(seed: int, rank: int, dtype, shape, row_pad: int = 0, device="cpu"):
    """(input of `rank`, residual of `rank`, weight): reproducible in any process. The
    residuals differ between ranks (the op must not assume them replicated); the weight is the
    same on every rank."""
    hidden = shape[-1]
    tokens = 1
    for s in shape[:-1]:
        tokens *= s
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = rows_tensor(tokens, hidden, dtype, device, row_pad=row_pad, generator=g)
    r = rows_tensor(tokens, hidden, dtype, device, row_pad=row_pad, generator=g)
    w = rows_tensor(1, hidden, dtype, device,
                    generator=torch.Generator().manual_seed(1000 * seed + 999))[0]
    if len(shape) > 2:
        x, r = x.reshape(shape), r.reshape(shape)
    return x, r, w


def _expected(seed, rank, dtype, shape, row_pad=0, world=WORLD, eps=EPS):
    xs = [_inputs(seed, p, dtype, shape, row_pad)[0] for p in range(world)]
    _, r, w = _inputs(seed, rank, dtype, shape, row_pad)
    return fused_allreduce_add_rms_norm_ref(xs, r, w, eps)


# ---------------------------------------------------------------------------------------------
# The pair of processes
# ---------------------------------------------------------------------------------------------
def _run_pair(worker, tmp_dir, backend, timeout_s):
    """Run worker(rank, world, init_file, out_prefix) on WORLD spawned processes; each saves a
    dict of results. Returns [results of rank 0, results of rank 1]."""
    import torch.multiprocessing as mp

    init_file = os.path.join(tmp_dir, f"init_{backend}")
    prefix = os.path.join(tmp_dir, f"out_{backend}")
    ctx = mp.start_processes(worker, args=(WORLD, init_file, prefix), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"the {backend} pair did not finish in {timeout_s} s "
                                 "(a collective or a barrier hangs)")
    return [torch.load(f"{prefix}.{r}", weights_only=False) for r in range(WORLD)]


def _init(backend, rank, world, init_file):
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    return dist.group.WORLD.group_name


def _attempt(results, name, fn):
    """Run one case; a failure is recorded, not raised (the other rank would wait forever in
    the next collective), and reported by the test that reads `name`."""
    try:
        results[name] = fn()
    except Exception:  # noqa: BLE001
        results[name] = {"__error__": traceback.format_exc()}


def _cpu_worker(rank, world, init_file, prefix):
    import torch.distributed as dist

    os.environ["COMPILE_OPS_ALLREDUCE"] = "auto"
    group = _init("gloo", rank, world, init_file)
    results = {}

    for seed, (name, dtype, shape, pad) in enumerate(CPU_CASES):
        def case(seed=seed, dtype=dtype, shape=shape, pad=pad):
            x, r, w = _inputs(seed, rank, dtype, shape, pad)
            x0, r0 = x.clone(), r.clone()
            ops.fused_allreduce_add_rms_norm(x, r, w, EPS, group)
            # The brief's definition, independently: gloo's all_reduce, then fused_add_rms_norm.
            s = x0.contiguous()
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
            oracle = fused_add_rms_norm_ref(s, r0, w, EPS)
            return {"out": x.clone(), "res": r.clone(), "oracle": oracle}
        _attempt(results, name, case)

    def wrapper():
        x, r, w = _inputs(100, rank, torch.bfloat16, (7, 64))
        sub = dist.new_group([0, 1])  # another group name, resolved by name
        got = {"none": compile_ops.fused_allreduce_add_rms_norm(x, r, w, 1e-5),
               "pg": compile_ops.fused_allreduce_add_rms_norm(x, r, w, 1e-5, dist.group.WORLD),
               "sub": compile_ops.fused_allreduce_add_rms_norm(x, r, w, 1e-5, sub.group_name),
               "untouched": torch.equal(x, _inputs(100, rank, torch.bfloat16, (7, 64))[0])}
        return got
    _attempt(results, "wrapper", wrapper)

    def errors():
        x, r, w = _inputs(101, rank, torch.float32, (7, 64))
        x0, r0 = x.clone(), r.clone()
        bad = {
            "unknown group": lambda: ops.fused_allreduce_add_rms_norm(x, r, w, EPS, "no-such"),
            "weight shape": lambda: ops.fused_allreduce_add_rms_norm(x, r, w[:32], EPS, group),
            "residual dtype": lambda: ops.fused_allreduce_add_rms_norm(
                x, r.to(torch.bfloat16), w, EPS, group),
            "weight dtype": lambda: ops.fused_allreduce_add_rms_norm(
                x, r, w.to(torch.float16), EPS, group),
            "residual shape": lambda: ops.fused_allreduce_add_rms_norm(x, r[:3], w, EPS, group),
            "int input": lambda: ops.fused_allreduce_add_rms_norm(
                x.to(torch.int32), r.to(torch.int32), w, EPS, group),
            "overlap": lambda: ops.fused_allreduce_add_rms_norm(x, x, w, EPS, group),
            "epsilon": lambda: ops.fused_allreduce_add_rms_norm(x, r, w, -1.0, group),
        }
        got = {}
        for k, call in bad.items():
            try:
                call()
                got[k] = ("no error", "")
            except Exception as e:  # noqa: BLE001
                got[k] = (type(e).__name__, str(e))
        got["untouched"] = torch.equal(x, x0) and torch.equal(r, r0)
        return got
    _attempt(results, "errors", errors)

    def opcheck():
        x, r, w = _inputs(102, rank, torch.float32, (5, 64))
        torch.library.opcheck(ops.fused_allreduce_add_rms_norm.default, (x, r, w, EPS, group))
        return True
    _attempt(results, "opcheck", opcheck)

    def compiled():
        def f(x, r, w):
            x = x * 2.0
            ops.fused_allreduce_add_rms_norm(x, r, w, EPS, group)
            return x + 1.0, r
        x, r, w = _inputs(103, rank, torch.float32, (7, 96))
        eager = f(x.clone(), r.clone(), w)
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(x.clone(), r.clone(), w)
        return {"eager": eager, "compiled": got}
    _attempt(results, "compile", compiled)

    torch.save(results, f"{prefix}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cpu_pair():
    with tempfile.TemporaryDirectory() as d:
        yield _run_pair(_cpu_worker, d, "gloo", timeout_s=180)


def _ok(result):
    if isinstance(result, dict) and "__error__" in result:
        pytest.fail(result["__error__"])
    return result


# ---------------------------------------------------------------------------------------------
# The pure reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ref_two_ranks_is_the_sum_in_the_dtype(dtype):
    x0, r, w = _inputs(7, 0, dtype, (33, 96))
    x1 = _inputs(7, 1, dtype, (33, 96))[0]
    out, res = fused_allreduce_add_rms_norm_ref([x0, x1], r, w, EPS)
    e_out, e_res = fused_add_rms_norm_ref(x0 + x1, r, w, EPS)
    assert torch.equal(out, e_out) and torch.equal(res, e_res)


def test_ref_accumulates_in_float32_in_rank_order():
    xs = [_inputs(8, p, torch.bfloat16, (7, 64))[0] for p in range(4)]
    _, r, w = _inputs(8, 0, torch.bfloat16, (7, 64))
    s = (((xs[0].float() + xs[1].float()) + xs[2].float()) + xs[3].float()).bfloat16()
    out, res = fused_allreduce_add_rms_norm_ref(xs, r, w, EPS)
    e_out, e_res = fused_add_rms_norm_ref(s, r, w, EPS)
    assert torch.equal(out, e_out) and torch.equal(res, e_res)
    one_out, _ = fused_allreduce_add_rms_norm_ref(xs[:1], r, w, EPS)
    assert torch.equal(one_out, fused_add_rms_norm_ref(xs[0], r, w, EPS)[0])


# ---------------------------------------------------------------------------------------------
# Two gloo ranks (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_two_ranks_match_reference(cpu_pair, case):
    seed = CPU_CASES.index(case)
    name, dtype, shape, pad = case
    for rank in range(WORLD):
        got = _ok(cpu_pair[rank][name])
        e_out, e_res = _expected(seed, rank, dtype, shape, pad)
        assert got["out"].shape == shape and got["out"].dtype == dtype
        assert torch.equal(got["out"], e_out.reshape(shape)), f"rank {rank} input"
        assert torch.equal(got["res"], e_res.reshape(shape)), f"rank {rank} residual"
        # gloo's all_reduce + fused_add_rms_norm (the op's definition) agrees byte for byte
        assert torch.equal(got["out"], got["oracle"][0].reshape(shape))
        assert torch.equal(got["res"], got["oracle"][1].reshape(shape))


def test_two_ranks_wrapper_and_groups(cpu_pair):
    for rank in range(WORLD):
        got = _ok(cpu_pair[rank]["wrapper"])
        e_out, e_res = _expected(100, rank, torch.bfloat16, (7, 64), eps=1e-5)
        for key in ("none", "pg", "sub"):
            assert torch.equal(got[key][0], e_out) and torch.equal(got[key][1], e_res), key
        assert got["untouched"], "the functional wrapper wrote its input"


ERRORS = {
    "unknown group": ("ValueError", "group_name 'no-such' is not a registered process group"),
    "weight shape": ("ValueError", "weight must be a 1-D tensor of size 64"),
    "residual dtype": ("TypeError", "residual must have dtype torch.float32"),
    "weight dtype": ("TypeError", "weight must have dtype torch.float32"),
    "residual shape": ("ValueError", "residual must have the shape of input"),
    "int input": ("TypeError", "input must be float32, float16 or bfloat16"),
    "overlap": ("ValueError", "input and residual overlap in memory"),
    "epsilon": ("ValueError", "epsilon must be finite and >= 0"),
}


@pytest.mark.parametrize("what", sorted(ERRORS))
def test_two_ranks_bad_inputs_raise_before_writing(cpu_pair, what):
    for rank in range(WORLD):
        got = _ok(cpu_pair[rank]["errors"])
        exc, fragment = ERRORS[what]
        assert got[what][0] == exc, got[what]
        assert fragment in got[what][1] and "fused_allreduce_add_rms_norm" in got[what][1], \
            got[what]
        assert got["untouched"], "a failing call wrote input or residual"


def test_two_ranks_opcheck(cpu_pair):
    for rank in range(WORLD):
        assert _ok(cpu_pair[rank]["opcheck"]) is True


def test_two_ranks_torch_compile(cpu_pair):
    for rank in range(WORLD):
        got = _ok(cpu_pair[rank]["compile"])
        for a, b in zip(got["compiled"], got["eager"]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Single process: schema, fake kernel, errors without a process group
# ---------------------------------------------------------------------------------------------
def test_schema():
    assert str(ops.fused_allreduce_add_rms_norm.default._schema) == (
        "compile_ops::fused_allreduce_add_rms_norm(Tensor(a0!) input, Tensor(a1!) residual, "
        "Tensor weight, float epsilon, str group_name) -> ()")
    assert "compile_ops::fused_allreduce_add_rms_norm" in compile_ops.registered_ops()
    assert "fused_allreduce_add_rms_norm" in compile_ops.__all__


def test_fake_needs_no_process_group():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 96, dtype=torch.bfloat16)
        r = torch.empty(7, 96, dtype=torch.bfloat16)
        w = torch.empty(96, dtype=torch.bfloat16)
        assert ops.fused_allreduce_add_rms_norm(x, r, w, EPS, "any-group") is None


def test_errors_eager_and_fake_agree():
    x, r, w = _inputs(9, 0, torch.float32, (7, 64))
    call = lambda: ops.fused_allreduce_add_rms_norm(x, r, w[:32], EPS, "0")  # noqa: E731
    assert_raises_eager_and_fake(call, ValueError, "weight must be a 1-D tensor of size 64")
    bad = r.to(torch.bfloat16)
    call = lambda: ops.fused_allreduce_add_rms_norm(x, bad, w, EPS, "0")  # noqa: E731
    assert_raises_eager_and_fake(call, TypeError, "residual must have dtype torch.float32")


def test_without_process_group_names_group_name():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x, r, w = _inputs(10, 0, torch.float32, (3, 64))
    x0, r0 = x.clone(), r.clone()
    with pytest.raises(ValueError, match="group_name '0': torch.distributed is not initialized"):
        ops.fused_allreduce_add_rms_norm(x, r, w, EPS, "0")
    assert torch.equal(x, x0) and torch.equal(r, r0)
    with pytest.raises(ValueError, match="group=None needs torch.distributed"):
        compile_ops.fused_allreduce_add_rms_norm(x, r, w)


def test_algorithm_choice(monkeypatch):
    from compile_ops import allreduce_norm as mod

    monkeypatch.delenv("COMPILE_OPS_ALLREDUCE", raising=False)
    big = mod._TWO_SHOT_MIN_BYTES
    assert mod._choose_mode(big * 16, 2) == 0  # 2 ranks: one-shot moves no more data
    assert mod._choose_mode(big - 2, 4) == 0
    assert mod._choose_mode(big, 4) == 1
    monkeypatch.setenv("COMPILE_OPS_ALLREDUCE", "twoshot")
    assert mod._choose_mode(64, 2) == 1
    monkeypatch.setenv("COMPILE_OPS_ALLREDUCE", "oneshot")
    assert mod._choose_mode(big * 16, 8) == 0
    monkeypatch.setenv("COMPILE_OPS_ALLREDUCE", "fast")
    with pytest.raises(ValueError, match="COMPILE_OPS_ALLREDUCE must be one of"):
        mod._choose_mode(64, 2)
    monkeypatch.setenv("COMPILE_OPS_ALLREDUCE_MAX_MB", "0.5")
    assert mod._max_bytes() == 512 * 1024


# ---------------------------------------------------------------------------------------------
# Two GPUs: the symmetric-memory kernels
# ---------------------------------------------------------------------------------------------
# (name, dtype, shape, row_pad). 2 ranks pick one-shot in auto mode; each case also runs forced
# two-shot. Aligned and scalar (hidden 97, odd pad) paths; more rows than blocks (4099).
CUDA_CASES = [
    (f"{str(dt)[6:]}-{t}x{h}", dt, (t, h), 0)
    for dt in (torch.bfloat16, torch.float16, torch.float32)
    for t in (1, 7, 128)
    for h in (64, 96, 4096)
] + [
    ("bfloat16-1x8192", torch.bfloat16, (1, 8192), 0),
    ("bfloat16-33x8192", torch.bfloat16, (33, 8192), 0),
    ("bfloat16-4099x768", torch.bfloat16, (4099, 768), 0),
    ("float32-7x97", torch.float32, (7, 97), 0),
    ("bfloat16-7x4096-strided", torch.bfloat16, (7, 4096), 64),
    ("float16-5x4096-misaligned", torch.float16, (5, 4096), 11),
]
CUDA_MODES = ("oneshot", "twoshot", "auto", "nccl")


def _cuda_worker(rank, world, init_file, prefix):
    import torch.distributed as dist

    from compile_ops import allreduce_norm as mod

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    group = _init("nccl", rank, world, init_file)
    results = {}

    def run(mode, seed, dtype, shape, pad):
        os.environ["COMPILE_OPS_ALLREDUCE"] = mode
        x, r, w = _inputs(seed, rank, dtype, shape, pad, device=dev)  # strided rows stay so
        ops.fused_allreduce_add_rms_norm(x, r, w, EPS, group)
        return x.cpu(), r.cpu()

    for seed, (name, dtype, shape, pad) in enumerate(CUDA_CASES):
        def case(seed=seed, dtype=dtype, shape=shape, pad=pad):
            got = {m: run(m, seed, dtype, shape, pad) for m in CUDA_MODES}
            torch.cuda.synchronize()
            return got
        _attempt(results, name, case)

    def workspace():
        os.environ["COMPILE_OPS_ALLREDUCE"] = "auto"
        return {"peer_access": mod._peer_access_ok(dev),
                "set_up": {str(k): v is not None for k, v in mod._WORKSPACES.items()}}
    _attempt(results, "workspace", workspace)

    def stress():
        # Back-to-back launches of changing shapes and modes, no host sync in between: the
        # flags of one launch must be consumed before the next reuses them. Compared with the
        # NCCL fallback on the same inputs.
        outs = []
        for i in range(60):
            name, dtype, shape, pad = CUDA_CASES[i % len(CUDA_CASES)]
            os.environ["COMPILE_OPS_ALLREDUCE"] = ("oneshot", "twoshot")[i % 2]
            x, r, w = (t.to(dev) for t in _inputs(i % len(CUDA_CASES), rank, dtype, shape))
            ops.fused_allreduce_add_rms_norm(x, r, w, EPS, group)
            outs.append((name, x, r))
        os.environ["COMPILE_OPS_ALLREDUCE"] = "nccl"
        nccl = []
        for i in range(60):
            name, dtype, shape, pad = CUDA_CASES[i % len(CUDA_CASES)]
            x, r, w = (t.to(dev) for t in _inputs(i % len(CUDA_CASES), rank, dtype, shape))
            ops.fused_allreduce_add_rms_norm(x, r, w, EPS, group)
            nccl.append(x)
        torch.cuda.synchronize()
        return [(n, x.cpu(), r.cpu(), y.cpu()) for (n, x, r), y in zip(outs, nccl)]
    _attempt(results, "stress", stress)

    def graph():
        os.environ["COMPILE_OPS_ALLREDUCE"] = "auto"
        x, r, w = (t.to(dev) for t in _inputs(3, rank, torch.bfloat16, (7, 4096)))
        x0, r0 = x.clone(), r.clone()
        ops.fused_allreduce_add_rms_norm(x, r, w, EPS, group)  # workspace set up eagerly
        eager = (x.cpu(), r.cpu())
        x.copy_(x0)
        r.copy_(r0)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ops.fused_allreduce_add_rms_norm(x, r, w, EPS, group)
        outs = []
        for _ in range(3):
            x.copy_(x0)
            r.copy_(r0)
            g.replay()
            outs.append((x.cpu(), r.cpu()))
        return {"eager": eager, "replays": outs}
    _attempt(results, "graph", graph)

    def too_large():
        os.environ["COMPILE_OPS_ALLREDUCE"] = "auto"
        os.environ["COMPILE_OPS_ALLREDUCE_MAX_MB"] = "0.001"  # 1 KiB: everything goes to NCCL
        try:
            return run("auto", 4, torch.bfloat16, (7, 4096), 0)
        finally:
            del os.environ["COMPILE_OPS_ALLREDUCE_MAX_MB"]
    _attempt(results, "too_large", too_large)

    torch.save(results, f"{prefix}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _two_gpus_reason():
    if torch.cuda.device_count() < 2:
        return f"needs 2 GPUs, found {torch.cuda.device_count()}"
    if not hasattr(getattr(compile_ops._extension, "_C", None), "fused_allreduce_add_rms_norm"):
        return "compile_ops._C has no fused_allreduce_add_rms_norm (rebuild the kernels)"
    return None


@pytest.fixture(scope="module")
def cuda_pair():
    reason = _two_gpus_reason()
    if reason:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory() as d:
        yield _run_pair(_cuda_worker, d, "nccl", timeout_s=600)


@pytest.mark.cuda
def test_cuda_symmetric_memory_workspace_set_up(cuda_pair):
    for rank in range(WORLD):
        got = _ok(cuda_pair[rank]["workspace"])
        if not got["peer_access"]:
            pytest.skip("the GPUs have no peer access: symmetric memory is not used (NCCL)")
        ws = got["set_up"]
        assert ws and all(ws.values()), f"symmetric memory not available on rank {rank}: {ws}"


def _check_cuda_result(out, res, e_out, e_res, nccl_out, what):
    # The reduced sum and the residual are exact: bytes equal to the reference. The normalized
    # output goes through the GPU's reduction order and rsqrtf: close to the CPU reference, and
    # bytes equal to the NCCL fallback (all_reduce + fused_add_rms_norm, the same order).
    assert torch.equal(res, e_res), f"{what}: residual"
    assert_close(out, e_out, msg=f"{what}: input")
    assert torch.equal(out, nccl_out), f"{what}: input differs from the NCCL fallback's"


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_symmetric_memory_matches_reference_and_nccl(cuda_pair, case):
    seed = CUDA_CASES.index(case)
    name, dtype, shape, pad = case
    for rank in range(WORLD):
        got = _ok(cuda_pair[rank][name])
        e_out, e_res = _expected(seed, rank, dtype, shape, pad)
        for mode in CUDA_MODES:
            out, res = got[mode]
            _check_cuda_result(out, res, e_out, e_res, got["nccl"][0], f"rank {rank} {mode}")


@pytest.mark.cuda
def test_cuda_back_to_back_launches(cuda_pair):
    for rank in range(WORLD):
        for i, (name, out, res, nccl_out) in enumerate(_ok(cuda_pair[rank]["stress"])):
            _, dtype, shape, _ = CUDA_CASES[i % len(CUDA_CASES)]
            e_out, e_res = _expected(i % len(CUDA_CASES), rank, dtype, shape)
            _check_cuda_result(out, res, e_out, e_res, nccl_out, f"rank {rank} #{i} {name}")


@pytest.mark.cuda
def test_cuda_graph_replay(cuda_pair):
    for rank in range(WORLD):
        got = _ok(cuda_pair[rank]["graph"])
        e_out, e_res = _expected(3, rank, torch.bfloat16, (7, 4096))
        for out, res in got["replays"]:
            _check_cuda_result(out, res, e_out, e_res, got["eager"][0], f"rank {rank} replay")


@pytest.mark.cuda
def test_cuda_input_larger_than_workspace_falls_back(cuda_pair):
    for rank in range(WORLD):
        out, res = _ok(cuda_pair[rank]["too_large"])
        e_out, e_res = _expected(4, rank, torch.bfloat16, (7, 4096))
        assert torch.equal(res, e_res)
        assert_close(out, e_out)
