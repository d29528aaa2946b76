"""Rewrite: GQA ``repeat_kv`` + SDPA over a static KV cache at decode ->
``compile_ops.static_cache_attention`` (issue 16).

A Hugging Face ``StaticCache`` decode step (gpt-fast's ``KVCache`` is the same shape) attends one
query token per sequence over the whole ``[batch, kv_heads, max_cache_len, head]`` cache with a
mask that hides the slots past the current position. In the post-grad graph::

    kc' = aten.index_put(kc, [None, None, pos], k)           # or any [B, Hkv, L, D] tensor
    K   = reshape(clone(expand(unsqueeze(kc', 2), [B, Hkv, g, L, D])), [B, Hkv * g, L, D])
    V   = the same of vc'                                     # (g = 1: kc', vc' themselves)
    m   = where(le(kv_idx, q_idx), 0, -inf)   or the boolean le(kv_idx, q_idx) (also lt, ge, gt
                                              with the operands swapped)
          kv_idx = iota(L) (+ c) as [1, 1, 1, L];  q_idx = one position shared by the batch
          ([1] or []; a position per sequence is a near miss for now)
    o   = getitem(aten._scaled_dot_product_{flash_attention_for_cpu, efficient_attention,
                                             cudnn_attention}(q [B, Hq, 1, D], K, V, m), 0)

``repeat_kv`` copies the whole cache (g times) every step and SDPA then reads every slot. The
rewrite::

    lens = q_idx + 1 (le) as int64 [B]            # computed once per mask, shared by the layers
    o    = static_cache_attention(empty([B, Hq, D]), reshape(q, [B, Hq, D]), kc', vc', lens,
                                  scale) viewed as [B, Hq, 1, D]

reads each K/V byte of slots ``0 .. lens - 1`` once (the kernel clamps lens into [0, L], which
is what the mask over L slots means). Exactly the same attention: the mask is proven to be
"slot j attended iff j < lens" before anything is rewritten.

Never rewritten (each a logged near miss): more than one query token (prefill), dropout, SDPA's
``is_causal``, no mask or a mask of another form (a padding mask, a sliding window, an ``and`` of
several conditions, a float mask other than 0 / -inf), K / V not ``repeat_kv`` of a
``[B, Hkv, L, D]`` tensor, head sizes or dtypes the op does not take, the log-sum-exp output used.
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from compile_ops.static_cache import MAX_HEAD
from lowerings.passes import FusionPass, graph_device_type, pass_device_policy

aten = torch.ops.aten
prims = torch.ops.prims

SDPA_OPS = {}
for _name in ("_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention"):
    _op = getattr(aten, _name, None)
    if _op is not None:
        SDPA_OPS[_op.default] = _name

RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
BROADCASTS = (aten.unsqueeze.default, aten.expand.default, aten.view.default,
              aten.reshape.default, aten._unsafe_view.default, aten.alias.default)
# le(a, b): a <= b.  For kv <= q: lens = q + 1; kv < q: lens = q.  Swapped forms: ge(q, kv) etc.
_CMP = {aten.le.Tensor: ("kv_q", 1), aten.lt.Tensor: ("kv_q", 0),
        aten.ge.Tensor: ("q_kv", 1), aten.gt.Tensor: ("q_kv", 0)}


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _arg(node: torch.fx.Node, name: str, default=None):
    """An argument of an aten call by schema name, positional or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return a.default_value if a.has_default_value() else default
    return default


def _through(node, ops):
    """Walk `ops` (first argument) up from `node`: the first other node."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ops:
        node = node.args[0]
    return node


def _const_full(node, value) -> bool:
    """`node` is a scalar-tensor constant equal to `value` (aten.full of [] / ones shape)."""
    node = _through(node, BROADCASTS)
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and
            node.target in (aten.full.default, aten.scalar_tensor.default)):
        return False
    v = node.args[1] if node.target is aten.full.default else node.args[0]
    return isinstance(v, (int, float)) and (v == value or (math.isnan(v) and math.isnan(value)))


# The fill of masked slots: -inf, or a finite value this low (SDPA's cuDNN path turns a boolean
# mask into where(mask, 0, -65536)). exp(logit - 1e4 - max) is 0 in float32 for any logits that
# differ by less than 1e4 - 104, as attention logits do; and the slots it leaves out are exactly
# those the op never reads. (All slots masked would differ: SDPA averages V under a finite fill,
# the op gives zeros; a decode mask j <= pos always keeps slot 0.)
MASKED_AT_MOST = -1e4


def _masked_fill(node, cast=None) -> bool:
    """`node` is a constant fill <= MASKED_AT_MOST (also once cast to the float dtype `cast`)."""
    node = _through(node, BROADCASTS)
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and
            node.target in (aten.full.default, aten.scalar_tensor.default)):
        return False
    v = node.args[1] if node.target is aten.full.default else node.args[0]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v > MASKED_AT_MOST:
        return False
    return cast is None or torch.tensor(v, dtype=torch.float64).to(cast).item() <= MASKED_AT_MOST


def _kv_index_shift(node, length: int):
    """c when `node` is iota / arange(0, L, 1) + c (c an int constant, HF's ``kv_offset``; 0 on
    the H200, folded away on the CPU) broadcast only along the last dimension; else None."""
    v = _val(node)
    if v is None or v.dim() == 0 or v.shape[-1] != length or v.numel() != length:
        return None
    root = _through(node, BROADCASTS)
    shift = 0
    while isinstance(root, torch.fx.Node) and root.op == "call_function" and \
            root.target in (aten.add.Tensor, aten.sub.Tensor) and len(root.args) == 2 and \
            isinstance(root.args[1], int) and not isinstance(root.args[1], bool) and \
            root.kwargs.get("alpha", 1) == 1:
        shift += root.args[1] if root.target is aten.add.Tensor else -root.args[1]
        root = _through(root.args[0], BROADCASTS)
    start = _arange_start(root, length)
    return None if start is None else shift + start


def _arange_start(root, length: int):
    """s when `root` is iota(L, start=s, step=1) / arange(s, s + L): L consecutive ints."""
    if not (isinstance(root, torch.fx.Node) and root.op == "call_function"):
        return None
    a = root.args
    if root.target is prims.iota.default:
        ok = a[0] == length and root.kwargs.get("step", 1) == 1
        start = root.kwargs.get("start", 0)
    elif root.target is aten.arange.default:
        ok, start = a[0] == length, 0
    elif root.target in (aten.arange.start_step, aten.arange.start):
        step = a[2] if root.target is aten.arange.start_step and len(a) > 2 else 1
        ok, start = step == 1 and isinstance(a[0], int) and a[1] == a[0] + length, a[0]
    else:
        return None
    return start if ok and isinstance(start, int) and not isinstance(start, bool) else None


MASK_VIEWS = (aten.expand.default, aten.alias.default, aten.clone.default, aten.view.default,
              aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default)


def _strip_mask(mask, length: int):
    """What SDPA's mask preprocessing adds around the mask, removed: broadcasts to
    [B, H, 1, L] (the efficient / cuDNN kernels take an expanded bias), copies, and the
    alignment padding ``slice(constant_pad_nd(m, [0, pad]), -1, 0, L)``, which gives back the
    first L columns of m unchanged."""
    while isinstance(mask, torch.fx.Node) and mask.op == "call_function":
        t = mask.target
        if t in MASK_VIEWS:
            mask = mask.args[0]
            continue
        if t is aten.slice.Tensor:
            dim = mask.args[1] if len(mask.args) > 1 else 0
            start = mask.args[2] if len(mask.args) > 2 else 0
            end = mask.args[3] if len(mask.args) > 3 else None
            step = mask.args[4] if len(mask.args) > 4 else 1
            src = mask.args[0]
            sv = _val(src)
            if sv is None or dim not in (-1, sv.dim() - 1) or start not in (0, None) or \
                    step != 1 or end is None or min(end, sv.shape[-1]) != length:
                break
            if src.op == "call_function" and src.target is aten.constant_pad_nd.default:
                pad = src.args[1]
                if len(pad) >= 2 and pad[0] == 0 and all(p == 0 for p in pad[2:]):
                    mask = src.args[0]
                    continue
            if sv.shape[-1] == length:
                mask = src
                continue
            break
        break
    return mask


def _right_shape(shape) -> tuple:
    """The shape without its leading 1s (what right-aligned broadcasting sees)."""
    shape = list(shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


IDENTITY_VIEWS = (aten.alias.default, aten.clone.default)
SHAPE_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
               aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default)


def _strip_broadcasts(node, length: int):
    """Walk up from the mask SDPA receives through what changes no value of the mask as SDPA
    broadcasts it: copies, expand (right-aligned broadcasting), views that only add or drop
    leading 1s, and the alignment padding ``slice(constant_pad_nd(m, [0, pad]), -1, 0, L)``."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        t = node.target
        src = node.args[0] if node.args else None
        if t in IDENTITY_VIEWS or t is aten.expand.default:
            node = src
            continue
        if t in SHAPE_VIEWS:
            sv, nv = _val(src), _val(node)
            if sv is not None and nv is not None and \
                    _right_shape(sv.shape) == _right_shape(nv.shape):
                node = src
                continue
            break
        if t is aten.slice.Tensor:
            stripped = _strip_mask(node, length)
            if stripped is not node:
                node = stripped
                continue
        break
    return node


def _where_cond(node):
    """cond when `node` is where(cond, 0, fill) with a boolean cond and fill -inf or <= -1e4
    (also cast to another float dtype, the fill checked there); else None."""
    cast = None
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            node.target is prims.convert_element_type.default and \
            _val(node.args[0]) is not None and _val(node.args[0]).dtype.is_floating_point and \
            _val(node) is not None:
        cast = _val(node).dtype
        node = _through(node.args[0], (aten.alias.default, aten.clone.default))
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and
            node.target is aten.where.self):
        return None
    cond = node.args[0]
    cv = _val(cond)
    if cv is None or cv.dtype != torch.bool:
        return None
    if not (_const_full(node.args[1], 0.0) and _masked_fill(node.args[2], cast)):
        return None
    return cond


def _describe(node, depth: int = 3) -> str:
    """A short nested description of the ops producing `node` (for near-miss reasons)."""
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op != "call_function" or depth == 0:
        return node.op if node.op != "call_function" else "..."
    name = getattr(node.target, "__name__", str(node.target))
    args = ", ".join(_describe(a, depth - 1) for a in node.args if isinstance(a, torch.fx.Node))
    return f"{name}({args})"


# On the CPU the op's body is the PyTorch reference (a few eager kernels through the dispatcher,
# tens of microseconds per call), which loses to Inductor's C++ for small caches and wins by far
# once repeat_kv's copy of the cache is large (bench/NOTES.md, session 10): under the "auto" device
# policy a CPU graph is rewritten only when there is a copy to save (GQA: more query than KV
# heads; Phi-3's MHA reads the cache as it is, and the op lost there: 0.54-0.63x) and from this
# many elements in the repeat_kv'ed K (batch x query heads x max_cache_len x head_size; tiny
# models at 1M elements were even, 0.9-1.4x).
CPU_MIN_ELEMENTS = 1 << 23


class StaticCacheAttentionPass(FusionPass):
    name = "static_cache_attention"
    devices = ("cuda", "cpu")  # the CPU from CPU_MIN_ELEMENTS on

    def settings(self) -> dict:
        return {"cpu_min_elements": CPU_MIN_ELEMENTS}

    def apply(self, graph: torch.fx.Graph) -> int:
        matches = 0
        self._cpu_auto = graph_device_type(graph) == "cpu" and pass_device_policy() == "auto"
        self._lens = {}
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in SDPA_OPS:
                if self._try(graph, node):
                    matches += 1
        return matches

    # -- the pieces ----------------------------------------------------------------------------
    def _repeat_kv_source(self, node, heads: int):
        """The [B, Hkv, L, D] tensor that `node` ([B, Hq, L, D]) is repeat_kv of, or a reason."""
        v = _val(node)
        if v is None or v.dim() != 4:
            return None, "K/V is not a 4-d tensor"
        src = node
        if node.op == "call_function" and node.target in RESHAPES:
            inner = node.args[0]
            if inner.op == "call_function" and inner.target is aten.clone.default:
                inner = inner.args[0]
            if not (inner.op == "call_function" and inner.target is aten.expand.default):
                return None, "K/V is a reshape of something other than repeat_kv's expand"
            uns = inner.args[0]
            if not (uns.op == "call_function" and uns.target is aten.unsqueeze.default and
                    uns.args[1] in (2, -3)):  # -3: the same dim of a 4-d cache
                return None, "K/V's expand is not of unsqueeze(cache, 2)"
            src = uns.args[0]
            sv, ev = _val(src), _val(inner)
            if sv is None or sv.dim() != 4 or ev is None or ev.dim() != 5:
                return None, "repeat_kv source is not [B, Hkv, L, D]"
            b, hkv, length, d = sv.shape
            if tuple(ev.shape) != (b, hkv, ev.shape[2], length, d) or \
                    tuple(v.shape) != (b, hkv * ev.shape[2], length, d):
                return None, "K/V's expand / reshape is not repeat_kv's"
        sv = _val(src)
        if sv is None or sv.dim() != 4 or heads % sv.shape[1]:
            return None, "K/V heads do not divide the query heads"
        return src, None

    def _mask_lens(self, mask, length: int):
        """(q_idx node, offset) when mask[..., j] == (j < q_idx + offset) for every query row;
        else (None, reason)."""
        mv = _val(mask)
        if mv is None:
            return None, "mask without metadata"
        mask = _strip_mask(mask, length)
        cond = mask
        if mv.dtype != torch.bool:
            where, cast = mask, None
            if isinstance(where, torch.fx.Node) and where.op == "call_function" and \
                    where.target is prims.convert_element_type.default and \
                    _val(where.args[0]) is not None and _val(where.args[0]).dtype.is_floating_point:
                # where(cond, 0., -inf).to(query dtype) (a float32 mask cast to bf16 / fp16):
                # where(cond, 0, the fill cast), the fill checked in the mask's dtype
                where, cast = _through(where.args[0], MASK_VIEWS), mv.dtype
            if not (isinstance(where, torch.fx.Node) and where.op == "call_function" and
                    where.target is aten.where.self and
                    _const_full(where.args[1], 0.0) and _masked_fill(where.args[2], cast)):
                return None, f"float mask is not where(cond, 0, -inf): {_describe(mask)}"
            cond = where.args[0]
        cond = _through(cond, MASK_VIEWS)
        if not (isinstance(cond, torch.fx.Node) and cond.op == "call_function" and
                cond.target in _CMP):
            return None, f"mask condition is {getattr(cond, 'target', cond)}, not a comparison " \
                         "of key slot and query position"
        order, off = _CMP[cond.target]
        a, b = cond.args[0], cond.args[1]
        kv, q = (a, b) if order == "kv_q" else (b, a)
        shift = _kv_index_shift(kv, length) if isinstance(kv, torch.fx.Node) else None
        if shift is None:
            return None, f"mask's key side is not arange(max_cache_len) + c: {_describe(kv)}"
        off -= shift  # kv + c <= q  <=>  kv <= q - c
        qv = _val(q)
        if not isinstance(q, torch.fx.Node) or qv is None or qv.dtype.is_floating_point or \
                qv.dtype == torch.bool:
            return None, "mask's query side is not an integer tensor"
        q_root = _through(q, (aten.unsqueeze.default, aten.view.default, aten.reshape.default,
                              aten.alias.default))
        rv = _val(q_root)
        if rv is None or rv.numel() != 1 or qv.shape[-1] != 1:
            return None, "mask's query side is not one position (one query token)"
        return (q_root, off), None

    def _lens_node(self, graph, before, q_root, off, batch):
        key = (q_root, off, batch)
        if key in self._lens:
            return self._lens[key]
        rv = _val(q_root)
        with graph.inserting_before(before):
            flat = graph.call_function(aten.reshape.default, (q_root, [1]))
            wide = graph.call_function(aten.expand.default, (flat, [batch]))
            # add makes a fresh contiguous [batch] tensor (also for off = 0)
            lens = graph.call_function(aten.add.Tensor, (wide, off))
        with _fake_mode(rv):
            fv = rv.reshape(1)
            wv = fv.expand(batch)
            lv = wv + off
        flat.meta["val"], wide.meta["val"], lens.meta["val"] = fv, wv, lv
        # placed before the first SDPA that uses it; later ones come after in graph order
        self._lens[key] = lens
        return lens

    def _op_mask(self, mask, length: int, batch: int, heads: int, dtype):
        """The mask to hand the op (SDPA's mask with its broadcasts and padding removed; a
        where(bool, 0, -inf) replaced by the bool), or (None, reason)."""
        node = _strip_broadcasts(mask, length)
        cond = _where_cond(node)
        if cond is not None:
            node = _strip_broadcasts(cond, length)
        v = _val(node)
        if v is None:
            return None, "mask without metadata"
        if v.dtype != torch.bool and v.dtype not in (torch.float32, dtype):
            return None, f"mask dtype {v.dtype} is neither bool, float32 nor the query's"
        shape, want = tuple(v.shape), (batch, heads, 1, length)
        if not (1 <= len(shape) <= 4 and shape[-1] == length and
                all(a in (1, b) for a, b in zip(shape[::-1], want[::-1]))):
            return None, f"mask shape {list(shape)} does not broadcast to {list(want)}"
        return node, None

    def _bounds_nodes(self, graph, before, mask, batch, length):
        """(seq_starts, seq_lens, mask_dense) nodes: compile_ops.static_cache.mask_ranges of
        `mask`, traced into the graph once per mask (the layers share it)."""
        key = ("bounds", mask, batch, length)
        if key in self._lens:
            return self._lens[key]
        from compile_ops.static_cache import mask_ranges

        res = _insert_traced(graph, before, lambda m: mask_ranges(m, batch, length), [mask])
        self._lens[key] = res
        return res

    # -- one SDPA ------------------------------------------------------------------------------
    def _try(self, graph, sdpa) -> bool:
        kind = SDPA_OPS[sdpa.target]
        if kind == "_scaled_dot_product_flash_attention":
            self.near_miss("flash SDPA without a mask (is_causal or no mask)", sdpa)
            return False
        q, k, v = sdpa.args[:3]
        qv = _val(q)
        if qv is None or qv.dim() != 4:
            self.near_miss("query is not [B, H, T, D]", sdpa)
            return False
        batch, heads, qlen, head = qv.shape
        if not isinstance(qlen, int) or not isinstance(batch, int):
            self.near_miss("symbolic shapes", sdpa)
            return False
        if qlen != 1:
            self.near_miss(f"{qlen} query tokens (prefill), not one", sdpa)
            return False
        if qv.dtype not in (torch.float32, torch.float16, torch.bfloat16) or head > MAX_HEAD:
            self.near_miss(f"query dtype {qv.dtype} / head size {head} not taken", sdpa)
            return False
        if float(_arg(sdpa, "dropout_p", 0.0)) != 0.0:
            self.near_miss("dropout", sdpa)
            return False
        if _arg(sdpa, "is_causal", False):
            self.near_miss("is_causal (SDPA's top-left causal mask)", sdpa)
            return False
        mask = _arg(sdpa, "attn_mask" if kind.endswith("_for_cpu") else "attn_bias")
        if mask is None:
            self.near_miss("no mask (attention over every slot of the cache)", sdpa)
            return False
        outs = list(sdpa.users)
        if not all(u.target is operator.getitem for u in outs):
            self.near_miss("SDPA result used other than through getitem", sdpa)
            return False
        if any(u.args[1] != 0 and u.users for u in outs):
            self.near_miss("log-sum-exp (or another SDPA output) is used", sdpa)
            return False
        kc, why = self._repeat_kv_source(k, heads)
        if kc is None:
            self.near_miss(f"key: {why}", sdpa)
            return False
        vc, why = self._repeat_kv_source(v, heads)
        if vc is None:
            self.near_miss(f"value: {why}", sdpa)
            return False
        kcv, vcv = _val(kc), _val(vc)
        if kcv.shape != vcv.shape or kcv.shape[0] != batch or kcv.shape[3] != head or \
                kcv.dtype != qv.dtype or vcv.dtype != qv.dtype:
            self.near_miss("key / value caches differ in shape or dtype from each other or the "
                           "query", sdpa)
            return False
        if head > 1 and (kcv.stride(3) != 1 or vcv.stride(3) != 1):
            self.near_miss("cache not contiguous in head_size", sdpa)
            return False
        length = kcv.shape[2]
        if not all(type(x) is int for x in (*kcv.shape, *qv.shape)):
            self.near_miss("symbolic shapes (a dynamic-shape recompile)", sdpa)
            return False
        if self._cpu_auto and heads == kcv.shape[1]:
            self.near_miss("CPU: no repeat_kv copy to save (as many KV heads as query heads): "
                           "Inductor's own code is faster there", sdpa)
            return False
        if self._cpu_auto and batch * heads * length * head < CPU_MIN_ELEMENTS:
            self.near_miss(f"CPU: repeat_kv copies {batch * heads * length * head} elements, "
                           f"below {CPU_MIN_ELEMENTS}: Inductor's own code is faster there",
                           sdpa)
            return False
        mv = _val(mask)
        if mv is None or mv.dim() < 1 or mv.shape[-1] != length or mv.dim() > 4 or \
                any(s != 1 for s in mv.shape[-2:-1]):
            self.near_miss("mask shape is not [..., 1, max_cache_len]", sdpa)
            return False
        scale = _arg(sdpa, "scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(head)
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min((u for u in outs if u.users), key=lambda n: order[n], default=None)
        if first is None:
            self.near_miss("the attention output is not used", sdpa)
            return False
        for n in (q, kc, vc):
            if order[n] > order[sdpa]:
                self.near_miss(f"{n.name} is computed after the attention", sdpa)
                return False
        # The mask: proven to be "slot j < position + c" (then the op needs only the lengths and
        # never reads the mask), or any other mask, which the op reads, within the live range
        # that mask_ranges finds.
        ml, why = self._mask_lens(mask, length)
        op_mask = starts = dense = None
        if ml is not None:
            q_root, off = ml
            if order[q_root] > order[sdpa]:
                self.near_miss(f"{q_root.name} is computed after the attention", sdpa)
                return False
            lens = self._lens_node(graph, sdpa, q_root, off, batch)
            if order.get(lens, -1) > order[sdpa]:  # a shared lens placed after this SDPA
                self._lens.pop((q_root, off, batch))
                lens = self._lens_node(graph, sdpa, q_root, off, batch)
            how = f"lens = {q_root.name} + {off}"
        else:
            op_mask, why = self._op_mask(mask, length, batch, heads, qv.dtype)
            if op_mask is None:
                self.near_miss(why, sdpa)
                return False
            starts, lens, dense = self._bounds_nodes(graph, sdpa, op_mask, batch, length)
            if order.get(lens, -1) > order[sdpa]:
                self._lens.pop(("bounds", op_mask, batch, length))
                starts, lens, dense = self._bounds_nodes(graph, sdpa, op_mask, batch, length)
            how = f"mask {op_mask.name} ({_val(op_mask).dtype}), bounds from it"

        with graph.inserting_before(sdpa):
            q3 = graph.call_function(aten.reshape.default, (q, [batch, heads, head]))
            out = graph.call_function(aten.empty.memory_format, ([batch, heads, head],),
                                      {"dtype": qv.dtype, "device": qv.device})
            af = graph.call_function(
                torch.ops.higher_order.auto_functionalized,
                (torch.ops.compile_ops.static_cache_attention.default,),
                {"out": out, "query": q3, "key_cache": kc, "value_cache": vc, "seq_lens": lens,
                 "scale": scale, "attn_mask": op_mask, "seq_starts": starts,
                 "mask_dense": dense})
            res = graph.call_function(operator.getitem, (af, 1))
            o4 = graph.call_function(aten.reshape.default, (res, [batch, heads, 1, head]))
        with _fake_mode(qv):
            q3v = qv.reshape(batch, heads, head)
            outv = torch.empty((batch, heads, head), dtype=qv.dtype, device=qv.device)
            o4v = outv.reshape(batch, heads, 1, head)
        q3.meta["val"], out.meta["val"], res.meta["val"], o4.meta["val"] = q3v, outv, outv, o4v
        af.meta["val"] = (None, outv)
        for u in outs:
            if u.args[1] == 0:
                u.replace_all_uses_with(o4)
        for u in outs:
            graph.erase_node(u)
        graph.erase_node(sdpa)
        _erase_dead(graph, [k, v, mask])
        self.matched("%s: [%d, %d, 1, %d] over %s / %s (%d slots), %s", kind, batch,
                     heads, head, kc.name, vc.name, length, how)
        return True


def _fake_mode(v):
    return getattr(v, "fake_mode", None) or contextlib.nullcontext()


def _erase_dead(graph, roots):
    """Erase the pure call nodes reachable upward from `roots` that nothing uses any more."""
    stack = [r for r in roots if isinstance(r, torch.fx.Node)]
    while stack:
        n = stack.pop()
        if n.op != "call_function" or n.users or n.graph is not graph:
            continue
        t = n.target
        if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
            continue
        ins = [a for a in n.all_input_nodes]
        graph.erase_node(n)
        stack.extend(ins)


def _insert_traced(graph, before, fn, inputs):
    """Trace `fn` over the fake values of `inputs` (aten ops, as make_fx records them) and copy
    its nodes into `graph` before `before`; returns the nodes of its outputs (same structure)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    vals = [_val(n) for n in inputs]
    with _fake_mode(vals[0]):  # Inductor's decompositions: the ops its lowerings take
        gm = make_fx(fn, decomposition_table=select_decomp_table())(*vals)
    env = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, n in zip(phs, inputs):
        env[ph] = n
    result = None
    with graph.inserting_before(before):
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = torch.fx.map_arg(n.args[0], lambda a: env[a])
                break
            if n.op != "call_function":
                raise RuntimeError(f"traced helper holds a {n.op} node ({n.name})")
            env[n] = graph.node_copy(n, lambda a: env[a])
    return result
