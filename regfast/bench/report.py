"""Where results go: a CSV (one row per case, with the run's device, versions, commit and time), a table
for the terminal, a markdown table for the README, and a PNG chart of the speed-ups.

Every row carries the run's metadata, so that rows from different runs can be concatenated.
"""

from __future__ import annotations

import csv
import datetime
import importlib
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path

import torch

import regfast

from .suite import Result

__all__ = ["COLUMNS", "CsvWriter", "chart", "headline", "markdown", "metadata", "read_csv", "table"]

RESULT_COLUMNS = [f.name for f in fields(Result)]
META_COLUMNS = ["device", "device_name", "copy_gbps", "mode", "torch", "triton", "regfast", "python", "commit",
                "timestamp"]
COLUMNS = ["device", *RESULT_COLUMNS, *META_COLUMNS[1:]]


def _commit() -> str:
    """The checkout's commit (``+dirty`` when it has changes), or empty outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _triton_version() -> str:
    try:
        return importlib.import_module("triton").__version__
    except Exception:  # Triton is optional; any import failure means it is absent
        return ""


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (with its core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def metadata(device: torch.device, mode: str, copy_gbps: float | None) -> dict[str, object]:
    """The run's device, copy bandwidth, mode, versions, commit and UTC timestamp."""
    return {
        "device": device.type, "device_name": device_name(device), "copy_gbps": copy_gbps, "mode": mode,
        "torch": torch.__version__, "triton": _triton_version(), "regfast": regfast.__version__,
        "python": platform.python_version(), "commit": _commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cell(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


class CsvWriter:
    """Writes rows as they come (a run cut short keeps what it did), each with the run's metadata."""

    def __init__(self, path: Path, meta: dict[str, object]) -> None:
        self.path = path
        self.meta = meta
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._file.flush()

    def write(self, result: Result) -> None:
        row = {**self.meta, **asdict(result)}
        self._writer.writerow({k: _cell(row[k]) for k in COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_csv(path: Path | str) -> list[dict[str, str]]:
    """The rows of a results CSV, as strings."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: object) -> float | None:
    if value in (None, ""):
        return None
    return float(value)


def _fmt(value: object, spec: str, empty: str = "") -> str:
    number = _num(value)
    return empty if number is None else format(number, spec)


def _ratio(value: object) -> str:
    return _fmt(value, ".2f") + ("x" if _num(value) is not None else "")


def _groups(rows: Iterable[dict]) -> dict[tuple[str, str, str], list[dict]]:
    out: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        out.setdefault((row["workload"], row["dtype"], row["op"]), []).append(row)
    return out


def _rows(results: Iterable[Result | dict]) -> list[dict]:
    return [r if isinstance(r, dict) else asdict(r) for r in results]


def _size(row: dict) -> str:
    elements = int(row["elements"])
    return f"{row['tensors']} tensors, {elements / 1e6:.1f}M elements, {int(row['bytes_moved']) / 2**20:.0f} MiB moved"


def table(results: Iterable[Result | dict]) -> str:
    """The terminal table: one block per (workload, dtype, op); every row beside the naive baseline."""
    header = (f"{'provider':<34} {'median ms':>10} {'p20-p80 ms':>17} {'host ms':>8} {'peak MiB':>9} "
              f"{'GB/s':>8} {'% copy':>7} {'naive ms':>9} {'speed-up':>9}  status")
    lines = []
    skipped: dict[str, set[str]] = {}
    for (workload, dtype, op), rows in _groups(_rows(results)).items():
        shown = [r for r in rows if r["status"] != "skipped"]
        for r in rows:
            if r["status"] == "skipped":
                skipped.setdefault(r["note"], set()).add(r["provider"])
        if not shown:
            continue
        lines += ["", f"{workload} · {dtype} · {op} · {_size(rows[0])}", header, "-" * len(header)]
        for r in shown:
            spread = (f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}" if r["p20_ms"] not in (None, "")
                      else "")
            status = r["status"] if r["status"] != "ok" else ""
            if r["status"] == "error":
                status += f": {r['note']}"
            lines.append(f"{r['provider'][:34]:<34} {_fmt(r['median_ms'], '.3f'):>10} {spread:>17} "
                         f"{_fmt(r['host_ms'], '.3f', 'n/a'):>8} {_fmt(r['peak_extra_mb'], '.1f', 'n/a'):>9} "
                         f"{_fmt(r['gbps'], '.1f'):>8} {_fmt(r['pct_copy_bw'], '.1f'):>7} "
                         f"{_fmt(r['baseline_ms'], '.3f'):>9} {_ratio(r['speedup']):>9}  {status}")
    if skipped:
        lines += ["", "Not run:"]
        for reason, names in skipped.items():
            lines.append(f"  {', '.join(sorted(names))}: {reason}")
    return "\n".join(lines).lstrip("\n")


def markdown(rows: list[dict[str, str]]) -> str:
    """A results CSV (as :func:`read_csv` gives it) as markdown: a line on the run, one table per op."""
    if not rows:
        return "(no results)\n"
    first = rows[0]
    out = [f"Device: {first['device_name']} ({first['device']}), copy bandwidth "
           f"{_fmt(first['copy_gbps'], '.1f', 'n/a')} GB/s; torch {first['torch']}, triton {first['triton'] or 'n/a'}, "
           f"regfast {first['regfast']}; commit `{first['commit'] or 'n/a'}`; {first['timestamp']}; "
           f"{first['mode']} run. Times are medians (p20-p80); speed-up is over the first (naive) row of each "
           f"block; bandwidth counts the bytes that must move.", ""]
    by_op: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_op.setdefault(row["op"], []).append(row)
    for op, op_rows in by_op.items():
        shown = [r for r in op_rows if r["status"] != "skipped"]
        out += [f"### {op}", "", "| workload | dtype | provider | median ms (p20-p80) | GB/s | % copy | speed-up |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in shown:
            time_cell = (f"{_fmt(r['median_ms'], '.3f')} ({_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')})"
                         if r["median_ms"] else r["status"])
            if r["status"] not in ("ok",) and r["median_ms"]:
                time_cell += f" {r['status']}"
            out.append(f"| {r['workload']} | {r['dtype']} | {r['provider'].replace('|', '/')} | {time_cell} | "
                       f"{_fmt(r['gbps'], '.1f')} | {_fmt(r['pct_copy_bw'], '.1f')} | "
                       f"{_ratio(r['speedup'])} |")
        reasons: dict[str, set[str]] = {}
        for r in op_rows:
            if r["status"] == "skipped":
                reasons.setdefault(r["note"], set()).add(r["provider"])
        if reasons:
            out.append("")
            out += [f"- not run: {', '.join(sorted(names))}: {reason}" for reason, names in reasons.items()]
        out.append("")
    return "\n".join(out)


def _headline_rows(rows: list[dict[str, str]]) -> list[tuple[str, str, str, dict[str, str]]]:
    """(workload, dtype, op, fastest regfast row) for each block that has a timed regfast row."""
    out = []
    for (workload, dtype, op), group in _groups(rows).items():
        timed = [r for r in group if r["family"] == "regfast" and r["status"] in ("ok", "mismatch") and r["median_ms"]]
        if timed:
            out.append((workload, dtype, op, min(timed, key=lambda r: float(r["median_ms"]))))
    return out


def headline(rows: list[dict[str, str]], markdown: bool = False) -> str:
    """One line per (workload, dtype, op): the naive loop, the fastest regfast row, its speed-up and % of copy.

    ``markdown``: a markdown table under a line naming the run (the README's table).
    """
    if markdown:
        if not rows:
            return "(no results)"
        first = rows[0]
        lines = [f"{first['device_name']} ({first['device']}, copy {_fmt(first['copy_gbps'], '.1f', 'n/a')} GB/s), "
                 f"torch {first['torch']}, {first['mode']} run, {first['timestamp']}:", "",
                 "| workload | dtype | op | naive loop ms | fastest regfast | ms | speed-up | % copy |",
                 "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for workload, dtype, op, best in _headline_rows(rows):
            lines.append(f"| {workload} | {dtype} | {op} | {_fmt(best['baseline_ms'], '.3f')} | "
                         f"`{best['provider']}` | {_fmt(best['median_ms'], '.3f')} | {_ratio(best['speedup'])} | "
                         f"{_fmt(best['pct_copy_bw'], '.0f')} |")
        return "\n".join(lines)
    head = (f"{'workload':<11} {'dtype':<9} {'op':<18} {'naive ms':>9} {'fastest regfast':<32} {'ms':>9} "
            f"{'speed-up':>9} {'% copy':>7}")
    lines = [head, "-" * len(head)]
    for workload, dtype, op, best in _headline_rows(rows):
        lines.append(f"{workload:<11} {dtype:<9} {op:<18} {_fmt(best['baseline_ms'], '.3f'):>9} "
                     f"{best['provider'][:32]:<32} {_fmt(best['median_ms'], '.3f'):>9} {_ratio(best['speedup']):>9} "
                     f"{_fmt(best['pct_copy_bw'], '.1f'):>7}")
    return "\n".join(lines)


def chart(results: Iterable[Result | dict], path: Path) -> str | None:
    """A PNG of each provider's speed-up over the naive loop, one panel per op; returns why not, if not drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # matplotlib is optional; the CSV holds the same numbers
        return f"matplotlib is not importable ({type(exc).__name__}); no chart"
    rows = [r for r in _rows(results) if r["status"] in ("ok", "mismatch") and _num(r["speedup"])]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    if not ops:
        return "no timed rows; no chart"
    cols = min(3, len(ops))
    nrows = -(-len(ops) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 6.0 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        op_rows = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys(f"{r['workload']}\n{r['dtype']}" for r in op_rows))
        names = list(dict.fromkeys(r["provider"] for r in op_rows))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            xs, ys = [], []
            for r in op_rows:
                if r["provider"] == name:
                    xs.append(groups.index(f"{r['workload']}\n{r['dtype']}") + (k - (len(names) - 1) / 2) * width)
                    ys.append(_num(r["speedup"]))
            ax.bar(xs, ys, width=width, label=name)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(op)
        ax.set_ylabel("speed-up over the naive loop (log)")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
