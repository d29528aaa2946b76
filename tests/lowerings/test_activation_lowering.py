"""Gated activations lowered to aten pointwise ops under the compile_ops backend."""

import pytest
import torch
from expecttest import TestCase

import lowerings
from compile_ops.testing import assert_close

ops = torch.ops.compile_ops
ACTS = ["silu_and_mul", "mul_and_silu", "gelu_and_mul", "gelu_tanh_and_mul", "fatrelu_and_mul",
        "swigluoai_and_mul"]
EXTRA = {"fatrelu_and_mul": (0.3,), "swigluoai_and_mul": (1.5, 2.5)}


@pytest.fixture
def policy():
    """Set the lowering policy of the process-wide pass manager for one test."""
    p = next(p for p in lowerings.pass_manager().passes if p.name == "lower_activation")
    saved = p.policy

    def set_policy(value):
        p.policy = value
    yield set_policy
    p.policy = saved


class ActThenScale(torch.nn.Module):
    """activation followed by a pointwise op: Inductor can fuse them once lowered."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
        getattr(ops, self.act)(out, x, *EXTRA.get(self.act, ()))
        return out * 0.5 + 1


class GemmActGemm(torch.nn.Module):
    """The usual MLP: nothing pointwise next to the activation."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 64, bias=False)
        self.down = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):
        h = self.up(x)
        out = torch.empty(h.shape[:-1] + (32,), dtype=h.dtype, device=h.device)
        ops.silu_and_mul(out, h)
        return self.down(out)


def counts():
    return lowerings.counters().get("lower_activation", {})


def run(model, x, dtype=None):
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend="compile_ops", fullgraph=True)(x)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_lowered_next_to_a_pointwise_op(act, dtype, gen):
    x = (torch.randn(6, 64, generator=gen) * 3).to(dtype)
    run(ActThenScale(act), x)
    assert counts().get("matched") == 1
    after = lowerings.pass_manager().ops_after
    assert not any(f"compile_ops.{act}" in o for o in after), after


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fatrelu_threshold_compared_in_float32(dtype):
    """Inputs just above and below the threshold: the threshold is a float32 value, not one
    rounded to the input dtype (bf16(0.3) = 0.30078125 > 0.3), in the op and in its lowering."""
    th = 0.3
    above = torch.tensor(th, dtype=dtype)  # the input dtype's nearest value to 0.3
    near = torch.stack([above, torch.nextafter(above, torch.tensor(0., dtype=dtype)),
                        torch.nextafter(above, torch.tensor(1., dtype=dtype))])
    a = near.repeat(4)
    x = torch.cat([a, torch.full_like(a, 2.0)]).reshape(1, -1)
    expected_gate = torch.where(a.float() > th, a.float(), 0.).to(dtype)

    class M(torch.nn.Module):
        def forward(self, x):
            out = torch.empty(1, x.shape[-1] // 2, dtype=x.dtype)
            ops.fatrelu_and_mul(out, x, th)
            return out * 0.5 + 1

    with torch.no_grad():
        eager = M()(x)
        got = torch.compile(M(), backend="compile_ops", fullgraph=True)(x)
    assert counts().get("matched") == 1
    torch.testing.assert_close(eager, (expected_gate.float() * 2 * 0.5 + 1).to(dtype)[None],
                               rtol=0, atol=0)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


class TestSnapshots(TestCase):
    def test_silu_and_mul_then_scale_post_pass_ops(self):
        run(ActThenScale("silu_and_mul"), torch.randn(6, 64))
        self.assertExpectedInline("\n".join(lowerings.pass_manager().ops_after), """\
aten.add.Tensor
aten.mul.Tensor
aten.mul.Tensor
aten.mul.Tensor
aten.sigmoid.default
aten.slice.Tensor
aten.slice.Tensor""")


def test_kept_without_a_pointwise_neighbour():
    run(GemmActGemm(), torch.randn(5, 16))
    assert counts().get("matched", 0) == 0
    assert counts()["near_miss: kept the CUDA kernel: no pointwise neighbour to fuse with"] == 1
    assert "auto_functionalized(compile_ops.silu_and_mul.default)" in \
        lowerings.pass_manager().ops_after


def test_policy_always_and_never(policy):
    policy("always")
    run(GemmActGemm(), torch.randn(5, 16))
    assert counts().get("matched") == 1
    torch._dynamo.reset()
    lowerings.reset_counters()
    policy("never")
    run(ActThenScale("silu_and_mul"), torch.randn(4, 32))
    assert counts() == {}
    assert "auto_functionalized(compile_ops.silu_and_mul.default)" in \
        lowerings.pass_manager().ops_after


def test_policy_is_part_of_the_cache_key(policy):
    pm = lowerings.pass_manager()
    before = pm.uuid()
    policy("never")
    assert pm.uuid() != before


def test_bad_policy_rejected():
    from lowerings.activation_lowering import ActivationLoweringPass

    with pytest.raises(ValueError, match="COMPILE_OPS_LOWER_ACTIVATIONS must be one of"):
        ActivationLoweringPass("sometimes")


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_cuda_lowered_matches_eager(act):
    x = (torch.randn(33, 2 * 1024, device="cuda") * 3).bfloat16()
    run(ActThenScale(act), x)
    assert counts().get("matched") == 1
