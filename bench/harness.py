"""Shared benchmark harness: timing, bandwidth, the device's copy bandwidth, and reports.

Timing rules (see the README's benchmarking section):
- CUDA events, warm-up first, median of repeats.
- Small cases run under a captured CUDA graph that holds one call per input set, so launch
  overhead stays out of the figure; large cases are timed as plain launches between events.
  BENCH_GRAPH_BELOW_MIB moves that line (a large value: every case as graph replays, e.g. when
  other work shares the host's CPUs and would slow the launches).
- Several input sets are rotated so that repeated calls do not measure a warm L2 (up to what fits
  in memory budget); each result records whether its working set still fit in L2.
- The reference copy bandwidth is the best of several >= 1 GiB device-to-device copies in the same
  process, counting bytes read plus bytes written. Percentages are relative to it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch

# Benchmarks run from a checkout (python bench/bench_x.py) with or without an installed package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

GRAPH_BELOW_BYTES = int(os.environ.get("BENCH_GRAPH_BELOW_MIB", "512")) << 20
# CUDA graphs for calls moving less than this (Python and guard overhead of eager and compiled
# callables would otherwise show up at mid sizes)
ROTATE_BUDGET_BYTES = 4 << 30  # at most this much memory for rotated input sets
MAX_SETS = 64
MIN_SETS = 2  # in-place ops would otherwise find their own last writes in L2


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {
        "device": p.name,
        "sm_count": p.multi_processor_count,
        "l2_bytes": getattr(p, "L2_cache_size", 0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
    }


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def copy_bandwidth(sizes=(1 << 30, 2 << 30), repeats: int = 10) -> float:
    """Best device-to-device copy rate in bytes/s, counting read + write (2 * nbytes).

    Best over `repeats` copies at each size (>= 1 GiB, far past L2), timed with CUDA events.
    """
    best_rate = 0.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for nbytes in sizes:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        for _ in range(repeats):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best_rate = max(best_rate, 2 * nbytes / (start.elapsed_time(end) / 1e3))
        del src, dst
        torch.cuda.empty_cache()
    return best_rate


def num_sets(bytes_per_call: int) -> int:
    """Input sets to rotate: enough to spill L2 three times over, within the memory budget."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size or (50 << 20)
    want = math.ceil(3 * l2 / max(bytes_per_call, 1))
    fit = max(1, ROTATE_BUDGET_BYTES // max(bytes_per_call, 1))
    return max(MIN_SETS, min(want, fit, MAX_SETS))


def time_calls(calls: list, bytes_per_call: int, *, use_graph: bool | None = None,
               repeats: int = 20, min_ms: float = 20.0, agree=None,
               capture_error_mode: str = "global") -> dict:
    """Median seconds per call of rotating through `calls` (zero-argument callables).

    Each callable must do the same work on its own input set. Returns seconds and method.
    `agree` (processes that time collectives together, e.g. the ranks of a TP model): a function
    of (value, dtype) returning the value agreed by every process (their max); the calls per
    sample and the median are agreed with it, so every process replays as often as the others
    and the result is the slowest one's. `capture_error_mode`: torch.cuda.graph's ("thread_local"
    where another thread, NCCL's watchdog, queries events during capture).
    """
    if use_graph is None:
        use_graph = bytes_per_call < GRAPH_BELOW_BYTES
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: compilation, autotuning, allocator
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    if use_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
            for c in calls:
                c()
        run = graph.replay
    else:
        def run():
            for c in calls:
                c()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # Size one timed sample to last at least min_ms.
    run()
    start.record()
    run()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    inner = max(1, int(min_ms / once))
    if agree is not None:
        inner = int(agree(inner, torch.int64))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / (inner * len(calls)))
    if use_graph:
        del graph
    median = statistics.median(samples)
    return {"seconds": median if agree is None else agree(median, torch.float64),
            "spread": (max(samples) - min(samples)) / median, "graph": use_graph,
            "sets": len(calls)}


@dataclass
class Result:
    case: dict
    variant: str
    seconds: float
    bytes: int
    graph: bool
    sets: int
    spread: float
    l2_resident: bool
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9


def _keep_outputs(call):
    """Hold each set's last outputs alive, so that under graph capture every set writes its own
    buffers. Otherwise the allocator hands every call the same freed block: an out-of-place
    variant then keeps rewriting a few L2-resident buffers, which an in-place op cannot do."""
    box = [None]

    def run():
        box[0] = call()
    return run


def measure(case: dict, variant: str, make_call, bytes_per_call: int, **kw) -> Result:
    """Build `num_sets` input sets with make_call() -> callable, time them, return a Result."""
    n = num_sets(bytes_per_call)
    calls = [_keep_outputs(make_call()) for _ in range(n)]
    t = time_calls(calls, bytes_per_call, **kw)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size or (50 << 20)
    res = Result(case, variant, t["seconds"], bytes_per_call, t["graph"], t["sets"], t["spread"],
                 l2_resident=n * bytes_per_call <= l2)
    del calls
    return res


class Report:
    """Collects results; writes JSON, a markdown table and a plot under bench/results/."""

    def __init__(self, name: str, copy_bw: float, baseline: str, case_keys: list[str]):
        self.name = name
        self.info = device_info()
        self.copy_bw = copy_bw
        self.baseline = baseline
        self.case_keys = case_keys
        self.results: list[Result] = []

    def add(self, r: Result) -> None:
        self.results.append(r)
        pct = 100 * r.bytes / r.seconds / self.copy_bw
        case = " ".join(f"{k}={r.case[k]}" for k in self.case_keys)
        print(f"{case:<40} {r.variant:<24} {r.seconds * 1e6:9.2f} us {r.gbps:8.1f} GB/s "
              f"{pct:6.1f}%{'  (L2)' if r.l2_resident else ''}", flush=True)

    def _rows(self):
        by_case: dict[tuple, dict[str, Result]] = {}
        for r in self.results:
            by_case.setdefault(tuple(r.case[k] for k in self.case_keys), {})[r.variant] = r
        return by_case

    def markdown(self) -> str:
        i = self.info
        lines = [
            f"# {self.name} on {i['device']}",
            "",
            f"torch {i['torch']} (CUDA {i['cuda']}), triton {i['triton']}; {i['sm_count']} SMs. "
            f"Measured copy bandwidth (best of ten 1 GiB and ten 2 GiB device-to-device copies, "
            f"read + write): "
            f"**{self.copy_bw / 1e9:.0f} GB/s**. `%copy` = achieved / that. "
            f"`x{self.baseline}` = time of `{self.baseline}` / time of the row's variant "
            f"(> 1 means faster). `graph`: timed as CUDA-graph replays. `L2`: the rotated inputs "
            f"fit in L2, so the figure is not a DRAM rate.",
            "",
            "| " + " | ".join(self.case_keys) + " | variant | µs | GB/s | %copy | "
            f"x{self.baseline} | graph | L2 |",
            "|" + "---|" * (len(self.case_keys) + 7),
        ]
        for key, variants in self._rows().items():
            base = variants.get(self.baseline)
            for v, r in variants.items():
                ratio = f"{base.seconds / r.seconds:.2f}" if base else "-"
                lines.append(
                    "| " + " | ".join(str(k) for k in key) + f" | {v} | {r.seconds * 1e6:.2f} | "
                    f"{r.gbps:.0f} | {100 * r.bytes / r.seconds / self.copy_bw:.1f} | {ratio} | "
                    f"{'y' if r.graph else 'n'} | {'y' if r.l2_resident else 'n'} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str, stem: str, plot_x: str | None = None,
              plot_group: list[str] | None = None) -> list[str]:
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        data = {"info": self.info, "copy_bandwidth_Bps": self.copy_bw, "argv": sys.argv,
                "results": [dict(asdict(r), gbps=r.gbps,
                                 pct_copy=100 * r.bytes / r.seconds / self.copy_bw)
                            for r in self.results]}
        p = os.path.join(out_dir, f"{stem}.json")
        with open(p, "w") as f:
            json.dump(data, f, indent=1)
        paths.append(p)
        p = os.path.join(out_dir, f"{stem}.md")
        with open(p, "w") as f:
            f.write(self.markdown())
        paths.append(p)
        if plot_x:
            p = self.plot(os.path.join(out_dir, f"{stem}.png"), plot_x, plot_group or [])
            if p:
                paths.append(p)
        return paths

    def plot(self, path: str, x_key: str, group_keys: list[str]) -> str | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
            return None
        groups: dict[tuple, list[Result]] = {}
        for r in self.results:
            groups.setdefault(tuple(r.case[k] for k in group_keys), []).append(r)
        n = len(groups)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, (g, rs) in zip(axes.flat, groups.items()):
            variants = sorted({r.variant for r in rs})
            for v in variants:
                pts = sorted((r.case[x_key], 100 * r.bytes / r.seconds / self.copy_bw)
                             for r in rs if r.variant == v)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.set_ylabel("% of copy bandwidth")
            ax.set_ylim(0, 105)
            ax.set_title(", ".join(f"{k}={v}" for k, v in zip(group_keys, g)), fontsize=9)
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{self.name} on {self.info['device']} (torch {self.info['torch']})")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_common_args(p) -> None:
    """--dtype, --cpu-check and --out, shared by the benchmark scripts."""
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--cpu-check", action="store_true",
                   help="no GPU needed: compile every variant on the CPU at a small size and "
                        "check numerics (and fusion counts); no timing")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))


def start(args):
    """Common start: compile settings, seed; unless --cpu-check, require the GPU and the kernels
    and measure the copy bandwidth. Returns (dtype, copy bandwidth or None)."""
    import compile_ops

    setup_compile()
    torch.manual_seed(0)
    if args.cpu_check:
        return DTYPES[args.dtype], None
    if not torch.cuda.is_available() or not compile_ops.kernels_available():
        sys.exit(f"needs a GPU and the built kernels ({compile_ops.kernels_unavailable_reason()})")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    return DTYPES[args.dtype], bw


def device_stem(prefix: str) -> str:
    return f"{prefix}_{torch.cuda.get_device_name(0).replace('NVIDIA ', '').split()[0]}"


def setup_compile():
    """torch.compile settings for benchmarking many static shapes in one process."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 100_000)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = 100_000
    elif hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = 100_000
