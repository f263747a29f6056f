"""``python -m regfast.bench``: regfast against the loops people write, on real models' parameter shapes.

Operations: norms, penalty (in the loss, forward + backward), add_penalty_grad_, prox_, and an
SGD / AdamW step with the proximal step. Providers: the naive loops, torch's foreach and
compiled versions, NVIDIA Apex when importable, and regfast with each backend available here
(forced with REGFAST_BACKEND). Each provider is checked against the naive loop, then timed.

The quick run (default) times float32 on every workload; on the CPU the workloads are shrunk
(dim 0 of each tensor) to about 2M elements, and torch.compile is left out. --full runs float32
and bfloat16 at full size, with torch.compile. Results: a table here, and in --out (default
bench-results/) DEVICE-MODE.csv and DEVICE-MODE.png. The exit status is 1 when a provider
disagreed with the naive loop or failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import regfast
from regfast import _cli

from . import report
from .providers import OPS
from .suite import Case, default_config, dtype_name, run
from .timing import copy_bandwidth
from .workloads import WORKLOADS, numel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class Progress:
    """A one-line progress bar on stderr (a line per case when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, i: int, n: int, case: Case) -> None:
        elapsed = time.perf_counter() - self.started
        left = f", ~{elapsed / i * (n - i):.0f} s left" if i else ""
        filled = 24 * i // n
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] {i + 1}/{n} {elapsed:.0f} s{left}  "
                f"{case.workload} {dtype_name(case.dtype)} {case.op}: {case.provider.name}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:160])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"done in {time.perf_counter() - self.started:.0f} s\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m regfast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="float32 and bfloat16, full-size workloads, torch.compile")
    p.add_argument("--device", type=_cli.device, default=None,
                   help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: float32 (quick), "
                   "float32 bfloat16 (--full)")
    p.add_argument("--workload", nargs="+", choices=list(WORKLOADS), help="default: all")
    p.add_argument("--op", nargs="+", choices=list(OPS), help="default: all")
    p.add_argument("--scale", type=_cli.positive_float, default=None,
                   help="shrink every tensor's dim 0 by this factor (default: 1, or ~2M elements per workload "
                        "in a quick CPU run)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile of the naive loops (default: only with --full)")
    p.add_argument("--min-time", type=_cli.nonnegative_float, default=None,
                   help="seconds of timed calls per case, at least 5 calls (default 0.1 quick, 0.2 --full)")
    p.add_argument("--threads", type=_cli.positive_int, default=None,
                   help="CPU threads for torch (default: torch's own choice); on a busy machine 1 gives steadier times")
    p.add_argument("--budget", type=_cli.positive_float, default=None,
                   help="seconds after which the remaining cases are recorded as skipped (default: none)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder (default bench-results/)")
    p.add_argument("--markdown", type=_cli.existing_file, metavar="CSV",
                   help="print the results CSV as markdown tables (for the README) and exit")
    p.add_argument("--headline", type=_cli.existing_file, metavar="CSV",
                   help="print one line per (workload, dtype, op) of the results CSV: the fastest regfast row "
                        "against the naive loop, and exit")
    p.add_argument("--headline-markdown", type=_cli.existing_file, metavar="CSV",
                   help="the same as a markdown table (the README's, between its headline markers), and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.markdown is not None:
        print(report.markdown(report.read_csv(args.markdown)))
        return 0
    if args.headline is not None:
        print(report.headline(report.read_csv(args.headline)))
        return 0
    if args.headline_markdown is not None:
        print(report.headline(report.read_csv(args.headline_markdown), markdown=True))
        return 0
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mode = "full" if args.full else "quick"
    config = default_config(device, args.full, args.workload, [DTYPES[d] for d in args.dtype or []] or None,
                            args.op, args.scale, args.compile, args.min_time, args.budget)

    print(f"regfast {regfast.__version__} · torch {torch.__version__} · {report.device_name(device)}")
    print("Backends (REGFAST_BACKEND forces one):\n  " + str(regfast.backend(device)).replace("\n", "\n  "))
    copy_gbps = copy_bandwidth(device)
    print(f"Copy bandwidth (bytes read + written): {copy_gbps:.1f} GB/s")
    for name, shapes in config.workloads.items():
        print(f"  {name}: {len(shapes)} tensors, {numel(shapes):,} elements")

    csv_path = args.out / f"{device.type}-{mode}.csv"
    writer = report.CsvWriter(csv_path, report.metadata(device, mode, copy_gbps))
    progress = Progress()
    try:
        results = run(config, on_result=writer.write, on_start=progress, copy_gbps=copy_gbps)
    finally:
        writer.close()
    progress.done()

    print()
    print(report.table(results))
    print(f"\nCSV: {csv_path}")
    png_path = csv_path.with_suffix(".png")
    why_not = report.chart(results, png_path)
    print(f"chart: {why_not}" if why_not else f"chart: {png_path}")
    bad = [r for r in results if r.status in ("mismatch", "error")]
    for r in bad:
        print(f"{r.status}: {r.workload} {r.dtype} {r.op} {r.provider}"
              + (f" (relative difference {r.check_err:.2e})" if r.check_err is not None else f": {r.note}"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
