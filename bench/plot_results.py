"""Chart of bench/results/*.json: throughput per workload and system, and fraction of the FLOP limit.

    python bench/plot_results.py   # writes bench/results/throughput.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SYSTEMS = [("transformers", "transformers (padded x16)"), ("prmserve_no_cache", "prmserve, cache off"),
           ("prmserve", "prmserve")]
WORKLOADS = [("cold", "cold"), ("best_of_n", "best-of-16"), ("beam_search", "beam search replay")]


def main() -> None:
    reports = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 4.8), squeeze=False)
    for ax, report in zip(axes[0], reports):
        width = 0.27
        for i, (key, label) in enumerate(SYSTEMS):
            values = [report["workloads"][w][key]["flop_fraction"] for w, _ in WORKLOADS]
            bars = ax.bar([x + (i - 1) * width for x in range(len(WORKLOADS))], values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(WORKLOADS)), [name for _, name in WORKLOADS])
        ax.set_ylabel("prompt tokens/s as a fraction of the FLOP limit")
        ax.set_title(f"{report['shape']} on {report['device']}\n(limit: 2 x {report['matmul_params'] / 1e9:.2f}B params x "
                     f"tokens at {report['matmul_peak_flops'] / 1e12:.0f} TFLOP/s measured)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=110)


if __name__ == "__main__":
    main()
