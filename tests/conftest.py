import os

import pytest
import torch

import compile_ops
from tests import _tier


def pytest_addoption(parser):
    parser.addoption(
        "--tier", choices=_tier.TIERS, default=None,
        help="test tier: full (default: every test) or quick (of each CUDA test function, a few "
             "parametrizations that hold every parameter value once; tests marked full_tier "
             f"left out; CPU tests unchanged). Default: ${_tier.ENV}, else full.")
    parser.addoption(
        "--shard", default=None, metavar="I/N",
        help="run shard I of N (0-based) of the selected tests, round robin over the collection "
             "order: split one suite over N device calls or machines")


def pytest_configure(config):
    try:
        config._compile_ops_tier = _tier.resolve_tier(config.getoption("--tier", default=None))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config._compile_ops_tier_counts = None  # (deselected CUDA tests, CUDA tests), once known
    try:
        config._compile_ops_shard = _tier.parse_shard(config.getoption("--shard", default=None))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    _share_cpu_threads()


def _share_cpu_threads():
    """Under pytest-xdist (``-n N``), give each worker its share of the cores for torch's CPU
    threads (the references and the CPU oracles of the CUDA tests): N workers with a full thread
    pool each oversubscribe the machine N times over. OMP_NUM_THREADS, when set, wins."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(1, int(workers))))


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU in this process"
    if not compile_ops.kernels_available():
        return f"compile_ops CUDA kernels not loaded: {compile_ops.kernels_unavailable_reason()}"
    return None


@pytest.hookimpl(trylast=True)  # after -m / -k: the tier's cover is over the tests that would run
def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason is not None:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    # The quick tier's deselection: the same whether the CUDA tests are skipped or not.
    cuda = sum(1 for it in items if it.get_closest_marker("cuda") is not None)
    if config._compile_ops_tier != "quick":
        config._compile_ops_tier_counts = (0, cuda)
    else:
        kept, deselected = _tier.select_quick(items)
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept
        config._compile_ops_tier_counts = (
            sum(1 for it in deselected if it.get_closest_marker("cuda") is not None), cuda)
    if config._compile_ops_shard is not None:
        kept, deselected = _tier.select_shard(items, *config._compile_ops_shard)
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: tell the controller
        config.workeroutput["compile_ops_tier_counts"] = config._compile_ops_tier_counts


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller collects nothing itself: take the counts from a worker (they
    all select the same tests)."""
    counts = getattr(node, "workeroutput", {}).get("compile_ops_tier_counts")
    if counts is not None:
        node.config._compile_ops_tier_counts = tuple(counts)


FAILURE_LOG_ENV = "COMPILE_OPS_FAILURE_LOG"


def pytest_runtest_logreport(report):
    """With $COMPILE_OPS_FAILURE_LOG set, append each failure's id and full report to that file
    the moment it arrives (in pytest-xdist's controller, or the only process without -n). A
    device call cut by its time limit loses pytest's end-of-run summary; this file keeps the
    messages of the failures that had happened by then."""
    path = os.environ.get(FAILURE_LOG_ENV)
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def pytest_terminal_summary(terminalreporter, config):
    counts = config._compile_ops_tier_counts
    if counts is None:
        text = "counts unknown"
    else:
        text = f"{counts[0]} of {counts[1]} CUDA tests deselected"
    terminalreporter.write_line(f"compile_ops test tier: {config._compile_ops_tier} ({text})")


@pytest.fixture
def gen():
    """A seeded CPU generator: fresh, reproducible random inputs per test."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests that draw from the global generator (model weights, plain randn) see the same numbers
    on every run, so a failure reproduces; the boundary cases that matter have explicit tests."""
    torch.manual_seed(0)


# Child processes the tests start (debug-log and interpreter tests) rewrite CPU graphs too.
os.environ.setdefault("COMPILE_OPS_PASS_DEVICES", "all")


@pytest.fixture(autouse=True)
def _passes_on_every_device():
    """The passes rewrite CPU graphs too in every test (lowerings' "all" policy): the tests
    check the rewrites on the CPU. Tests of the default policy ("auto": CPU graphs left to
    Inductor) set it themselves with ``lowerings.pass_devices("auto")``."""
    import lowerings

    with lowerings.pass_devices("all"):
        yield


@pytest.fixture
def fresh_compile():
    """Compile from scratch: no Dynamo, AOT or FX graph cache hits (the passes must run, so their
    counters mean something), fresh counters. Autouse for tests/lowerings."""
    import lowerings

    torch._dynamo.reset()
    lowerings.reset_counters()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
