"""Plots of a benchmark run (``gla_cuda.bench.run``'s results): time vs sequence length.

Rows that share (B*T, H, K, V, dtype) hold the tokens per batch constant while T varies, so a
line per backend shows how each scales with T at equal work: flat for linear attention,
growing for softmax attention. One PNG per group, forward and forward+backward side by side
on log axes, with the memory floor dashed when the run measured the copy bandwidth. A group
with a single T (``--quick``) becomes bar charts.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List

from gla_cuda.bench.cases import DTYPES, floor_bytes

PLOT_MODES = ("fwd", "fwdbwd")
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward"}
# one colour per backend in every figure: ours warm, baselines cool
COLORS = {"auto": "C3", "cuda": "C1", "triton": "C6", "reference": "C7", "fla": "C0",
          "sdpa_flash": "C2", "sdpa_cudnn": "C9"}


def _groups(rows) -> Dict[tuple, list]:
    """(B*T, H, K, V, dtype) -> rows, in first-seen order (decode rows are left out). A B = 1
    row with T above a group's tokens joins that group: it is where a sweep
    (B = max(1, tokens // T)) ran out of batch."""
    groups = defaultdict(list)
    for r in rows:
        if not any(m in r["ms"] for m in PLOT_MODES):
            continue
        B, T, H, K, V = r["shape"]
        groups[(B * T, H, K, V, r.get("dtype", "bf16"))].append(r)
    for key in list(groups):
        shapes = {tuple(r["shape"]) for r in groups[key]}
        B, T = next(iter(shapes))[:2]
        if B == 1 and len(shapes) == 1:
            below = [k for k in groups if k[1:] == key[1:] and k[0] < T]
            if below:
                groups[max(below)] += groups.pop(key)
    return groups


def _color(name, i):
    return COLORS.get(name, f"C{(i + 4) % 10}")


def plot(results: dict, out_dir: str) -> List[str]:
    """Draws one PNG per shape group into out_dir; returns the paths written."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("gla_cuda.bench.plots needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(out_dir, exist_ok=True)
    title = f"{results.get('device', '?')}, {results.get('date', '')}"
    bw = results.get("copy_bandwidth_GBps")
    paths = []
    for (tokens, H, K, V, dtype), rows in _groups(results.get("rows", [])).items():
        # mode -> backend -> {T: ms}; a backend without a mode (forward only) is left out of it
        series = {m: defaultdict(dict) for m in PLOT_MODES}
        shapes = {}
        for r in rows:
            shapes[r["shape"][1]] = r["shape"]
            for m in PLOT_MODES:
                if m in r["ms"]:
                    series[m][r["backend"]][r["shape"][1]] = r["ms"][m]
        modes = [m for m in PLOT_MODES if series[m]]
        Ts = sorted({T for m in modes for s in series[m].values() for T in s})
        fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.6), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            s_mode = series[mode]
            if len(Ts) > 1:
                for i, (name, s) in enumerate(s_mode.items()):
                    xs = sorted(s)
                    ax.plot(xs, [s[T] for T in xs], marker="o", label=name, color=_color(name, i))
                if bw:
                    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 2
                    ax.plot(Ts, [floor_bytes(*shapes[T], mode, itemsize) / (bw * 1e9) * 1e3 for T in Ts],
                            "k--", lw=1, label="memory floor")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")  # 2, not 2x10^0
                ax.yaxis.set_major_formatter(plain)
                lo, hi = ax.get_ylim()
                # label minor ticks only when under a decade shows few major ones
                ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else matplotlib.ticker.NullFormatter())
                # a sweep's last points may hold more tokens than the group (B stuck at 1)
                ax.set_xticks(Ts, [f"{T // 1024}K\n(B=1)" if T > tokens else f"{T // 1024}K" if T % 1024 == 0
                                   else str(T) for T in Ts])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_xlabel(f"sequence length T (B = {tokens} / T)")
                ax.legend(fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
            else:
                names = list(s_mode)
                bars = ax.bar(range(len(names)), [s_mode[n][Ts[0]] for n in names],
                              color=[_color(n, i) for i, n in enumerate(names)])
                ax.bar_label(bars, fmt="%.3g", fontsize=8)
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
                ax.set_xlabel(f"backend (B = {shapes[Ts[0]][0]}, T = {Ts[0]})")
                ax.grid(True, axis="y", alpha=0.3)
            ax.set_ylabel("ms")
            ax.set_title(MODE_TITLES[mode])
        fig.suptitle(f"GLA, {tokens} tokens per batch, H={H} K={K} V={V}, {dtype} — {title}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_N{tokens}_H{H}_K{K}_V{V}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)  # many figures in one run: free each
        paths.append(path)
    return paths
