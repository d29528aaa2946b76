"""Input checks shared by every op's reference body, fake kernel and CUDA binding.

One helper per argument kind, so the eager path and the fake (tracing) path raise the same error
for the same bad input. Messages start with the op name and name the offending argument.
Only metadata is read (dtype, device, shape, strides): the checks work on fake tensors.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(op: str, msg: str, exc=ValueError):
    raise exc(f"compile_ops.{op}: {msg}")


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} must be float32, float16 or bfloat16, got {t.dtype}", TypeError)


def check_like(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "input",
               *, shape: bool = True) -> None:
    """`t` has the dtype and device of `ref` (and its shape when `shape`)."""
    check_tensor(op, name, t)
    if t.dtype != ref.dtype:
        fail(op, f"{name} must have dtype {ref.dtype} (same as {ref_name}), got {t.dtype}",
             TypeError)
    if t.device != ref.device:
        fail(op, f"{name} must be on device {ref.device} (same as {ref_name}), got {t.device}")
    if shape and t.shape != ref.shape:
        fail(op, f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                 f"got {tuple(t.shape)}")


def check_rows(op: str, name: str, t: torch.Tensor, *, writable: bool) -> None:
    """`t` is rows of t.size(-1) contiguous elements with a single row stride.

    The last dimension must be contiguous; the leading dimensions must collapse into one stride
    (a slice of a wider tensor is fine, a transposed one is not). Rows that are written must not
    overlap in memory; rows that are only read may (a broadcast input, stride 0).
    """
    if t.dim() < 1:
        fail(op, f"{name} must have at least one dimension, got a 0-d tensor")
    if t.numel() == 0:  # no rows ([2, 0, hidden] included): nothing is read or written
        return
    hidden = t.size(-1)
    if hidden > 1 and t.stride(-1) != 1:
        fail(op, f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    row_stride, expect = None, None
    for d in range(t.dim() - 2, -1, -1):
        if t.size(d) == 1:
            continue
        if expect is None:
            row_stride = t.stride(d)
        elif t.stride(d) != expect:
            fail(op, f"{name} leading dimensions must collapse into rows with one stride, got "
                     f"shape {tuple(t.shape)} and strides {t.stride()}")
        expect = t.stride(d) * t.size(d)
    if writable and row_stride is not None and row_stride < hidden:
        fail(op, f"{name} rows overlap in memory (row stride {row_stride} < hidden size {hidden})")


def check_no_partial_overlap(op: str, name: str, t: torch.Tensor, other_name: str,
                             other: torch.Tensor, *, allow_same: bool) -> None:
    """Two real tensors written by one op must not share memory (unless exactly the same view).

    Skipped for tensors without storage (fake or meta), where addresses are unknown.
    """
    if t.device.type == "meta" or _is_fake(t) or _is_fake(other):
        return
    if t.untyped_storage().data_ptr() != other.untyped_storage().data_ptr():
        return
    if t.numel() == 0 or other.numel() == 0:
        return
    if allow_same and t.data_ptr() == other.data_ptr() and t.stride() == other.stride() \
            and t.shape == other.shape:
        return
    lo_a, hi_a = _extent(t)
    lo_b, hi_b = _extent(other)
    if lo_a < hi_b and lo_b < hi_a and not _disjoint_columns(t, other):
        fail(op, f"{name} and {other_name} overlap in memory; pass separate tensors")


def _row_geometry(t: torch.Tensor):
    """t's elements as a strided set: the (size, stride) pairs, strides in elements, of its dims
    of more than one element (the base offset comes from the data pointer). Every view has one;
    _disjoint_columns decides on these sets rather than on t's dim order, so rows may span
    several leading dims, heads may be strided and inner dims permuted."""
    return tuple((s, st) for s, st in zip(t.shape, t.stride()) if s != 1)


def _disjoint_columns(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Interleaved views whose extents overlap but whose elements do not: column slices of one
    row-major buffer (query and key inside a fused qkv tensor, with rows over one dim or several:
    [tokens] or [batch, seq]), head slices of a padded [..., heads, head_size + pad] buffer, the
    permuted halves of one FlashInfer [blocks, 2, heads, block, head] cache.

    Exact for such views, conservative otherwise (False: they may overlap). A strided set is
    {base + sum k_i s_i}. For a period P (one of the strides) with every stride >= P a multiple
    of P and the dims of stride < P within one row (base mod P plus their extent <= P), each
    element is P * row + column with the rows and the columns two smaller strided sets, and the
    set is their product: two such sets are disjoint exactly when their columns or their rows
    are. Recursion on both; the base case compares extents.
    """
    if a.element_size() != b.element_size():
        return False
    delta = b.data_ptr() - a.data_ptr()
    if delta % a.element_size():
        return False

    def extent(base, dims):
        return base, base + sum((s - 1) * st for s, st in dims) + 1

    def split(base, dims, p):
        """(columns, rows) of a strided set for the period p, or None."""
        inner = tuple((s, st) for s, st in dims if st < p)
        outer = tuple((s, st) for s, st in dims if st >= p)
        col = base % p
        if any(st % p for _, st in outer) or extent(col, inner)[1] > p:
            return None
        return (col, inner), ((base - col) // p, tuple((s, st // p) for s, st in outer))

    memo = {}

    def disjoint(x, y):
        (lo_x, hi_x), (lo_y, hi_y) = extent(*x), extent(*y)
        if hi_x <= lo_y or hi_y <= lo_x:
            return True
        if (x, y) not in memo:
            memo[(x, y)] = False  # strides shrink (p > 1) or dims drop: no cycles; a guard
            for p in sorted({st for _, st in x[1] + y[1] if st > 1}):
                sx, sy = split(*x, p), split(*y, p)
                if sx is not None and sy is not None and (
                        disjoint(sx[0], sy[0]) or disjoint(sx[1], sy[1])):
                    memo[(x, y)] = True
                    break
        return memo[(x, y)]

    return disjoint((0, _row_geometry(a)), (delta // a.element_size(), _row_geometry(b)))


def _extent(t: torch.Tensor):
    lo = t.data_ptr()
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return lo, lo + span * t.element_size()


def _is_fake(t: torch.Tensor) -> bool:
    # Fake tensors, and functional or other wrappers around them, have no real addresses.
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)


def check_weight(op: str, weight, input: torch.Tensor) -> None:
    check_like(op, "weight", weight, input, shape=False)
    if input.dim() < 1:  # before size(-1): a 0-d input has no hidden size to check against
        fail(op, "input must have at least one dimension, got a 0-d tensor")
    hidden = input.size(-1)
    if weight.dim() != 1 or weight.size(0) != hidden:
        fail(op, f"weight must be a 1-D tensor of size {hidden} (input.size(-1)), "
                 f"got shape {tuple(weight.shape)}")
    if hidden > 1 and weight.stride(0) != 1:
        fail(op, f"weight must be contiguous, got stride {weight.stride()}")


def check_epsilon(op: str, epsilon) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (float, int)):
        fail(op, f"epsilon must be a float, got {type(epsilon).__name__}", TypeError)
    if not (0.0 <= float(epsilon) < float("inf")):
        fail(op, f"epsilon must be finite and >= 0, got {epsilon}")


def check_out(op: str, name: str, t, input: torch.Tensor, dtypes, *, shape=None,
              shape_note: str = "", contiguous: bool = True) -> None:
    """An output tensor of the quant ops: a dtype among `dtypes`, input's device, the shape of
    input (or `shape`, described by `shape_note`), contiguous unless told otherwise."""
    check_tensor(op, name, t)
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        fail(op, f"{name} must have dtype {names}, got {t.dtype}", TypeError)
    if t.device != input.device:
        fail(op, f"{name} must be on device {input.device} (same as input), got {t.device}")
    if shape is None and t.shape != input.shape:
        fail(op, f"{name} must have the shape of input {tuple(input.shape)}, got "
                 f"{tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        fail(op, f"{name} must have shape {tuple(shape)}{shape_note}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        fail(op, f"{name} must be contiguous, got strides {t.stride()}")


def check_float32(op: str, name: str, t, input: torch.Tensor) -> None:
    """A float32 tensor (a scale) on input's device."""
    check_tensor(op, name, t)
    if t.dtype != torch.float32:
        fail(op, f"{name} must have dtype torch.float32, got {t.dtype}", TypeError)
    if t.device != input.device:
        fail(op, f"{name} must be on device {input.device} (same as input), got {t.device}")
