"""A Llama-style decoder on compile_ops' ops, with a paged KV cache, written the way vLLM's model
code is written; a plain-PyTorch reference of the same math; greedy generation; and a runnable
comparison of eager, ``torch.compile(backend="inductor")`` and ``backend="compile_ops"``.

    python -m compile_ops.models.llama [--config tiny|8b-4layers] [--batch B] [--prompt-len P]
                                       [--new-tokens N] [--device cpu|cuda]

The model (``Llama``), per step, over the flattened tokens of the batch (``[B*T, hidden]``):

    h = embed(ids)
    per layer:  first layer: residual = h; h = rms_norm(h)          (compile_ops.rms_norm)
                later:       h, residual = add + rms_norm(h, residual)
                qkv = qkv_proj(h)                                    (one Linear)
                q, k, v = split(qkv); rotary_embedding(positions, q, k)  (NeoX, in place)
                reshape_and_cache(k, v, key_cache, value_cache, slot_mapping)   (paged layout)
                prefill: SDPA, causal, over the prompt's own q/k/v (GQA through enable_gqa)
                decode:  paged_attention_v1 or v2 (vLLM's rule) over block_tables, seq_lens
                h, residual = add + rms_norm(o_proj(attn), residual)
                h = down_proj(silu_and_mul(gate_up_proj(h)))
    h = add + rms_norm(h, residual); logits = lm_head(h of each sequence's last token)
    next token = argmax(logits)

"add + rms_norm" is written as ``h = x + residual`` then ``rms_norm(out, h, ...)`` by default
(``fused_add_norm=False``: what the ``add_rms_norm`` pass of the ``compile_ops`` backend rewrites
into ``fused_add_rms_norm``), or as vLLM's CUDA path writes it, one in-place
``fused_add_rms_norm`` (``fused_add_norm=True``).

Caches (``PagedKVCache``), one pair per layer, vLLM's ``reshape_and_cache`` layout::

    key_cache   [num_blocks, kv_heads, head_dim // x, block_size, x]   x = 16 // element size
    value_cache [num_blocks, kv_heads, head_dim, block_size]

Blocks are handed out from a seeded permutation of the free list, so a sequence's blocks are
scattered through the cache. ``slot_mapping`` is int64, ``block_tables`` and ``seq_lens`` int32.

``LlamaReference`` computes the same math from the same parameters with plain PyTorch (no
compile_ops op): a dense ``[B, kv_heads, max_len, head_dim]`` K/V tensor per layer, SDPA with a
position mask, the RMSNorm formula with vLLM's rounding (statistics over the float32 sum, the
normalized value rounded to the dtype before the weight multiply), RoPE on the halves, and
``silu(gate) * up``. It is the tests' oracle and the plain-Inductor baseline for benchmarks.

Limits of the ops this model uses: ``paged_attention_v1/v2`` take head sizes 64-256 and block
sizes 8/16/32, so the smallest config uses head_dim 64 and block_size 8.

Tensor parallelism (``LlamaConfig.tp``, ``--tp N`` under ``torchrun --nproc-per-node N``):
Megatron's split, one process per rank. ``qkv_proj`` and ``gate_up_proj`` are column-parallel
(each rank computes its heads, KV heads included, and its slice of the intermediate size; its
paged cache holds its KV heads), ``o_proj`` and ``down_proj`` row-parallel, their partial
outputs summed by ``torch.distributed._functional_collectives.all_reduce`` (traced as
``_c10d_functional.all_reduce`` + ``wait_tensor``) right before the residual add + RMSNorm,
which the ``allreduce_norm`` pass fuses. The embedding, the norms and ``lm_head`` are replicated.
Every rank draws the whole model's weights from the seed and keeps its slices, so a TP model is
checked against the one-process model and ``LlamaReference`` of the same seed.

    torchrun --nproc-per-node 2 -m compile_ops.models.llama --config 8b-4layers --tp 2
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import statistics
import sys
import time
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from compile_ops.attention import BLOCK_SIZES, HEAD_SIZES, PARTITION_SIZE
from compile_ops.testing import TOLERANCES

__all__ = ["FP8_LOGITS_TOLERANCE", "FP8_TP_LOGITS_TOLERANCE", "Fp8Linear", "Generation", "Llama", "LlamaConfig",
           "LlamaReference", "PagedKVCache", "TPGroup", "all_reduce_sum",
           "allreduce_norm_expected", "compare_generations", "compile_steps", "generate",
           "init_tp", "logits_tolerance", "rope_cos_sin_cache", "main"]

ops = torch.ops.compile_ops


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes of a Llama-style decoder and of its paged KV cache.

    ``max_blocks`` is the number of block-table columns per sequence (so a sequence holds at most
    ``max_seq_len = max_blocks * block_size`` tokens, which is also the RoPE table length and the
    ``max_seq_len`` passed to paged attention); ``num_blocks`` is the number of blocks in each
    layer's cache, shared by all sequences.
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float = 10000.0
    block_size: int = 16
    max_blocks: int = 32
    num_blocks: int = 256
    dtype: torch.dtype = torch.float32
    eps: float = 1e-5
    # FP8 (W8A8) projections: "" (none), "dynamic" (activations quantized per token at run time)
    # or "static" (one calibrated scale per projection input). Weights per output channel.
    fp8: str = ""
    # Tensor parallelism (Megatron): ranks of the group the model is split over. The sizes above
    # stay the whole model's; each rank holds heads / tp query heads, kv_heads / tp KV heads (and
    # their cache) and intermediate / tp of the MLP (the ``local_*`` properties).
    tp: int = 1

    def __post_init__(self):
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"fp8 must be one of {FP8_MODES}, got {self.fp8!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads})")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be a positive int, got {self.tp!r}")
        for name in ("heads", "kv_heads", "intermediate"):
            if getattr(self, name) % self.tp:
                raise ValueError(f"tensor parallelism: {name} ({getattr(self, name)}) must be "
                                 f"divisible by tp ({self.tp}): each rank holds {name} / tp")
        if self.head_dim not in HEAD_SIZES:
            raise ValueError(f"head_dim {self.head_dim}: paged attention takes {list(HEAD_SIZES)}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size {self.block_size}: paged attention takes "
                             f"{list(BLOCK_SIZES)}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE)")

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """Seconds on a CPU: vocab 256, hidden 256, 2 layers, 4 heads / 2 KV heads of 64,
        intermediate 512, blocks of 8 tokens (head 64 and block 8 are the smallest sizes paged
        attention takes)."""
        base = dict(vocab=256, hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                    intermediate=512, rope_theta=10000.0, block_size=8, max_blocks=16,
                    num_blocks=128, dtype=torch.float32, eps=1e-5)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def llama3_8b_layers(cls, n: int = 4, **overrides) -> "LlamaConfig":
        """Llama 3 8B's shapes (hidden 4096, 32 heads / 8 KV heads of 128, intermediate 14336,
        vocab 128256, rope theta 500000) with ``n`` layers, bfloat16, blocks of 16 tokens."""
        base = dict(vocab=128256, hidden=4096, layers=n, heads=32, kv_heads=8, head_dim=128,
                    intermediate=14336, rope_theta=500000.0, block_size=16, max_blocks=128,
                    num_blocks=2048, dtype=torch.bfloat16, eps=1e-5)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def max_seq_len(self) -> int:
        return self.max_blocks * self.block_size

    # What one tensor-parallel rank holds (the whole model's sizes when tp == 1).
    @property
    def local_heads(self) -> int:
        return self.heads // self.tp

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads // self.tp

    @property
    def local_intermediate(self) -> int:
        return self.intermediate // self.tp

    @property
    def local_q_size(self) -> int:
        return self.local_heads * self.head_dim

    @property
    def local_kv_size(self) -> int:
        return self.local_kv_heads * self.head_dim

    def describe(self) -> str:
        layers = f"{self.layers} layer" + ("s" if self.layers != 1 else "")
        fp8 = {"": "", "dynamic": ", FP8 W8A8 (per-channel weights, dynamic per-token "
               "activations)", "static": ", FP8 W8A8 (per-channel weights, static per-tensor "
               "activations)"}[self.fp8]
        tp = f", tensor parallel {self.tp}" if self.tp > 1 else ""
        return (f"vocab {self.vocab}, hidden {self.hidden}, {layers}, {self.heads} "
                f"heads / {self.kv_heads} kv heads of {self.head_dim}, intermediate "
                f"{self.intermediate}, block {self.block_size}, {str(self.dtype)[6:]}{fp8}{tp}")


def config_from_name(name: str, **overrides) -> LlamaConfig:
    """``tiny`` or ``8b-<n>layers`` (e.g. ``8b-4layers``), optionally with ``-fp8`` (FP8
    projections, activations quantized per token at run time) or ``-fp8-static`` (one static
    scale per projection input): e.g. ``8b-4layers-fp8``, ``tiny-fp8-static``."""
    m = re.fullmatch(r"(tiny|8b-(\d+)layers?)(-fp8(-static|-dynamic)?)?", name)
    if not m:
        raise ValueError(f"unknown config {name!r}: use 'tiny' or '8b-<n>layers' (e.g. "
                         "8b-4layers), optionally + '-fp8' or '-fp8-static'")
    if m.group(3):
        overrides.setdefault("fp8", "static" if m.group(4) == "-static" else "dynamic")
    if m.group(1) == "tiny":
        return LlamaConfig.tiny(**overrides)
    return LlamaConfig.llama3_8b_layers(int(m.group(2)), **overrides)


def rope_cos_sin_cache(cfg: LlamaConfig, device="cpu") -> torch.Tensor:
    """``[max_seq_len, head_dim]`` float32 table: cos of the head_dim / 2 frequencies, then their
    sin (the ``cos_sin_cache`` layout of ``rotary_embedding``), computed in float64."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(torch.float32).to(device)


# ---------------------------------------------------------------------------------------------
# The model on compile_ops' ops
# ---------------------------------------------------------------------------------------------
class StepMeta(NamedTuple):
    """What a step needs besides the hidden states (vLLM's attention metadata, in short)."""

    slot_mapping: torch.Tensor            # int64 [tokens]
    cos_sin_cache: torch.Tensor           # float32 [max_seq_len, head_dim]
    k_scale: torch.Tensor                 # float32 [1]
    v_scale: torch.Tensor
    prefill_shape: Optional[tuple]        # (B, T) for a prefill step, None for decode
    block_tables: Optional[torch.Tensor]  # int32 [B, max_blocks] (decode)
    seq_lens: Optional[torch.Tensor]      # int32 [B], including the token being decoded


def _linear(in_features: int, out_features: int, weight: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.utils.skip_init(torch.nn.Linear, in_features, out_features, bias=False,
                                   device=weight.device, dtype=weight.dtype)
    lin.weight.data = weight
    lin.weight.requires_grad_(False)
    return lin


FP8_MODES = ("", "dynamic", "static")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)


class Fp8Linear(torch.nn.Module):
    """A W8A8 projection as FP8 checkpoints run it in plain PyTorch: the weight in
    float8_e4m3fn with one float32 scale per output channel, the input quantized to FP8 by the
    native formula (what the ``norm_quant`` / ``act_quant`` passes match), then
    ``torch._scaled_mm`` (row-wise scales) into the model dtype.

    ``mode="dynamic"``: per-token scales ``max(amax(|x|) / 448, 1 / (448 * 512))`` and
    ``x / scale``. ``mode="static"``: one scale ``input_scale`` (calibrated: ``amax / 448`` of
    the inputs it was built for) and ``x * (1 / scale)``; the GEMM takes it as ``[tokens, 1]``.
    """

    def __init__(self, weight: torch.Tensor, mode: str, input_amax: float):
        super().__init__()
        w = weight.float()
        w_scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)  # per channel
        self.register_buffer("weight", (w / w_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("weight_scale", w_scale[None, :].contiguous())   # [1, out]
        self.register_buffer("input_scale", torch.tensor(input_amax / FP8_MAX,
                                                         device=weight.device))
        self.mode = mode
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "static":
            q = (x2.float() * self.input_scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            scale_a = self.input_scale.expand(x2.shape[0], 1).contiguous()
        else:
            xf = x2.float()
            scale_a = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
            q = (xf / scale_a).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale_a, scale_b=self.weight_scale,
                             out_dtype=x.dtype)
        return y.reshape(*lead, self.out_features)


# ---------------------------------------------------------------------------------------------
# Tensor parallelism (Megatron): column-parallel qkv / gate_up, row-parallel o_proj / down_proj
# ---------------------------------------------------------------------------------------------
class TPGroup(NamedTuple):
    """This process's place in the tensor-parallel group: its rank, the group's size and name
    (the functional collectives take the name: a string Dynamo traces as a constant)."""

    rank: int
    size: int
    group_name: str


def tp_group_of(cfg: LlamaConfig, group=None) -> Optional[TPGroup]:
    """The ``TPGroup`` of this process for ``cfg.tp`` ranks: ``group`` (a ProcessGroup; default
    the world group) of an initialized ``torch.distributed``. None when ``cfg.tp == 1``."""
    if cfg.tp == 1:
        if group is not None:
            raise ValueError("a tensor-parallel group was given but cfg.tp is 1: set cfg.tp to "
                             "the group's size")
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"cfg.tp = {cfg.tp}: the model is split over {cfg.tp} processes and "
                           "needs torch.distributed initialized in each (init_process_group; "
                           f"e.g. run under torchrun --nproc-per-node {cfg.tp})")
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if size != cfg.tp:
        raise ValueError(f"cfg.tp = {cfg.tp} but the process group has {size} ranks")
    return TPGroup(dist.get_rank(group), size, group.group_name)


def all_reduce_sum(y: torch.Tensor, group_name: str) -> torch.Tensor:
    """The row-parallel projections' sum over the ranks, as the functional collective (traced
    as ``_c10d_functional.all_reduce`` + ``wait_tensor``: what the ``allreduce_norm`` pass
    looks for in front of an add + RMSNorm). Eager: waited here, a plain tensor comes back."""
    from torch.distributed import _functional_collectives as funcol

    y = funcol.all_reduce(y, "sum", group_name)
    if isinstance(y, funcol.AsyncCollectiveTensor):  # eager only (traced: a plain tensor)
        y = y.wait()
    return y


def _rows(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if w.dtype == FP8:  # gathers of float8 are not implemented everywhere: move the bytes
        return w.view(torch.uint8)[index].view(FP8).contiguous()
    return w[index].contiguous()


def shard_column_parallel(proj, parts, tp: Optional[TPGroup]):
    """A column-parallel projection: of each of the stacked outputs ``parts`` (qkv: q, k, v
    sizes; gate_up: gate, up) the rank keeps its contiguous 1/size (its heads, its part of the
    intermediate size). ``Fp8Linear``: the FP8 weight rows and their per-output-channel scales
    (a row's scale depends on that row alone, so they equal the one-process model's)."""
    if tp is None:
        return proj
    rows, off = [], 0
    for n in parts:
        k = n // tp.size
        rows.append(torch.arange(off + tp.rank * k, off + (tp.rank + 1) * k))
        off += n
    index = torch.cat(rows).to(proj.weight.device)
    if isinstance(proj, Fp8Linear):
        proj.weight = _rows(proj.weight, index)
        proj.weight_scale = proj.weight_scale[:, index].contiguous()
        proj.out_features = len(index)
        return proj
    return _linear(proj.in_features, len(index), _rows(proj.weight, index))


def shard_row_parallel(proj, tp: Optional[TPGroup]):
    """A row-parallel projection: the rank keeps its 1/size of the input columns (the heads /
    intermediate slice its column-parallel partner produced); the partial outputs are summed
    by ``all_reduce_sum``. ``Fp8Linear``: the FP8 weight columns; the per-output-channel
    weight scales stay the whole row's (quantized before slicing, so the rank's partial GEMMs
    sum to the one-process GEMM when the activation scale is the same on every rank: a static
    scale is; a dynamic per-token scale is the amax of the rank's slice, a finer scale than the
    one-process model's, equal up to FP8 rounding)."""
    if tp is None:
        return proj
    k = proj.in_features // tp.size
    cols = slice(tp.rank * k, (tp.rank + 1) * k)
    if isinstance(proj, Fp8Linear):
        proj.weight = proj.weight.view(torch.uint8)[:, cols].contiguous().view(FP8)
        proj.in_features = k
        return proj
    return _linear(k, proj.out_features, proj.weight[:, cols].contiguous())


class _Init:
    """Seeded weights: normal with std 1/sqrt(fan_in) for projections (activations stay O(1)
    through the layers), std 1 for the embedding, 1 + N(0, 0.1) for the norm weights."""

    def __init__(self, cfg: LlamaConfig, seed: int, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def normal(self, *shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (t * std + mean).to(self.cfg.dtype)

    def linear(self, in_features: int, out_features: int, input_amax: float = 0.0):
        """A projection: ``torch.nn.Linear``, or with ``cfg.fp8`` an ``Fp8Linear`` whose static
        input scale covers inputs up to ``input_amax`` (larger values saturate at 448)."""
        w = self.normal(out_features, in_features, std=in_features ** -0.5)
        if self.cfg.fp8 and input_amax:
            return Fp8Linear(w, self.cfg.fp8, input_amax)
        return _linear(in_features, out_features, w)

    def norm(self) -> torch.nn.Parameter:
        return torch.nn.Parameter(self.normal(self.cfg.hidden, std=0.1, mean=1.0),
                                  requires_grad=False)


def add_rms_norm(x, residual, weight, eps: float, fused: bool):
    """vLLM's ``RMSNorm(x, residual)`` on compile_ops' ops: ``(normed, new residual)``.
    ``residual is None`` (the first layer): ``rms_norm(x)``, and x becomes the residual.
    ``fused``: one in-place ``fused_add_rms_norm``; else ``h = x + residual`` and ``rms_norm(h)``
    (the pattern the ``add_rms_norm`` pass fuses)."""
    if residual is None:
        out = torch.empty_like(x)
        ops.rms_norm(out, x, weight, eps)
        return out, x
    if fused:
        ops.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    h = x + residual
    out = torch.empty_like(h)
    ops.rms_norm(out, h, weight, eps)
    return out, h


ATTN_VERSIONS = ("auto", "v1", "v2")


def use_v1(attn_version: str, max_seq_len: int, num_seqs: int, num_heads: int) -> bool:
    """Whether a decode step calls ``paged_attention_v1`` (else v2). ``"auto"`` is vLLM's rule
    (``PagedAttention.forward_decode``): v1 when ``max_seq_len <= 8192`` and either one partition
    of ``PARTITION_SIZE`` tokens covers it or ``num_seqs * num_heads > 512`` (enough work to fill
    the GPU without splitting). Ours split inside v1 too; v1 saves v2's partial buffers and
    measured 1-6% faster than v2 at 32-128 sequences on an H200 (bench/NOTES.md, session 6)."""
    if attn_version != "auto":
        return attn_version == "v1"
    parts = -(-max_seq_len // PARTITION_SIZE)
    return max_seq_len <= 8192 and (parts == 1 or num_seqs * num_heads > 512)


class LlamaAttention(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, init: _Init, attn_version: str,
                 tp: Optional[TPGroup] = None):
        super().__init__()
        self.cfg, self.attn_version = cfg, attn_version
        self.tp_group_name = tp.group_name if tp else ""
        self.scale = cfg.head_dim ** -0.5
        # FP8 static scales: what these seeded weights produce (normalized inputs: |x| < ~6;
        # attention outputs, averages of values: < ~6; see Fp8Linear)
        self.qkv_proj = shard_column_parallel(
            init.linear(cfg.hidden, cfg.q_size + 2 * cfg.kv_size, input_amax=8.0),
            (cfg.q_size, cfg.kv_size, cfg.kv_size), tp)
        self.o_proj = shard_row_parallel(init.linear(cfg.q_size, cfg.hidden, input_amax=8.0), tp)

    def forward(self, positions, hidden, kv_cache, meta: StepMeta):
        cfg = self.cfg
        hd, nh, nkv = cfg.head_dim, cfg.local_heads, cfg.local_kv_heads
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([cfg.local_q_size, cfg.local_kv_size, cfg.local_kv_size], dim=-1)
        ops.rotary_embedding(positions, q, k, hd, meta.cos_sin_cache, True)
        key_cache, value_cache = kv_cache
        ops.reshape_and_cache(k.view(-1, nkv, hd), v.view(-1, nkv, hd), key_cache, value_cache,
                              meta.slot_mapping, "auto", meta.k_scale, meta.v_scale)
        if meta.prefill_shape is not None:
            b, t = meta.prefill_shape
            qh, kh, vh = (z.view(b, t, -1, hd).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale,
                                               enable_gqa=True)
            o = o.transpose(1, 2).reshape(b * t, nh * hd)
        else:
            o = self._paged_attention(q.view(-1, nh, hd), key_cache, value_cache, meta)
            o = o.view(-1, nh * hd)
        o = self.o_proj(o)
        return all_reduce_sum(o, self.tp_group_name) if self.tp_group_name else o

    def _paged_attention(self, q, key_cache, value_cache, meta: StepMeta):
        cfg = self.cfg
        seqs, nh, nkv = q.shape[0], cfg.local_heads, cfg.local_kv_heads
        out = torch.empty((seqs, nh, cfg.head_dim), dtype=q.dtype, device=q.device)
        if use_v1(self.attn_version, cfg.max_seq_len, seqs, nh):
            ops.paged_attention_v1(out, q, key_cache, value_cache, nkv, self.scale,
                                   meta.block_tables, meta.seq_lens, cfg.block_size,
                                   cfg.max_seq_len, None, "auto", meta.k_scale, meta.v_scale)
            return out
        parts = -(-cfg.max_seq_len // PARTITION_SIZE)
        exp_sums = torch.empty((seqs, nh, parts), dtype=torch.float32, device=q.device)
        max_logits = torch.empty_like(exp_sums)
        tmp_out = torch.empty((seqs, nh, parts, cfg.head_dim), dtype=q.dtype,
                              device=q.device)
        ops.paged_attention_v2(out, exp_sums, max_logits, tmp_out, q, key_cache, value_cache,
                               nkv, self.scale, meta.block_tables, meta.seq_lens,
                               cfg.block_size, cfg.max_seq_len, None, "auto", meta.k_scale,
                               meta.v_scale)
        return out


class LlamaMLP(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, init: _Init, tp: Optional[TPGroup] = None):
        super().__init__()
        self.tp_group_name = tp.group_name if tp else ""
        self.gate_up_proj = shard_column_parallel(
            init.linear(cfg.hidden, 2 * cfg.intermediate, input_amax=8.0),
            (cfg.intermediate, cfg.intermediate), tp)
        self.down_proj = shard_row_parallel(
            init.linear(cfg.intermediate, cfg.hidden, input_amax=24.0), tp)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        act = torch.empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,), dtype=x.dtype,
                          device=x.device)
        ops.silu_and_mul(act, gate_up)
        out = self.down_proj(act)
        return all_reduce_sum(out, self.tp_group_name) if self.tp_group_name else out


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, init: _Init, attn_version: str, fused_add_norm: bool,
                 tp: Optional[TPGroup] = None):
        super().__init__()
        self.eps, self.fused_add_norm = cfg.eps, fused_add_norm
        self.input_layernorm = init.norm()
        self.self_attn = LlamaAttention(cfg, init, attn_version, tp)
        self.post_attention_layernorm = init.norm()
        self.mlp = LlamaMLP(cfg, init, tp)

    def forward(self, positions, hidden, residual, kv_cache, meta: StepMeta):
        hidden, residual = add_rms_norm(hidden, residual, self.input_layernorm, self.eps,
                                        self.fused_add_norm)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = add_rms_norm(hidden, residual, self.post_attention_layernorm,
                                        self.eps, self.fused_add_norm)
        return self.mlp(hidden), residual


class Llama(torch.nn.Module):
    """The Llama-style decoder on compile_ops' ops (see the module docstring).

    ``prefill(input_ids [B, T], positions [B*T], slot_mapping [B*T], kv_caches)`` and
    ``decode(input_ids [B], positions [B], slot_mapping [B], block_tables [B, max_blocks],
    seq_lens [B], kv_caches)`` each return ``(next_tokens [B] int64, logits [B, vocab])`` (the
    logits of each sequence's last token, in the model dtype). They are meant to be compiled
    separately (``compile_steps``). ``kv_caches`` is ``PagedKVCache.kv_caches``.

    ``attn_version``: ``"auto"`` (default: vLLM's choice, see ``use_v1``), ``"v1"`` or ``"v2"``
    paged attention for decode.
    ``fused_add_norm``: call ``fused_add_rms_norm`` directly instead of add + ``rms_norm``.

    Tensor parallelism (``cfg.tp > 1``, one model per process of ``tp_group``, default the
    world group of an initialized ``torch.distributed``): Megatron's split. ``qkv_proj`` and
    ``gate_up_proj`` are column-parallel (the rank's heads, KV heads included, and its slice of
    the intermediate size), ``o_proj`` and ``down_proj`` row-parallel, their partial outputs
    summed by an all-reduce (``all_reduce_sum``) in front of the residual add + RMSNorm. Every
    rank draws the whole one-process model's weights from ``seed`` and keeps its slices, so the
    TP model computes what ``Llama(cfg.replace(tp=1), seed=seed)`` does (up to the order of the
    sums). The embedding, the norms and ``lm_head`` are replicated: every rank computes the
    same residual stream and the same logits and tokens. The paged cache of a rank holds its
    KV heads (``PagedKVCache`` sizes it by ``cfg.local_kv_heads``).
    """

    def __init__(self, cfg: LlamaConfig, *, seed: int = 0, device="cpu",
                 attn_version: str = "auto", fused_add_norm: bool = False, tp_group=None):
        super().__init__()
        if attn_version not in ATTN_VERSIONS:
            raise ValueError(f"attn_version must be one of {ATTN_VERSIONS}, got {attn_version!r}")
        self.cfg, self.attn_version, self.fused_add_norm = cfg, attn_version, fused_add_norm
        self.tp = tp_group_of(cfg, tp_group)
        init = _Init(cfg, seed, device)
        self.embed_tokens = torch.nn.Embedding.from_pretrained(
            init.normal(cfg.vocab, cfg.hidden), freeze=True)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(cfg, init, attn_version, fused_add_norm, self.tp)
            for _ in range(cfg.layers))
        self.norm = init.norm()
        self.lm_head = init.linear(cfg.hidden, cfg.vocab)
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(cfg, device), persistent=False)
        self.register_buffer("k_scale", torch.ones(1, device=device), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, device=device), persistent=False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.norm.device

    def _hidden(self, ids, positions, kv_caches, meta: StepMeta):
        hidden = self.embed_tokens(ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = add_rms_norm(hidden, residual, self.norm, self.cfg.eps, self.fused_add_norm)
        return hidden

    def _meta(self, slot_mapping, prefill_shape=None, block_tables=None, seq_lens=None):
        return StepMeta(slot_mapping, self.cos_sin_cache, self.k_scale, self.v_scale,
                        prefill_shape, block_tables, seq_lens)

    def prefill(self, input_ids, positions, slot_mapping, kv_caches):
        b, t = input_ids.shape
        hidden = self._hidden(input_ids.reshape(-1), positions, kv_caches,
                              self._meta(slot_mapping, prefill_shape=(b, t)))
        logits = self.lm_head(hidden.view(b, t, -1)[:, -1])
        return logits.argmax(dim=-1), logits

    def decode(self, input_ids, positions, slot_mapping, block_tables, seq_lens, kv_caches):
        hidden = self._hidden(input_ids, positions, kv_caches,
                              self._meta(slot_mapping, block_tables=block_tables,
                                         seq_lens=seq_lens))
        logits = self.lm_head(hidden)
        return logits.argmax(dim=-1), logits


# ---------------------------------------------------------------------------------------------
# KV-cache manager
# ---------------------------------------------------------------------------------------------
class PagedKVCache:
    """Per-layer paged caches and the block bookkeeping of a batch of sequences.

    ``kv_caches[layer] = (key_cache, value_cache)`` in ``reshape_and_cache``'s layout. Blocks come
    from a seeded permutation of the free list (a sequence's blocks are scattered). Under tensor
    parallelism (``cfg.tp > 1``) the caches of a rank hold its ``cfg.local_kv_heads`` KV heads;
    every rank keeps the same block tables.
    """

    def __init__(self, cfg: LlamaConfig, device="cpu", *, num_blocks: Optional[int] = None,
                 seed: int = 0):
        self.cfg, self.device = cfg, torch.device(device)
        self.num_blocks = num_blocks or cfg.num_blocks
        x = 16 // torch.empty((), dtype=cfg.dtype).element_size()
        nb, nkv, hd, bs = self.num_blocks, cfg.local_kv_heads, cfg.head_dim, cfg.block_size
        self.kv_caches = [
            (torch.zeros(nb, nkv, hd // x, bs, x, dtype=cfg.dtype, device=self.device),
             torch.zeros(nb, nkv, hd, bs, dtype=cfg.dtype, device=self.device))
            for _ in range(cfg.layers)]
        self._order = torch.randperm(nb, generator=torch.Generator().manual_seed(seed)).tolist()
        self.reset()

    def reset(self) -> None:
        """Forget every sequence (the cache contents stay; they are rewritten before use)."""
        self._free = list(reversed(self._order))
        self.block_table: dict[int, list[int]] = {}
        self.seq_len: dict[int, int] = {}
        self._next_id = 0

    def mark_static(self) -> None:
        """Mark the caches as static inputs (fixed addresses): CUDA graphs of a compiled step may
        then write into them (cudagraph trees skip graphs that mutate other inputs)."""
        for kc, vc in self.kv_caches:
            torch._dynamo.mark_static_address(kc)
            torch._dynamo.mark_static_address(vc)

    def add_sequences(self, n: int) -> list[int]:
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for s in ids:
            self.block_table[s], self.seq_len[s] = [], 0
        return ids

    def free(self, seq_ids) -> None:
        for s in seq_ids:
            self._free.extend(reversed(self.block_table.pop(s)))
            del self.seq_len[s]

    def _reserve(self, s: int, length: int) -> None:
        table = self.block_table[s]
        need = -(-length // self.cfg.block_size)
        if need > self.cfg.max_blocks:
            raise ValueError(f"sequence {s} needs {length} tokens, more than max_seq_len "
                             f"{self.cfg.max_seq_len} (max_blocks * block_size)")
        while len(table) < need:
            if not self._free:
                raise RuntimeError(f"out of KV-cache blocks ({self.num_blocks} in all)")
            table.append(self._free.pop())

    def slot(self, s: int, pos: int) -> int:
        bs = self.cfg.block_size
        return self.block_table[s][pos // bs] * bs + pos % bs

    def prefill(self, seq_ids, prompt_len: int):
        """Reserve blocks for the prompts: (positions int64 [B*T], slot_mapping int64 [B*T])."""
        positions, slots = [], []
        for s in seq_ids:
            start = self.seq_len[s]
            self._reserve(s, start + prompt_len)
            for p in range(start, start + prompt_len):
                positions.append(p)
                slots.append(self.slot(s, p))
            self.seq_len[s] = start + prompt_len
        return self._t(positions, torch.int64), self._t(slots, torch.int64)

    def decode(self, seq_ids):
        """One new token per sequence: (positions [B] int64, slot_mapping [B] int64,
        block_tables [B, max_blocks] int32, seq_lens [B] int32, the new token counted)."""
        positions, slots = [], []
        for s in seq_ids:
            p = self.seq_len[s]
            self._reserve(s, p + 1)
            positions.append(p)
            slots.append(self.slot(s, p))
            self.seq_len[s] = p + 1
        lens = [self.seq_len[s] for s in seq_ids]
        return (self._t(positions, torch.int64), self._t(slots, torch.int64),
                self.block_tables(seq_ids), self._t(lens, torch.int32))

    def block_tables(self, seq_ids) -> torch.Tensor:
        rows = [self.block_table[s] + [0] * (self.cfg.max_blocks - len(self.block_table[s]))
                for s in seq_ids]
        return self._t(rows, torch.int32)

    def _t(self, values, dtype):
        return torch.tensor(values, dtype=dtype).to(self.device)


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch reference (no compile_ops op)
# ---------------------------------------------------------------------------------------------
def _ref_rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _ref_add_rms_norm(x, residual, weight, eps):
    """(rms_norm of the float32 sum, the sum rounded to the dtype): vLLM's rounding."""
    z = x.float() + residual.float()
    return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight, \
        z.to(x.dtype)


def _ref_linear(proj, x):
    """A projection in plain PyTorch: F.linear, or an FP8 projection's own native math (the
    quantization and torch._scaled_mm are plain PyTorch already)."""
    return proj(x) if isinstance(proj, Fp8Linear) else F.linear(x, proj.weight)


def _rope(x, cos, sin):
    """NeoX RoPE on x [B, heads, T, head_dim]; cos/sin [T, head_dim / 2] float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class LlamaReference(torch.nn.Module):
    """The same math as ``Llama`` from the same parameters, in plain PyTorch, with a dense
    ``[B, kv_heads, max_len, head_dim]`` K/V tensor per layer (``new_cache``).

    ``forward(input_ids [B, T], positions [T] int64, caches)`` writes the step's K/V at
    ``positions`` (all sequences are at the same positions), attends causally over the cache
    and returns ``(next_tokens [B], logits [B, vocab])`` of the last token: prefill is
    ``positions = arange(T)``, decode ``T = 1``. All shapes are static, so it compiles once per
    step kind and runs under CUDA graphs (the plain-Inductor baseline).
    """

    def __init__(self, model: Llama):
        super().__init__()
        if model.cfg.tp > 1:
            raise ValueError(f"LlamaReference takes the one-process model (cfg.tp = 1), got a "
                             f"rank of a tp = {model.cfg.tp} model: check a TP model against "
                             "LlamaReference(Llama(cfg.replace(tp=1), seed=<the same seed>)), "
                             "which holds the same weights")
        self.model = model  # the same parameters
        self.cfg = model.cfg

    def new_cache(self, batch: int, max_len: Optional[int] = None):
        cfg = self.cfg
        shape = (batch, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)
        dev = self.model.device
        return [(torch.zeros(shape, dtype=cfg.dtype, device=dev),
                 torch.zeros(shape, dtype=cfg.dtype, device=dev)) for _ in range(cfg.layers)]

    def forward(self, input_ids, positions, caches):
        cfg, m = self.cfg, self.model
        b, t = input_ids.shape
        hd, eps = cfg.head_dim, cfg.eps
        cs = m.cos_sin_cache.index_select(0, positions)
        cos, sin = cs[:, : hd // 2], cs[:, hd // 2:]
        max_len = caches[0][0].shape[2]
        mask = torch.arange(max_len, device=positions.device)[None, :] <= positions[:, None]
        h = F.embedding(input_ids, m.embed_tokens.weight)
        residual = None
        for layer, (kc, vc) in zip(m.layers, caches):
            if residual is None:
                residual, h = h, _ref_rms_norm(h, layer.input_layernorm, eps)
            else:
                h, residual = _ref_add_rms_norm(h, residual, layer.input_layernorm, eps)
            attn = layer.self_attn
            qkv = _ref_linear(attn.qkv_proj, h)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = _rope(q.reshape(b, t, cfg.heads, hd).transpose(1, 2), cos, sin)
            k = _rope(k.reshape(b, t, cfg.kv_heads, hd).transpose(1, 2), cos, sin)
            v = v.reshape(b, t, cfg.kv_heads, hd).transpose(1, 2)
            kc.index_copy_(2, positions, k)
            vc.index_copy_(2, positions, v)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=attn.scale,
                                               enable_gqa=True)
            h = _ref_linear(attn.o_proj, o.transpose(1, 2).reshape(b, t, cfg.q_size))
            h, residual = _ref_add_rms_norm(h, residual, layer.post_attention_layernorm, eps)
            gate, up = _ref_linear(layer.mlp.gate_up_proj, h).chunk(2, dim=-1)
            h = _ref_linear(layer.mlp.down_proj,
                            (F.silu(gate.float()).to(h.dtype).float() * up.float()).to(h.dtype))
        h, _ = _ref_add_rms_norm(h, residual, m.norm, eps)
        logits = F.linear(h[:, -1], m.lm_head.weight)
        return logits.argmax(dim=-1), logits


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
class _PagedSession:
    def __init__(self, model: Llama, batch: int, kv_cache, prefill_fn, decode_fn):
        self.cache = kv_cache if kv_cache is not None else PagedKVCache(model.cfg, model.device)
        self.cache.reset()
        self.seqs = self.cache.add_sequences(batch)
        self.prefill_fn = prefill_fn if prefill_fn is not None else model.prefill
        self.decode_fn = decode_fn if decode_fn is not None else model.decode
        self.last_decode_args = None

    def prefill(self, prompt_ids):
        positions, slots = self.cache.prefill(self.seqs, prompt_ids.shape[1])
        return self.prefill_fn(prompt_ids, positions, slots, self.cache.kv_caches)

    def decode(self, tokens):
        self.last_decode_args = (tokens,) + self.cache.decode(self.seqs) + (self.cache.kv_caches,)
        return self.decode_fn(*self.last_decode_args)

    def replay_decode(self):
        """The last decode step again (it rewrites the same slots with the same values)."""
        return self.decode_fn(*self.last_decode_args)


class _DenseSession:
    def __init__(self, model: LlamaReference, batch: int, kv_cache, prefill_fn, decode_fn):
        self.caches = kv_cache if kv_cache is not None else model.new_cache(batch)
        self.prefill_fn = prefill_fn if prefill_fn is not None else model
        self.decode_fn = decode_fn if decode_fn is not None else model
        self.pos = 0
        self.last_decode_args = None
        self.device = model.model.device

    def prefill(self, prompt_ids):
        t = prompt_ids.shape[1]
        positions = torch.arange(t, device=self.device)
        self.pos = t
        return self.prefill_fn(prompt_ids, positions, self.caches)

    def decode(self, tokens):
        positions = torch.tensor([self.pos], device=self.device)
        self.pos += 1
        self.last_decode_args = (tokens[:, None], positions, self.caches)
        return self.decode_fn(*self.last_decode_args)

    def replay_decode(self):
        return self.decode_fn(*self.last_decode_args)


@dataclasses.dataclass
class Generation:
    tokens: torch.Tensor              # int64 [B, new_tokens] (CPU)
    logits: Optional[torch.Tensor]    # float32 [new_tokens, B, vocab] (CPU) or None
    session: object                   # replay_decode() reruns the last decode step


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, new_tokens: int, *,
             prefill_fn: Optional[Callable] = None, decode_fn: Optional[Callable] = None,
             kv_cache=None, return_logits: bool = True) -> Generation:
    """Greedy generation: a prefill of the prompts ``[B, T]`` (its token is the first new one),
    then ``new_tokens - 1`` decode steps.

    ``model`` is a ``Llama`` (paged cache: ``kv_cache`` a ``PagedKVCache``, reset here) or a
    ``LlamaReference`` (dense cache: a ``new_cache()`` list). ``prefill_fn`` / ``decode_fn``
    replace the model's step functions (compiled ones, see ``compile_steps``); their outputs
    are copied before the next step (CUDA graphs reuse their output memory).
    """
    if new_tokens < 1:
        raise ValueError("new_tokens must be >= 1")
    session_cls = _DenseSession if isinstance(model, LlamaReference) else _PagedSession
    session = session_cls(model, prompt_ids.shape[0], kv_cache, prefill_fn, decode_fn)
    tokens, logits = [], []
    tok, lg = session.prefill(prompt_ids)
    for step in range(new_tokens):
        if step:
            tok, lg = session.decode(tok)
        tok = tok.clone()
        tokens.append(tok.cpu())
        if return_logits:
            logits.append(lg.float().cpu())
    return Generation(torch.stack(tokens, dim=1),
                      torch.stack(logits) if return_logits else None, session)


def compile_steps(model, backend: str, *, cuda_graphs: Optional[bool] = None,
                  fullgraph: bool = True):
    """``(prefill_fn, decode_fn)``: ``model.prefill`` / ``model.decode`` (or a reference model's
    forward, twice) compiled separately with ``dynamic=False``; the decode step with
    ``mode="reduce-overhead"`` (CUDA graphs) when ``cuda_graphs`` (default: on a CUDA model)."""
    if isinstance(model, LlamaReference):
        prefill, decode, device = model, model, model.model.device
    else:
        prefill, decode, device = model.prefill, model.decode, model.device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    prefill_fn = torch.compile(prefill, backend=backend, fullgraph=fullgraph, dynamic=False)
    decode_fn = torch.compile(decode, backend=backend, fullgraph=fullgraph, dynamic=False,
                              mode="reduce-overhead" if cuda_graphs else None)
    return prefill_fn, decode_fn


# ---------------------------------------------------------------------------------------------
# Comparing generations
# ---------------------------------------------------------------------------------------------
# Logits are compared with the per-op table of compile_ops.testing widened for a whole model:
# every layer adds a few roundings (norms, RoPE, attention, activation, residual sums) whose
# one-ulp differences pass through the following GEMMs, and the lm_head sums over the hidden
# size. Measured on the CPU (reference kernels vs the plain-PyTorch model, logits ~ N(0, 1)):
# float32 max |diff| 1.4e-6 (tiny); bfloat16 0.027 (tiny), 0.023 / 0.047 (Llama 3 8B shapes with
# 1 / 4 layers, vocab cut to 8192). The 16-bit factors leave 3-4x room over those (the CUDA
# kernels differ from the references by a few ulps per op) and still catch a wrong formula (a
# wrong RoPE, norm or mask moves logits by O(1)); float32 differs by reduction order only.
_LOGIT_SCALE = {torch.float32: 10.0, torch.float16: 5.0, torch.bfloat16: 5.0}


def logits_tolerance(dtype: torch.dtype, layers: int = 2) -> dict:
    """atol/rtol for a model's logits in ``dtype``: ``TOLERANCES[dtype]`` times a factor that
    grows with the layers."""
    tol = TOLERANCES[dtype]
    k = _LOGIT_SCALE.get(dtype, 10.0) * max(1.0, layers / 2) ** 0.5
    return {name: value * k for name, value in tol.items()}


class Comparison(NamedTuple):
    ok: bool
    tokens_equal: bool
    max_logit_diff: float       # over the steps both runs saw the same history
    message: str


# FP8 under tensor parallelism: a row-parallel projection's dynamic per-token activation scale
# is the amax of the rank's slice of the row (as vLLM quantizes), not of the whole row, so a TP
# FP8 model quantizes differently from the one-process FP8 model; with static scales the codes
# are the same, but a last-bit difference of a partial sum can flip an FP8 code downstream.
# Measured on the tiny model (CPU, float32 and bfloat16, prefill logits ~ N(0, 1)): the TP FP8
# model is 0.08-0.15 (max |diff|) from the one-process FP8 model, and either FP8 model
# 0.18-0.23 from the unquantized one. atol 0.5 is FP8's own error with room; a split gone wrong
# moves them by O(1) (leaving out down_proj's all-reduce: 1.5, FP8 or not).
FP8_TP_LOGITS_TOLERANCE = {"atol": 0.5, "rtol": 0.0}
# FP8 fused vs unfused on the GPU: the fused norm/activation + quant ops compute a dynamic scale
# as vLLM does (amax / 448, an IEEE division), while the native formulation the unfused model
# runs, ``amax / 448`` on a CUDA tensor, is a multiply by the reciprocal in PyTorch's CUDA div (a
# Python scalar divisor): scales one ulp apart flip an FP8 code now and then. Seen on an H100 (4
# layers of Llama 3 8B, FP8 dynamic, batch 1 x 512): max |logit diff| 0.242 vs eager, where
# Inductor on the same model matched eager exactly. FP8's own error, as for TP.
FP8_LOGITS_TOLERANCE = FP8_TP_LOGITS_TOLERANCE


def compare_generations(expected: Generation, got: Generation, dtype: torch.dtype,
                        layers: int = 2, tol: Optional[dict] = None) -> Comparison:
    """Tokens equal and logits close; a different token is accepted only at a near tie (logits
    still within the tolerance at that step, and the expected run's margin between the two tokens
    at most 2 * atol), after which the histories differ and the comparison stops. ``tol``
    (atol/rtol) replaces ``logits_tolerance(dtype, layers)``."""
    tol = tol or logits_tolerance(dtype, layers)
    et, gt = expected.tokens, got.tokens
    steps = et.shape[1]
    diff_at = [(s, b) for s in range(steps) for b in range(et.shape[0]) if et[b, s] != gt[b, s]]
    last = diff_at[0][0] if diff_at else steps - 1
    max_diff = 0.0
    if expected.logits is not None and got.logits is not None:
        el, gl = expected.logits[: last + 1], got.logits[: last + 1]
        max_diff = float((el - gl).abs().max())
        bad = (el - gl).abs() > tol["atol"] + tol["rtol"] * el.abs()
        if bool(bad.any()):
            s, b, v = (int(i) for i in bad.nonzero()[0])
            return Comparison(False, not diff_at, max_diff,
                              f"logits differ beyond atol {tol['atol']:.2g} / rtol "
                              f"{tol['rtol']:.2g} (first at step {s}, sequence {b}, token {v}: "
                              f"{float(gl[s, b, v]):.6g} vs {float(el[s, b, v]):.6g}; "
                              f"max |diff| {max_diff:.3g})")
    if not diff_at:
        return Comparison(True, True, max_diff, f"tokens equal, max |logit diff| {max_diff:.2g}")
    s, b = diff_at[0]
    msg = f"tokens differ first at step {s}, sequence {b} ({int(gt[b, s])} vs {int(et[b, s])})"
    if expected.logits is None:
        return Comparison(False, False, max_diff, msg)
    el = expected.logits[s, b]
    margin = float(el[et[b, s]] - el[gt[b, s]])
    near_tie = margin <= 2 * tol["atol"]  # two logits, each off by at most atol
    return Comparison(near_tie, False, max_diff,
                      msg + (f": a near tie (margin {margin:.3g} within the tolerance), not an "
                             "error" if near_tie else f": margin {margin:.3g} is no tie"))


# ---------------------------------------------------------------------------------------------
# python -m compile_ops.models.llama
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_ms(session, device, steps: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            session.replay_decode()
        _sync(device)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            session.replay_decode()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _code_ops(codes) -> collections.Counter:
    """compile_ops ops that Inductor's generated code calls."""
    return collections.Counter(m.group(1) for code in codes for m in
                               re.finditer(r"torch\.ops\.compile_ops\.(\w+)\.default\(", code))


def _fmt_counter(c, sep=", ") -> str:
    return sep.join(f"{name} x{n}" for name, n in sorted(c.items())) or "none"


def _short_op(name: str) -> str:
    m = re.fullmatch(r"auto_functionalized\(compile_ops\.(\w+)\.default\)", name)
    if m:
        return m.group(1)
    return name.replace(".default", "")


def allreduce_norm_expected(cfg: LlamaConfig) -> int:
    """The ``allreduce_norm`` matches of one step's graph of a TP model: each layer's two
    all-reduces (o_proj's, down_proj's) each feed a residual add + RMSNorm (the post-attention
    norm; the next layer's input norm, or the final norm after the last layer), so 2 per layer:
    of the 2 * layers + 1 norms only the first layer's input norm, which reads the embedding,
    has no all-reduce in front of it."""
    return 2 * cfg.layers if cfg.tp > 1 else 0


def _allreduce_norm_lines(counters: dict, before: list, cfg: LlamaConfig) -> list[str]:
    import lowerings

    ar = counters.get("allreduce_norm", {})
    n_ar = sum(1 for op in before if op.startswith("_c10d_functional.all_reduce"))
    want = allreduce_norm_expected(cfg)
    installed = any(getattr(p, "name", "") == "allreduce_norm"
                    for p in lowerings.pass_manager().passes)
    if not installed and not ar:
        return [f"    allreduce_norm: no such pass in this build ({n_ar} all_reduce before the "
                f"passes; {want} of them feed an add + RMSNorm)"]
    why = ("2 per layer: each all-reduce, o_proj's and down_proj's, feeds an add + RMSNorm; "
           "the first layer's input norm reads the embedding")
    if cfg.fp8:  # the norms feed quantizing projections: the pass order decides who fuses
        why += "; FP8: fewer where norm_quant fused a norm with its quantization first"
    lines = [f"    allreduce_norm: matched {ar.get('matched', 0)} (expected {want}: {why}; "
             f"{n_ar} all_reduce before the passes)"]
    for k, n in sorted(ar.items()):
        if k.startswith("near_miss"):
            lines.append(f"    allreduce_norm: {k.replace('near_miss: ', 'near miss: ')} x{n}")
    return lines


def _graph_report(graph: str, counters: dict, before: list, after: list, cfg: LlamaConfig,
                  fused_add_norm: bool) -> list[str]:
    lines = [f"  {graph} graph:"]
    arn = counters.get("add_rms_norm", {})
    want = 0 if fused_add_norm else 2 * cfg.layers
    misses = {k[len("near_miss: "):]: v for k, v in arn.items() if k.startswith("near_miss")}
    lines.append(f"    add_rms_norm: matched {arn.get('matched', 0)} (expected {want}: "
                 + ("the model calls fused_add_rms_norm itself)" if fused_add_norm else
                    "2 per layer minus the first layer's input norm, plus the final norm)"))
    for reason, n in sorted(misses.items()):
        lines.append(f"    add_rms_norm: near miss x{n}: {reason}"
                     + (" (the first layer's input norm has no residual add: expected)"
                        if "embedding" in reason else ""))
    rc = counters.get("rope_cache", {})
    n_rope = sum(1 for op in before if "rotary_embedding" in op)
    n_paged = sum(1 for op in before if op.endswith("compile_ops.reshape_and_cache.default)"))
    lines.append(f"    rope_cache: matched {rc.get('matched', 0)} (expected {cfg.layers}: "
                 f"rotary_embedding + reshape_and_cache -> fused_rope_and_cache per layer; "
                 f"{n_rope} rotary_embedding, {n_paged} reshape_and_cache before the passes)")
    for k, n in sorted(rc.items()):
        if k.startswith("near_miss"):
            lines.append(f"    rope_cache: {k.replace('near_miss: ', 'near miss: ')} x{n}")
    if cfg.tp > 1:
        lines += _allreduce_norm_lines(counters, before, cfg)
    if cfg.fp8:
        nq, aq = counters.get("norm_quant", {}), counters.get("act_quant", {})
        if cfg.tp == 1:
            lines.append(f"    norm_quant: matched {nq.get('matched', 0)} (expected "
                         f"{2 * cfg.layers}: each layer's two norms feed an FP8 projection; the "
                         "final norm feeds the bf16 lm_head)")
        else:  # a norm fused with its all-reduce is no longer there for norm_quant
            k = counters.get("allreduce_norm", {}).get("matched", 0)
            lines.append(f"    norm_quant: matched {nq.get('matched', 0)} (expected "
                         f"{2 * cfg.layers - k}: each layer's two norms feed an FP8 projection, "
                         f"less the {k} allreduce_norm fused with their all-reduce; the final "
                         "norm feeds the bf16 lm_head)")
        want_aq = cfg.layers if cfg.fp8 == "static" else 0
        lines.append(f"    act_quant: matched {aq.get('matched', 0)} (expected {want_aq}"
                     + (": one per MLP)" if want_aq else ": no fused SiLU + per-token op)"))
        for name, c in (("norm_quant", nq), ("act_quant", aq)):
            for k, n in sorted(c.items()):
                if k.startswith("near_miss"):
                    lines.append(f"    {name}: {k.replace('near_miss: ', 'near miss: ')} x{n}")
    la = counters.get("lower_activation", {})
    lines.append(f"    lower_activation: matched {la.get('matched', 0)}")
    for k, n in sorted(la.items()):
        if k.startswith("near_miss"):
            lines.append(f"    lower_activation: {k.replace('near_miss: ', 'near miss: ')} x{n}")
    cb = collections.Counter(_short_op(o) for o in before if "compile_ops." in o)
    ca = collections.Counter(_short_op(o) for o in after if "compile_ops." in o)
    lines.append(f"    compile_ops ops before the passes: {_fmt_counter(cb)}")
    lines.append(f"    compile_ops ops after the passes:  {_fmt_counter(ca)}")
    ab = collections.Counter(_short_op(o) for o in before if "compile_ops." not in o)
    aa = collections.Counter(_short_op(o) for o in after if "compile_ops." not in o)
    lines.append(f"    other ops before ({len(before)} nodes in all): {_fmt_counter(ab)}")
    lines.append(f"    other ops after ({len(after)} nodes in all): {_fmt_counter(aa)}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m compile_ops.models.llama",
        description="A paged-KV Llama-style model: eager vs torch.compile(backend='inductor') vs "
                    "backend='compile_ops' (tokens, fusion report, decode step time).")
    p.add_argument("--config", default="tiny", help="tiny (default) or 8b-<n>layers, e.g. "
                   "8b-4layers (Llama 3 8B shapes with n layers); + '-fp8' (W8A8, dynamic "
                   "per-token activations) or '-fp8-static' (static per-tensor), e.g. "
                   "8b-4layers-fp8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU and the built kernels are there, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on cpu, the config's dtype (tiny: bfloat16) on cuda")
    p.add_argument("--attn", choices=ATTN_VERSIONS, default="auto", help="paged attention version")
    p.add_argument("--fused-add-norm", action="store_true",
                   help="the model calls fused_add_rms_norm itself (nothing left to fuse)")
    p.add_argument("--timing-steps", type=int, default=10,
                   help="decode steps timed per variant (median reported)")
    p.add_argument("--baseline", action="store_true",
                   help="also time the plain-PyTorch reference (dense KV) under inductor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (default 1): with N > 1 run under torchrun "
                        "--nproc-per-node N; each rank holds 1/N of the heads and of the MLP "
                        "(NCCL on cuda:LOCAL_RANK, gloo on the CPU); rank 0 prints")
    args = p.parse_args(argv)

    device = torch.device(args.device or (
        "cuda" if torch.cuda.is_available() and compile_ops.kernels_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU in this process")
    if args.tp < 1:
        p.error("--tp must be >= 1")
    if args.tp == 1:
        return _main_job(p, args, device)
    try:  # sizes that do not split: said before anything starts
        config_from_name(args.config, tp=args.tp)
    except ValueError as exc:
        p.error(str(exc))
    return _main_job_tp(p, args, device)


def init_tp(tp: int, device_type: str, error: Optional[Callable[[str], None]] = None):
    """Join the ``tp`` processes torchrun started (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in
    the environment): ``(rank, device)``, NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU.
    ``error(message)`` reports a wrong launch (default: raise RuntimeError)."""
    import os

    import torch.distributed as dist

    def fail(msg):
        if error is not None:
            error(msg)
        raise RuntimeError(msg)

    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    if world != tp:
        fail(f"--tp {tp}: run under torchrun --nproc-per-node {tp} (one process per rank; "
             f"WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'not set')})")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            fail(f"--tp {tp}: rank {local_rank} has no GPU of its own "
                 f"({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), device


def _main_job_tp(p, args, device) -> int:
    """The main job on ``args.tp`` ranks: every rank runs it in lockstep (each step's
    all-reduces pair them up), rank 0 prints; the exit code is the worst rank's."""
    import contextlib
    import os

    import torch.distributed as dist

    rank, device = init_tp(args.tp, device.type, p.error)
    try:
        with open(os.devnull, "w") as devnull, \
                contextlib.redirect_stdout(devnull if rank else sys.stdout):
            rc = _main_job(p, args, device)
        worst = torch.tensor([rc], device=device)
        dist.all_reduce(worst, dist.ReduceOp.MAX)
        return int(worst.item())
    finally:
        dist.destroy_process_group()


def _main_job(p, args, device) -> int:
    tp = args.tp
    overrides = {} if tp == 1 else {"tp": tp}
    if args.dtype:
        overrides["dtype"] = getattr(torch, args.dtype)
    elif device.type == "cpu":
        overrides["dtype"] = torch.float32
    elif args.config.startswith("tiny"):
        overrides["dtype"] = torch.bfloat16
    try:
        cfg = config_from_name(args.config, **overrides)
    except ValueError as exc:
        p.error(str(exc))
    # Sequences hold exactly the generation (block tables, RoPE table, paged attention's
    # max_seq_len and partitions, and the reference's dense cache are all sized to it).
    seq_blocks = -(-(args.prompt_len + args.new_tokens) // cfg.block_size)
    cfg = cfg.replace(max_blocks=seq_blocks, num_blocks=max(cfg.num_blocks,
                                                            args.batch * seq_blocks))
    cuda_graphs = device.type == "cuda"

    kernels = ("CUDA kernels" if device.type == "cuda" and compile_ops.kernels_available()
               else "reference kernels")
    print(f"llama {args.config}: {cfg.describe()}")
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens "
          f"(max_seq_len {cfg.max_seq_len}), {device.type} ({kernels}), paged attention "
          f"{args.attn}, "
          f"{'fused_add_rms_norm in the model' if args.fused_add_norm else 'add + rms_norm'}, "
          f"torch {torch.__version__}", flush=True)
    if tp > 1:
        import torch.distributed as dist

        print(f"tensor parallel: {tp} ranks ({dist.get_backend()}), each holds "
              f"{cfg.local_heads} of {cfg.heads} heads, {cfg.local_kv_heads} of {cfg.kv_heads} "
              f"KV heads (and their paged cache), {cfg.local_intermediate} of "
              f"{cfg.intermediate} of the MLP; embedding, norms and lm_head replicated; "
              "rank 0 prints", flush=True)

    t0 = time.perf_counter()
    print("building the model (random weights) ...", flush=True)
    model = Llama(cfg, seed=args.seed, device=device, attn_version=args.attn,
                  fused_add_norm=args.fused_add_norm)
    # TP: the one-process model from the same seed holds the weights the ranks sliced; the
    # reference computes its math
    full = model if tp == 1 else Llama(cfg.replace(tp=1), seed=args.seed, device=device,
                                       attn_version=args.attn,
                                       fused_add_norm=args.fused_add_norm)
    ref_model = LlamaReference(full)
    cache = PagedKVCache(cfg, device, seed=args.seed)
    if cuda_graphs:
        cache.mark_static()
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, cfg.vocab, (args.batch, args.prompt_len), generator=g).to(device)
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)

    total = args.prompt_len + args.new_tokens

    def dense_cache():  # sized to the generation, as a static cache would be
        caches = ref_model.new_cache(args.batch, max_len=total)
        if cuda_graphs:
            for kc, vc in caches:
                torch._dynamo.mark_static_address(kc)
                torch._dynamo.mark_static_address(vc)
        return caches

    print("reference (plain PyTorch, dense KV): generating ...", flush=True)
    reference = generate(ref_model, prompt, args.new_tokens, kv_cache=dense_cache())
    results, failures, step_ms, calls = {}, [], {}, {}
    report = []

    def check(name, gen, against, against_name, tol=None):
        cmp = compare_generations(against, gen, cfg.dtype, cfg.layers, tol)
        print(f"{name}: vs {against_name}: {cmp.message}", flush=True)
        if not cmp.ok:
            failures.append(f"{name} vs {against_name}: {cmp.message}")

    print("eager: generating ...", flush=True)
    results["eager"] = generate(model, prompt, args.new_tokens, kv_cache=cache)
    # FP8 on several ranks quantizes the row-parallel inputs per rank: FP8's own tolerance
    tp_tol = FP8_TP_LOGITS_TOLERANCE if tp > 1 and cfg.fp8 else None
    if tp > 1:
        one = generate(full, prompt, args.new_tokens,
                       kv_cache=PagedKVCache(cfg.replace(tp=1), device, seed=args.seed))
        check("eager", results["eager"], one, "the one-process model (tp=1, eager)"
              + (", FP8 tolerance" if tp_tol else ""), tp_tol)
        del one
    check("eager", results["eager"], reference, "reference (plain PyTorch, dense KV)"
          + (", FP8 tolerance" if tp_tol else ""), tp_tol)
    print("eager: timing the decode step ...", flush=True)
    step_ms["eager"] = _median_step_ms(results["eager"].session, device, args.timing_steps)

    import lowerings
    from torch._inductor.utils import run_and_get_code

    for backend in ("inductor", "compile_ops"):
        prefill_fn, decode_fn = compile_steps(model, backend, cuda_graphs=cuda_graphs)
        cache.reset()
        seqs = cache.add_sequences(args.batch)
        no_cache = (torch._inductor.config.patch(fx_graph_cache=False),
                    torch._functorch.config.patch(enable_autograd_cache=False))
        with no_cache[0], no_cache[1], torch.no_grad():  # the passes must run for the report
            lowerings.reset_counters()
            print(f"{backend}: compiling the prefill step ...", flush=True)
            t0 = time.perf_counter()
            positions, slots = cache.prefill(seqs, args.prompt_len)
            (tok, _), codes = run_and_get_code(prefill_fn, prompt, positions, slots,
                                               cache.kv_caches)
            calls[(backend, "prefill")] = _code_ops(codes)
            _sync(device)
            print(f"  compiled + first call {time.perf_counter() - t0:.1f} s", flush=True)
            pm = lowerings.pass_manager()
            graphs = [("prefill", lowerings.counters(), list(pm.ops_before), list(pm.ops_after))]
            lowerings.reset_counters()
            print(f"{backend}: compiling the decode step"
                  f"{' (mode=reduce-overhead: CUDA graphs)' if cuda_graphs else ''} ...",
                  flush=True)
            t0 = time.perf_counter()
            _, codes = run_and_get_code(decode_fn, tok.clone(), *cache.decode(seqs),
                                        cache.kv_caches)
            calls[(backend, "decode")] = _code_ops(codes)
            _sync(device)
            print(f"  compiled + first call {time.perf_counter() - t0:.1f} s", flush=True)
            graphs.append(("decode", lowerings.counters(), list(pm.ops_before),
                           list(pm.ops_after)))
        print(f"{backend}: generating ...", flush=True)
        gen = generate(model, prompt, args.new_tokens, prefill_fn=prefill_fn,
                       decode_fn=decode_fn, kv_cache=cache)
        results[backend] = gen
        check(backend, gen, results["eager"], "eager")
        print(f"{backend}: timing the decode step ...", flush=True)
        step_ms[backend] = _median_step_ms(gen.session, device, args.timing_steps)
        if backend == "compile_ops":
            report.append("fusion report (backend=compile_ops; lowerings.counters() and "
                          "pass_manager().ops_before/ops_after per compiled graph):")
            for name, counters, before, after in graphs:
                report += _graph_report(name, counters, before, after, cfg, args.fused_add_norm)

    if args.baseline:
        print("reference + inductor (plain PyTorch, dense KV): compiling and generating ...",
              flush=True)
        prefill_fn, decode_fn = compile_steps(ref_model, "inductor", cuda_graphs=cuda_graphs)
        gen = generate(ref_model, prompt, args.new_tokens, prefill_fn=prefill_fn,
                       decode_fn=decode_fn, kv_cache=dense_cache())
        check("reference+inductor", gen, reference, "reference")
        results["reference+inductor"] = gen
        step_ms["reference+inductor"] = _median_step_ms(gen.session, device, args.timing_steps)

    for line in report:
        print(line)
    print("compile_ops ops in the generated code:")
    for (name, graph), c in calls.items():
        print(f"  {name + ' ' + graph + ':':20s} {_fmt_counter(c)}")
    print(f"decode step, median of {args.timing_steps} ({device.type}, {str(cfg.dtype)[6:]}, "
          f"batch {args.batch}" + (f", tp {tp}, rank 0" if tp > 1 else "") + "):")
    for name, ms in step_ms.items():
        print(f"  {name:20s} {ms:8.3f} ms")
    names = ["reference"] + list(results)
    if failures:
        print("MISMATCH:\n  " + "\n  ".join(failures))
        return 1
    same = all(torch.equal(results[n].tokens, reference.tokens) for n in results)
    print(f"tokens agree: {', '.join(names)} ({args.batch} x {args.new_tokens} tokens)"
          + ("" if same else " (up to near ties, see above)"))
    print(f"first sequence: {reference.tokens[0].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
