"""Plot time vs K for every scoring provider from a results JSON of ``deltakern bench``.

    python bench/plot_results.py out/bench/results.json --out bench/cpu_time_vs_k.png

One line per provider (log-log axes), one panel per (device, dtype, N, D); only rows with
status "ok" are drawn. The PNG is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files written by `deltakern bench` or bench/*.py")
    p.add_argument("--out", default="bench/cpu_time_vs_k.png", help="PNG path")
    p.add_argument("--title", default=None, help="figure title (default: the device names)")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    devices, commits = set(), set()
    for path in args.results:
        doc = json.loads(Path(path).read_text())
        for r in doc["rows"]:
            if r["suite"] != "score" or r["status"] != "ok":
                continue
            panels[(r["device"], r["dtype"], r["n"], r["d"])][r["provider"]].append((r["k"], r["median_ms"]))
            devices.add(r["device_name"])
            commits.add(r["git_commit"] or "?")
    if not panels:
        print("no scoring rows with status ok in the given files", file=sys.stderr)
        return 1
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, ((device, dtype, n, d), providers) in zip(axes[0], sorted(panels.items())):
        for name, points in sorted(providers.items()):
            points.sort()
            style = "--" if name == "torch.mm" else "-"
            ax.plot([k for k, _ in points], [ms for _, ms in points], style, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes K")
        ax.set_ylabel("median time per call (ms)")
        ax.set_title(f"{device} {dtype}, N={n:,}, D={d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(args.title or f"{'; '.join(sorted(devices))} (commit {', '.join(sorted(commits))})", fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
