"""Plots of a benchmark run (``gla_cuda.bench.run``'s results): time vs sequence length.

Rows that share (B*T, H, K, V) hold the tokens per batch constant while T varies, so a line
per backend shows how each scales with T at equal work for linear attention.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List

PLOT_MODES = ("fwd", "fwdbwd")


def _groups(rows) -> Dict[tuple, list]:
    """(B*T, H, K, V) -> rows, in first-seen order. A B = 1 row with T above a group's tokens
    joins that group: it is where a sweep (B = max(1, tokens // T)) ran out of batch."""
    groups = defaultdict(list)
    for r in rows:
        B, T, H, K, V = r["shape"]
        groups[(B * T, H, K, V)].append(r)
    for key in list(groups):
        shapes = {tuple(r["shape"]) for r in groups[key]}
        B, T = next(iter(shapes))[:2]
        if B == 1 and len(shapes) == 1:
            below = [k for k in groups if k[1:] == key[1:] and k[0] < T]
            if below:
                groups[max(below)] += groups.pop(key)
    return groups


def plot(results: dict, out_dir: str) -> List[str]:
    """Draws one PNG per (shape group, mode) into out_dir; returns the paths written."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("gla_cuda.plots needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(out_dir, exist_ok=True)
    title = f"{results.get('device', '?')}, {results.get('date', '')}"
    paths = []
    for (tokens, H, K, V), rows in _groups(results.get("rows", [])).items():
        for mode in PLOT_MODES:
            # backend -> {T: ms}; a backend without this mode (forward only) is left out
            series = defaultdict(dict)
            for r in rows:
                if mode in r["ms"]:
                    series[r["backend"]][r["shape"][1]] = r["ms"][mode]
            if not series:
                continue
            Ts = sorted({T for s in series.values() for T in s})
            fig, ax = plt.subplots(figsize=(7, 4.5))
            if len(Ts) > 1:
                for name, s in series.items():
                    xs = sorted(s)
                    ax.plot(xs, [s[T] for T in xs], marker="o", label=name)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")  # 2, not 2x10^0
                ax.yaxis.set_major_formatter(plain)
                lo, hi = ax.get_ylim()
                # label minor ticks only when under a decade shows few major ones
                ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else matplotlib.ticker.NullFormatter())
                # a sweep's last points may hold more tokens than the group (B stuck at 1)
                ax.set_xticks(Ts, [f"{T}\n(B=1)" if T > tokens else str(T) for T in Ts])
                ax.set_xlabel("sequence length T (B = max(1, tokens / T))")
                ax.legend(fontsize=8)
            else:
                names = list(series)
                bars = ax.bar(range(len(names)), [series[n][Ts[0]] for n in names],
                              color=[f"C{i % 10}" for i in range(len(names))])
                ax.bar_label(bars, fmt="%.3g", fontsize=8)
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
                ax.set_xlabel(f"backend (T = {Ts[0]})")
            ax.set_ylabel(f"{mode} time (ms)")
            ax.set_title(f"GLA {mode}, {tokens} tokens, H={H} K={K} V={V}\n{title}", fontsize=10)
            ax.grid(True, which="both", axis="y" if len(Ts) == 1 else "both", alpha=0.3)
            fig.tight_layout()
            path = os.path.join(out_dir, f"bench_{mode}_N{tokens}_H{H}_K{K}_V{V}.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)  # many figures in one run: free each
            paths.append(path)
    return paths
