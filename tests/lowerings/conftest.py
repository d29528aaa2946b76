import pytest
import torch

import lowerings


@pytest.fixture(autouse=True)
def fresh_compile():
    """Every test compiles from scratch: no Dynamo, AOT or FX graph cache hits (the passes must
    run, so their counters mean something), fresh counters."""
    torch._dynamo.reset()
    lowerings.reset_counters()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
