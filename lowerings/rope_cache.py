"""Fusion: ``rotary_embedding`` then ``reshape_and_cache_flash`` (or ``reshape_and_cache``, vLLM's
paged layout) of the rotated key -> one ``compile_ops.fused_rope_and_cache_flash`` (or
``compile_ops.fused_rope_and_cache``).

Matches, in the functionalized post-grad graph (both ops are auto_functionalized_v2 nodes whose
mutable arguments are views of bases)::

    R  = auto_functionalized_v2(compile_ops.rotary_embedding.default, positions=.., head_size=hd,
                                cos_sin_cache=.., is_neox=b, _query_*=.., _key_*=..,
                                _all_bases=[qkv])
    qkv' = getitem(R, 1)
    K  = views of qkv' (split / getitem / slice / view / reshape)     # the rotated key rows
    V  = any tensor, or views (and copies: ``.contiguous()``) of qkv'
    Cn = auto_functionalized_v2(compile_ops.reshape_and_cache_flash.default (or
                                compile_ops.reshape_and_cache.default), key=K, value=V,
                                slot_mapping=.., kv_cache_dtype=s, k_scale=.., v_scale=..,
                                _key_cache_*=.., _value_cache_*=.., _all_bases=[kc, vc])

and rewrites both as one auto_functionalized_v2 of the fused op at R's place, whose bases are
R's and Cn's: every user of qkv' and of the new caches reads the fused node's results, so each
user of the rotated query and key sees the same values. ``write_key`` is False only when nothing
but the cache write reads the rotated key.

Never rewritten (each a logged near miss): K is not exactly the rotated key rows seen as
[tokens, heads, head_size] (a copy, another slice, a transpose...), head_size / is_neox /
kv_cache_dtype not constants, the rotated base mutated before the cache write, a V that
overlaps the rotated query/key or is computed after R, cache write arguments computed after R,
the caches used between R and the cache write, v1 auto_functionalized nodes.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.add_rms_norm import _is_mutated
from lowerings.passes import FusionPass

aten = torch.ops.aten
AFV2 = torch.ops.higher_order.auto_functionalized_v2
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.slice.Tensor, aten.alias.default, aten.split_with_sizes.default,
            aten.split.Tensor, aten.unsqueeze.default, aten.squeeze.dim)
MUTABLE_PREFIXES = ("_query_", "_key_")


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


COPY_OPS = (aten.clone.default, aten._to_copy.default)
# Most tokens a paged fusion takes. bench_rope_cache --layout paged on the H200 (session 7): the
# fused kernel is 1.1-1.9x faster than rotary_embedding + reshape_and_cache up to 256 tokens
# (decode steps), 0.57x at 1024 and 0.44x at 4096 in runs of consecutive slots (a prefill),
# 0.6x at random slots: its per-token value stores are what the unfused kernels avoid.
PAGED_MAX_TOKENS = 256


def _chain_root(node: torch.fx.Node, copies: bool = False):
    """Walk view ops (and getitem of a split; with `copies`, clones too) up to the first other
    node: (root, [chain nodes, from `node` back])."""
    chain = []
    cur = node
    while isinstance(cur, torch.fx.Node) and cur.op == "call_function":
        if copies and cur.target in COPY_OPS and isinstance(cur.args[0], torch.fx.Node):
            chain.append(cur)
            cur = cur.args[0]
            continue
        if cur.target is operator.getitem and isinstance(cur.args[0], torch.fx.Node) and \
                cur.args[0].target in (aten.split_with_sizes.default, aten.split.Tensor):
            chain.append(cur)
            cur = cur.args[0]
            continue
        if cur.target in VIEW_OPS:
            chain.append(cur)
            cur = cur.args[0]
            continue
        break
    return cur, chain


def _rows(t: torch.Tensor, base: torch.Tensor):
    """(offset from base, rows, row stride, row length) of a tensor whose dims after the first are
    packed; None if not provably so."""
    if t is None or base is None or t.dim() < 1:
        return None
    inner = 1
    for d in range(t.dim() - 1, 0, -1):
        if not statically_known_true(t.size(d) == 1) and \
                not statically_known_true(t.stride(d) == inner):
            return None
        inner = inner * t.size(d)
    return (t.storage_offset() - base.storage_offset(), t.size(0), t.stride(0), inner)


def _heads_packed(t: torch.Tensor, lead: int) -> bool:
    """The dims after the positions' `lead` dims are packed (each token's heads contiguous), as
    the fused RoPE + cache ops require; rotary_embedding alone also takes strided heads."""
    inner = 1
    for d in range(t.dim() - 1, lead - 1, -1):
        if not statically_known_true(t.size(d) == 1) and \
                not statically_known_true(t.stride(d) == inner):
            return False
        inner = inner * t.size(d)
    return True


def _same(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        statically_known_true(x == y) for x, y in zip(a, b))


def _spec(node: torch.fx.Node, name: str, bases: list):
    """The view of base kwargs `_<name>_*` describes, as a tensor built on the base's meta."""
    kw = node.kwargs
    idx = kw.get(f"_{name}_base_index")
    if idx is None:
        return None, None
    base = _val(bases[idx])
    if base is None:
        return idx, None
    if kw.get(f"_{name}_alias"):
        return idx, base
    if f"_{name}_slice_dim" in kw:
        return idx, aten.slice.Tensor(base, kw[f"_{name}_slice_dim"], kw[f"_{name}_slice_start"],
                                      kw[f"_{name}_slice_end"])
    if f"_{name}_size" in kw:
        return idx, base.as_strided(kw[f"_{name}_size"], kw[f"_{name}_stride"],
                                    kw[f"_{name}_storage_offset"])
    return idx, base


def _rotated(key) -> bool:
    """Whether a cache write's key is a view of a rotary_embedding result."""
    root, _ = _chain_root(key)
    return (isinstance(root, torch.fx.Node) and root.target is operator.getitem and
            isinstance(root.args[0], torch.fx.Node) and root.args[0].target is AFV2 and
            root.args[0].args[0] is torch.ops.compile_ops.rotary_embedding.default)


class RopeCachePass(FusionPass):
    name = "rope_cache"

    def apply(self, graph: torch.fx.Graph) -> int:
        cache_op = torch.ops.compile_ops.reshape_and_cache_flash.default
        rope_op = torch.ops.compile_ops.rotary_embedding.default
        paged_op = torch.ops.compile_ops.reshape_and_cache.default
        v1 = torch.ops.higher_order.auto_functionalized
        matches = 0
        for n in list(graph.nodes):
            if n.op != "call_function":
                continue
            if n.target is v1 and n.args[0] in (cache_op, paged_op, rope_op):
                self.near_miss("auto_functionalized v1 node (needs auto_functionalized_v2)", n)
            if n.target is AFV2 and n.args[0] in (cache_op, paged_op) and \
                    self._try_fuse(graph, n):
                matches += 1
        return matches

    def _try_fuse(self, graph: torch.fx.Graph, cn: torch.fx.Node) -> bool:
        kw = cn.kwargs
        root, k_chain = _chain_root(kw.get("key"))
        if not _rotated(kw.get("key")):
            self.near_miss("cache key is not a view of a rotary_embedding result", cn)
            return False
        r = root.args[0]
        rkw = r.kwargs
        bases = list(rkw["_all_bases"])
        new_base_idx = root.args[1] - 1
        head_size, is_neox, kv_dtype = rkw.get("head_size"), rkw.get("is_neox"), \
            kw.get("kv_cache_dtype")
        if not (isinstance(head_size, int) and isinstance(is_neox, bool) and
                isinstance(kv_dtype, str)):
            self.near_miss("head_size, is_neox or kv_cache_dtype is not a constant", cn)
            return False
        if rkw.get("rope_dim_offset", 0) != 0 or rkw.get("inverse", False) is not False:
            self.near_miss("rotary_embedding with rope_dim_offset or inverse (the fused ops have "
                           "neither)", cn)
            return False
        k_idx, k_view = _spec(r, "key", bases)
        q_idx, q_view = _spec(r, "query", bases)
        if k_idx is None:
            self.near_miss("rotary_embedding without a key", r)
            return False
        lead = _val(rkw.get("positions"))
        if q_view is not None and (lead is None or not _heads_packed(q_view, lead.dim())):
            self.near_miss("query heads are strided (the fused ops take packed heads)", cn)
            return False
        if k_idx != new_base_idx:
            self.near_miss("cache key comes from another base than the rotated key", cn)
            return False
        base_val, new_val = _val(bases[k_idx]), _val(root)
        cache_key = _val(kw.get("key"))
        want = _rows(k_view, base_val)
        got = _rows(cache_key, new_val)
        if base_val is None or new_val is None or cache_key is None or \
                not _same(base_val.stride(), new_val.stride()) or not _same(want, got):
            self.near_miss("cache key is not exactly the rotated key rows", cn)
            return False
        if _is_mutated(root):
            self.near_miss("the rotated key is mutated before the cache write", cn)
            return False
        slots = _val(kw.get("slot_mapping"))
        if cn.args[0] is torch.ops.compile_ops.reshape_and_cache.default and \
                slots is not None and slots.dim() == 1 and \
                statically_known_true(slots.shape[0] > PAGED_MAX_TOKENS):
            self.near_miss(f"paged write of more than {PAGED_MAX_TOKENS} tokens (the unfused "
                           "kernels are faster there)", cn)
            return False

        order = {n: i for i, n in enumerate(graph.nodes)}
        value = kw.get("value")
        v_root, v_chain = _chain_root(value, copies=True)
        rebuild_value = v_root is root
        if rebuild_value:
            src = value  # the view of the rotated base the value is read from (before copies)
            for node in v_chain:
                if node.target in COPY_OPS:
                    src = node.args[0]
            v_rows = _rows(_val(src), new_val)
            if v_rows is None or not _same((v_rows[2],), (want[2],)):
                self.near_miss("value is a view of the rotated base in another layout", cn)
                return False
            regions = [want] + ([_rows(q_view, base_val)] if q_view is not None else [])
            if any(reg is None or self._overlap(v_rows, reg) for reg in regions):
                self.near_miss("value overlaps the rotated query or key", cn)
                return False
        elif isinstance(value, torch.fx.Node) and order[value] > order[r]:
            moved = self._hoist(value, r, order)
            if moved is None:
                self.near_miss("value is computed after rotary_embedding", cn)
                return False
            order = {n: i for i, n in enumerate(graph.nodes)}
        c_bases = list(kw["_all_bases"])
        for a in [kw.get("slot_mapping"), kw.get("k_scale"), kw.get("v_scale")] + c_bases:
            if isinstance(a, torch.fx.Node) and order[a] > order[r]:
                self.near_miss("a cache-write argument is computed after rotary_embedding", cn)
                return False
        if any(b in bases for b in c_bases):
            self.near_miss("the caches share a base with query/key", cn)
            return False
        for b in c_bases:
            for u in b.users:
                if u is not cn and order[r] < order[u] < order[cn]:
                    self.near_miss("a cache is used between rotary_embedding and the write", cn)
                    return False

        write_key = self._key_read_elsewhere(root, want, cn, new_val)
        # Build the fused node before R.
        with graph.inserting_before(r):
            v_node = self._rebuild(graph, v_chain, bases[k_idx]) if rebuild_value else value
            fkw = {"positions": rkw["positions"], "value": v_node, "head_size": head_size,
                   "cos_sin_cache": rkw["cos_sin_cache"], "is_neox": is_neox,
                   "slot_mapping": kw["slot_mapping"], "kv_cache_dtype": kv_dtype,
                   "k_scale": kw["k_scale"], "v_scale": kw["v_scale"], "write_key": write_key}
            for k, v in rkw.items():
                if k.startswith(MUTABLE_PREFIXES):
                    fkw[k] = v
            shift = len(bases)
            for k, v in kw.items():
                if k.startswith(("_key_cache_", "_value_cache_")):
                    fkw[k] = v + shift if k.endswith("_base_index") else v
            fkw["_all_bases"] = bases + c_bases
            paged = cn.args[0] is torch.ops.compile_ops.reshape_and_cache.default
            fused_op = torch.ops.compile_ops.fused_rope_and_cache.default if paged else \
                torch.ops.compile_ops.fused_rope_and_cache_flash.default
            fused = graph.call_function(AFV2, (fused_op,), fkw)
            outs = [graph.call_function(operator.getitem, (fused, i + 1))
                    for i in range(len(bases) + len(c_bases))]
        old_outs = {}
        for node, offset in ((r, 0), (cn, shift)):
            for u in list(node.users):
                if u.target is operator.getitem and u.args[1] >= 1:
                    old_outs[u] = outs[offset + u.args[1] - 1]
        out_vals = [_val(b) for b in fkw["_all_bases"]]
        for old, new in old_outs.items():
            new.meta["val"] = old.meta.get("val")
            out_vals[outs.index(new)] = old.meta.get("val")
        for new, v in zip(outs, out_vals):
            new.meta.setdefault("val", v)
        fused.meta["val"] = tuple([None] + out_vals)
        for old, new in old_outs.items():
            old.replace_all_uses_with(new)
            graph.erase_node(old)
        for u in list(cn.users) + list(r.users):
            if u.target is operator.getitem and not u.users:
                graph.erase_node(u)
        graph.erase_node(cn)
        self._erase_dead(graph, k_chain + (v_chain if rebuild_value else []))
        graph.erase_node(r)
        self.matched("rotary_embedding + %s -> %s (write_key=%s)",
                     "reshape_and_cache" if paged else "reshape_and_cache_flash",
                     fused_op.name(), write_key)
        return True

    @staticmethod
    def _hoist(value, r, order):
        """Move the value's computation before R when it is only copies and views of tensors
        that exist before R (e.g. ``v.reshape(...)`` of a non-contiguous split: a clone the
        graph put after RoPE): the nodes moved, or None if it reads anything made at or after
        R (then the fused node, which takes R's place, could not read it)."""
        pure = set(VIEW_OPS) | {aten.clone.default, aten._to_copy.default,
                                aten.contiguous.default}
        todo, seen, after = [value], set(), []
        while todo:
            n = todo.pop()
            if n in seen or not isinstance(n, torch.fx.Node) or order[n] < order[r]:
                continue
            seen.add(n)
            if n is r or n.op != "call_function" or n.target not in pure or n.kwargs.get("out"):
                return None
            after.append(n)
            todo.extend(n.all_input_nodes)
        for n in sorted(after, key=order.__getitem__):
            r.prepend(n)
        return after

    @staticmethod
    def _overlap(a, b) -> bool:
        """Do two row regions (offset, rows, row stride, row length) of one base share a column?"""
        if not _same((a[2],), (b[2],)):
            return True
        try:
            stride = int(a[2])
            lo_a, lo_b = int(a[0]) % stride, int(b[0]) % stride
            return lo_a < lo_b + int(b[3]) and lo_b < lo_a + int(a[3])
        except (TypeError, ValueError):
            return True

    def _key_read_elsewhere(self, root, key_rows, cache_write, new_val) -> bool:
        """Is any column of the rotated key read by something besides the cache write?"""
        stack = [root]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u is cache_write:
                    continue
                is_view = u.target in VIEW_OPS or (
                    u.target is operator.getitem and n.target in (aten.split_with_sizes.default,
                                                                  aten.split.Tensor))
                if is_view:
                    stack.append(u)
                    continue
                if n.target in (aten.split_with_sizes.default, aten.split.Tensor):
                    return True  # a split consumed as a list: unknown parts
                region = _rows(_val(n), new_val)
                if region is None or self._overlap(region, key_rows):
                    return True
        return False

    @staticmethod
    def _rebuild(graph, chain, base):
        """The view chain (listed from the use back to the root) re-applied to `base`, with its
        metadata recomputed on the base's fake value."""
        cur, cur_val = base, _val(base)
        for node in reversed(chain):
            args = tuple(node.args[1:])
            new = graph.call_function(node.target, (cur,) + args, dict(node.kwargs))
            vals = torch.fx.node.map_arg((args, dict(node.kwargs)), lambda n: n.meta["val"])
            cur_val = node.target(cur_val, *vals[0], **vals[1])
            new.meta["val"] = cur_val
            cur = new
        return cur

    @staticmethod
    def _erase_dead(graph, nodes):
        changed = True
        while changed:
            changed = False
            for n in nodes:
                if n.graph is graph and not n.users and n in graph.nodes:
                    graph.erase_node(n)
                    nodes = [m for m in nodes if m is not n]
                    changed = True
                    break
