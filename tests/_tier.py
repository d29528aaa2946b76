"""Test tiers (issue 15): `full` (the default) runs every test; `quick` keeps, of each CUDA-marked
test function, a few parametrizations that between them hold every value of every parameter at
least once, and leaves out tests marked `full_tier`. CPU tests are the same in both tiers.

Chosen by `pytest --tier quick` or COMPILE_OPS_TEST_TIER=quick (the option wins). The selection
is deterministic (collection order breaks ties), so pytest-xdist's workers agree on it.
"""

import os

TIERS = ("full", "quick")
ENV = "COMPILE_OPS_TEST_TIER"
# False: the quick tier covers every value of every parameter (219 of 4419 CUDA tests when this
# was written). True: also every pair of values of two parameters from different parametrize
# decorators, e.g. each dtype with each layout (514 of 4419): more coverage, 2.3 times the tests.
QUICK_CROSS_PAIRS = False


def resolve_tier(option_value, environ=None):
    """The tier: the command-line value if given, else $COMPILE_OPS_TEST_TIER, else `full`."""
    environ = os.environ if environ is None else environ
    tier = option_value or environ.get(ENV, "").strip() or "full"
    if tier not in TIERS:
        raise ValueError(f"unknown test tier {tier!r} (from --tier or {ENV}); "
                         f"one of {', '.join(TIERS)}")
    return tier


def _function_key(item):
    """Items of one test function (all its parametrizations) share this key."""
    parent = getattr(item, "parent", None)
    name = getattr(item, "originalname", None) or item.name.partition("[")[0]
    return (parent.nodeid if parent is not None else "", name)


def param_pairs(item):
    """The (parameter name, value) pairs of a parametrized item; values compared by repr, so
    dtype objects, strings and numbers all work and equal values match across items."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return frozenset()
    return frozenset((name, repr(value)) for name, value in callspec.params.items())


def _axes(item):
    """Parameter name -> its parametrize decorator (names given together, as in "a,b", share
    one); a parameter of a parametrized fixture is an axis of its own."""
    axes = {}
    for i, mark in enumerate(item.iter_markers("parametrize")):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        for name in names:
            axes.setdefault(name, i)
    return axes


def _cross_pairs(item, pairs):
    """Pairs of (parameter, value) pairs of two parameters from different axes."""
    axes = _axes(item)
    ordered = sorted(pairs)
    return {(p, q) for i, p in enumerate(ordered) for q in ordered[i + 1:]
            if axes.get(p[0], p[0]) != axes.get(q[0], q[0])}


def covering_subset(items, cross_pairs=False):
    """Greedy set cover over the items of one function: repeatedly keep the item that adds the
    most (parameter, value) pairs not yet covered (the earliest one on a tie), until every pair
    is covered; with cross_pairs, every combination of two values of parameters from different
    parametrize decorators has to be covered as well. Returns the kept items in their original
    order. One item (or items without parameters) is kept as is: at least one item of every
    function stays."""
    if len(items) <= 1:
        return list(items)
    pairs = [param_pairs(it) for it in items]
    if cross_pairs:
        pairs = [p | _cross_pairs(it, p) for it, p in zip(items, pairs)]
    uncovered = set().union(*pairs)
    kept = set()
    if not uncovered:
        kept.add(0)
    while uncovered:
        best, gain = None, 0
        for i, p in enumerate(pairs):
            if i in kept:
                continue
            g = len(p & uncovered)
            if g > gain:
                best, gain = i, g
        kept.add(best)
        uncovered -= pairs[best]
    return [it for i, it in enumerate(items) if i in kept]


def _is_cuda(item):
    return item.get_closest_marker("cuda") is not None


def _is_full_tier(item):
    return item.get_closest_marker("full_tier") is not None


def select_quick(items, cross_pairs=None):
    """Split items into (kept, deselected) for the quick tier. Tests marked `full_tier` go; of
    the other CUDA-marked items, each function keeps its covering subset; the rest (CPU tests)
    all stay. Kept items stay in collection order."""
    groups = {}
    for item in items:
        if _is_cuda(item) and not _is_full_tier(item):
            groups.setdefault(_function_key(item), []).append(item)
    cross_pairs = QUICK_CROSS_PAIRS if cross_pairs is None else cross_pairs
    keep = set()
    for group in groups.values():
        keep.update(id(it) for it in covering_subset(group, cross_pairs))
    kept, deselected = [], []
    for item in items:
        if _is_full_tier(item) or (_is_cuda(item) and id(item) not in keep):
            deselected.append(item)
        else:
            kept.append(item)
    return kept, deselected


def parse_shard(text):
    """"I/N" (0 <= I < N) -> (I, N); None -> None."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects I/N with integers, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def select_shard(items, i, n):
    """Round robin over the collection order: shard i of n keeps items i, i + n, i + 2n, ...
    The parametrizations of one test function (neighbours in that order, often of similar
    cost) spread over the shards, so N machines share a suite evenly. Returns (kept,
    deselected)."""
    kept = [it for k, it in enumerate(items) if k % n == i]
    deselected = [it for k, it in enumerate(items) if k % n != i]
    return kept, deselected
