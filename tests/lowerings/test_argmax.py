"""The argmax pass: aten.argmax over the last dimension -> compile_ops.argmax (greedy sampling),
on graphs: ops after the pass, match counts and near misses, compiled vs eager results."""

import pytest
import torch
from expecttest import TestCase

import lowerings
from lowerings.argmax import ArgmaxPass


@pytest.fixture
def policy():
    """Set the argmax policy of the process-wide pass manager for one test."""
    p = next(p for p in lowerings.pass_manager().passes if p.name == "argmax")
    saved = p.policy

    def set_policy(value):
        p.policy = value
    yield set_policy
    p.policy = saved


def counts():
    return lowerings.counters().get("argmax", {})


def near_misses():
    return {k: v for k, v in counts().items() if k.startswith("near_miss")}


def after():
    return "\n".join(lowerings.pass_manager().ops_after)


def compiled(fn, *xs):
    with torch.no_grad():
        return fn(*xs), torch.compile(fn, backend="compile_ops", fullgraph=True)(*xs)


class LmHeadGreedy(torch.nn.Module):
    """The end of a decode step: logits = lm_head(h); next = argmax(logits)."""

    def __init__(self, hidden=32, vocab=300, upcast=False):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.upcast = upcast

    def forward(self, h):
        logits = self.lm_head(h)
        return (logits.float() if self.upcast else logits).argmax(dim=-1), logits


def ties(rows, vocab, dtype=torch.float32):
    """Logits of small integers: many ties, so a first-vs-last tie rule shows."""
    return torch.randint(-3, 4, (rows, vocab)).to(dtype)


class TestArgmax(TestCase):
    def setUp(self):
        p = next(p for p in lowerings.pass_manager().passes if p.name == "argmax")
        self._saved, p.policy = p.policy, "always"

    def tearDown(self):
        next(p for p in lowerings.pass_manager().passes if p.name == "argmax").policy = \
            self._saved

    def test_lm_head_then_argmax(self):
        model = LmHeadGreedy().eval()
        h = torch.randn(5, 32)
        (want, wl), (got, gl) = compiled(model, h)
        self.assertTrue(torch.equal(got, want))
        self.assertEqual(counts(), {"matched": 1})
        self.assertExpectedInline(after(), """\
aten.mm.default
aten.permute.default
compile_ops.argmax.default""")
        self.assertIn("aten.argmax.default", lowerings.pass_manager().ops_before)

    def test_bf16_logits_upcast_is_looked_through(self):
        model = LmHeadGreedy(upcast=True).eval().bfloat16()
        h = torch.randn(3, 32).bfloat16()
        (want, _), (got, _) = compiled(model, h)
        self.assertTrue(torch.equal(got, want))
        self.assertEqual(counts(), {"matched": 1})
        # the kernel reads the bf16 logits: no float32 copy is made for it
        self.assertExpectedInline(after(), """\
aten.mm.default
aten.permute.default
compile_ops.argmax.default""")

    def test_keepdim_and_positive_dim(self):
        x = ties(4, 50)
        for fn in (lambda t: t.argmax(dim=1, keepdim=True), lambda t: torch.argmax(t, -1)):
            lowerings.reset_counters()
            torch._dynamo.reset()
            want, got = compiled(fn, x)
            self.assertEqual(got.shape, want.shape)
            self.assertTrue(torch.equal(got, want))
            self.assertEqual(counts(), {"matched": 1})

    def test_three_d_logits(self):
        x = ties(6, 40).view(2, 3, 40)
        want, got = compiled(lambda t: t.argmax(-1), x)
        self.assertTrue(torch.equal(got, want))
        self.assertEqual(counts(), {"matched": 1})

    def test_not_the_last_dim(self):
        x = ties(6, 40)
        want, got = compiled(lambda t: t.argmax(0), x)
        self.assertTrue(torch.equal(got, want))
        self.assertEqual(near_misses(), {"near_miss: dim is not the last dimension": 1})
        self.assertIn("aten.argmax.default", after())

    def test_no_dim(self):
        x = ties(6, 40)
        want, got = compiled(lambda t: t.argmax(), x)
        self.assertTrue(torch.equal(got, want))
        self.assertEqual(near_misses(), {"near_miss: no dim: argmax over all elements": 1})

    def test_integer_input(self):
        x = torch.randint(0, 9, (4, 30))
        want, got = compiled(lambda t: t.argmax(-1), x)
        self.assertTrue(torch.equal(got, want))
        self.assertEqual(counts().get("matched", 0), 0)
        self.assertEqual(list(near_misses()), ["near_miss: dtype torch.int64 (the kernel takes "
                                               "float32/float16/bfloat16)"])


def test_auto_policy_leaves_cpu_and_short_rows_to_inductor(policy):
    policy("auto")
    model = LmHeadGreedy(vocab=5000).eval()
    (want, _), (got, _) = compiled(model, torch.randn(2, 32))
    assert torch.equal(got, want)
    assert counts() == {"near_miss: not a CUDA tensor": 1}
    assert "aten.argmax.default" in after()


def test_never_and_bad_policy(policy, monkeypatch):
    policy("never")
    x = ties(3, 20)
    want, got = compiled(lambda t: t.argmax(-1), x)
    assert torch.equal(got, want) and counts() == {}
    monkeypatch.setenv("COMPILE_OPS_ARGMAX", "sometimes")
    with pytest.raises(ValueError, match="COMPILE_OPS_ARGMAX"):
        ArgmaxPass()


@pytest.mark.cuda
def test_cuda_auto_policy(policy):
    policy("auto")
    model = LmHeadGreedy(hidden=64, vocab=128256).eval().cuda().bfloat16()
    (want, _), (got, _) = compiled(model, torch.randn(3, 64, device="cuda").bfloat16())
    assert torch.equal(got, want)
    assert counts() == {"matched": 1}
    torch._dynamo.reset()
    lowerings.reset_counters()
    short = LmHeadGreedy(hidden=64, vocab=1000).eval().cuda()
    (want, _), (got, _) = compiled(short, torch.randn(3, 64, device="cuda"))
    assert torch.equal(got, want)
    assert counts() == {"near_miss: last dimension 1000 < 32000: Inductor's kernel is as fast": 1}
    torch._dynamo.reset()
    lowerings.reset_counters()
    # a pointwise producer: Inductor fuses it into its own argmax kernel
    x = torch.randn(2, 32768, device="cuda")
    want, got = compiled(lambda t: (t * 2 + 1).argmax(-1), x)
    assert torch.equal(got, want)
    assert list(counts()) == ["near_miss: input computed by a pointwise op: Inductor fuses it "
                              "into the argmax"]
