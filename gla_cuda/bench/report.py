"""The report: the table's lines and ratios, bench.json and bench.csv, the progress bar."""
from __future__ import annotations

import json
import os
import sys
import time

from gla_cuda.bench.cases import DTYPES, floor_bytes


def first_line(e):
    """One line saying why a call failed, for the table."""
    text = str(e).strip()
    if text.startswith("gla_cuda: no backend can run"):  # the dispatcher's table: keep the reasons
        reasons = [l.strip() for l in text.splitlines()[2:] if l.strip() and "available" not in l]
        text = text.splitlines()[0] + (" (" + "; ".join(reasons) + ")" if reasons else "")
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def derived(results, row):
    """{mode: {"vs_fla", "vs_sdpa", "floor"}} for one row: fla's ms / ours, the best SDPA's
    ms / ours and floor ms / ours, from rows of the same shape and dtype (None if missing)."""
    same = {r["backend"]: r for r in results["rows"]
            if tuple(r["shape"]) == tuple(row["shape"]) and r["dtype"] == row["dtype"]}
    bw = results.get("copy_bandwidth_GBps")
    itemsize = DTYPES[row["dtype"]].itemsize
    out = {}
    for mode, ms in row["ms"].items():
        fla = same.get("fla", {}).get("ms", {}).get(mode)
        sdpa = [same[n]["ms"][mode] for n in ("sdpa_flash", "sdpa_cudnn") if mode in same.get(n, {}).get("ms", {})]
        floor = floor_bytes(*row["shape"], mode, itemsize) / (bw * 1e9) * 1e3 if bw else None
        out[mode] = {"vs_fla": fla / ms if fla else None, "vs_sdpa": min(sdpa) / ms if sdpa else None,
                     "floor": floor / ms if floor else None}
    return out


def row_line(results, r, mode):
    d = derived(results, r)[mode]
    peak = (r.get("peak_bytes") or {}).get(mode)
    host = (r.get("host_ms") or {}).get(mode)
    # "!": the host needs at least 90% of the measured time per call, so the time is
    # (nearly) host-bound and moves with host speed
    bound = "!" if host is not None and host >= 0.9 * r["ms"][mode] else " "
    return (f"{r['backend']:<11} {mode:<7} {r['ms'][mode]:>9.3f} {_fmt(d['vs_fla'], '.2f'):>7} "
            f"{_fmt(d['vs_sdpa'], '.2f'):>8} {_fmt(d['floor'] and 100 * d['floor'], '.0f'):>7} "
            f"{_fmt(peak and peak / 2**20, '.0f'):>9} {_fmt(host):>8}{bound}")


HEADER = (f"{'backend':<11} {'mode':<7} {'ms':>9} {'vs fla':>7} {'vs SDPA':>8} {'floor %':>7} {'peak MiB':>9} "
          f"{'host ms':>8}")


CSV_COLUMNS = ("mode", "dtype", "B", "T", "H", "K", "V", "backend", "ms", "vs_fla", "vs_sdpa", "floor_fraction",
               "peak_MiB", "host_ms")


def save(results, out_dir):
    """bench.json (everything, with the ratios) and bench.csv (one line per row and mode)."""
    os.makedirs(out_dir, exist_ok=True)
    for r in results["rows"]:
        r["derived"] = derived(results, r)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "bench.csv"), "w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for r in results["rows"]:
            for mode, ms in r["ms"].items():
                d, peak = r["derived"][mode], (r.get("peak_bytes") or {}).get(mode)
                host = (r.get("host_ms") or {}).get(mode)
                cells = [mode, r["dtype"], *r["shape"], r["backend"], f"{ms:.5g}"] + \
                        ["" if d[x] is None else f"{d[x]:.4g}" for x in ("vs_fla", "vs_sdpa", "floor")] + \
                        ["" if peak is None else f"{peak / 2**20:.1f}", "" if host is None else f"{host:.4g}"]
                f.write(",".join(map(str, cells)) + "\n")
    return [os.path.join(out_dir, n) for n in ("bench.json", "bench.csv")]



# ----------------------------------------------------------------------------
# Progress bar
# ----------------------------------------------------------------------------

class Progress:
    """A one-line bar on stderr: steps done of the total, what runs now, time spent and an
    estimate of what is left. It is redrawn in place, so by default it is drawn only when
    stderr is a terminal (a log file gets the table alone). ``write`` prints a line of the
    table (stdout) above it."""

    def __init__(self, total, enabled=None, stream=None, width=24):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.width = max(1, total), 0, width
        self.label, self.t0, self._len = "", time.perf_counter(), 0

    def _clear(self):
        if self.enabled and self._len:
            self.stream.write("\r" + " " * self._len + "\r")
            self.stream.flush()
            self._len = 0

    def _draw(self):
        if not self.enabled:
            return
        frac = min(1.0, self.done / self.total)
        fill = int(round(frac * self.width))
        spent = time.perf_counter() - self.t0
        left = f", ~{_clock(spent / self.done * (self.total - self.done))} left" if 0 < self.done < self.total else ""
        text = (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} {_clock(spent)}{left}"
                f"  {self.label}")[:max(40, _columns() - 1)]
        self.stream.write("\r" + text + " " * max(0, self._len - len(text)))
        self.stream.flush()
        self._len = len(text)

    def start(self, label):
        self.label = label
        self._draw()

    def advance(self, n=1):
        self.done += n
        self._draw()

    def write(self, line=""):
        self._clear()
        print(line, flush=True)
        self._draw()

    def close(self):
        self._clear()


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _columns():
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or 100  # 0: a pseudo-terminal without a size
    except (OSError, ValueError, AttributeError):
        return 100
