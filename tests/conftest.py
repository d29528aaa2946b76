import pytest
import torch

import compile_ops


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU in this process"
    if not compile_ops.kernels_available():
        return f"compile_ops CUDA kernels not loaded: {compile_ops.kernels_unavailable_reason()}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
