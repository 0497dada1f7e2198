"""Plots `tandem bench coserve --json FILE` results: SLO attainment and fine-tuning throughput
against the request rate, for inference alone, naive time slicing and co-serving.

    python -m venv /tmp/plot && /tmp/plot/bin/pip install matplotlib
    /tmp/plot/bin/python bench/plot_coserve.py bench/results/coserve.json docs/coserve.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    with open(src) as f:
        report = json.load(f)
    rates = [r["rate"] for r in report["rates"]]
    modes = [
        ("inference_alone", "(a) inference alone", "tab:gray"),
        ("time_slicing", "(c) naive time slicing", "tab:orange"),
        ("coserving", "(d) Tandem co-serving", "tab:blue"),
    ]
    fig, (slo, ft) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, color in modes:
        slo.plot(rates, [100 * r[key]["slo"] for r in report["rates"]], "o-", label=label, color=color)
    slo.axhline(99, color="red", linestyle=":", label="99% target")
    slo.set_xlabel("requests / s")
    slo.set_ylabel(f"output tokens within {1000 * report['tpot_target_s']:.0f} ms (%)")
    slo.set_title("SLO attainment")
    slo.legend()
    for key, label, color in modes[1:]:
        ft.plot(rates, [r[key]["finetune_tps"] for r in report["rates"]], "o-", label=label, color=color)
    alone = report["finetune_alone_tps"]
    ft.plot(
        rates,
        [0.8 * alone * r["inference_alone"]["idle"] for r in report["rates"]],
        "--",
        color="tab:green",
        label="target: 80% of the capacity (a) leaves idle",
    )
    ft.axhline(alone, color="tab:gray", linestyle=":", label="(b) fine-tuning alone")
    ft.set_xlabel("requests / s")
    ft.set_ylabel("fine-tuning tokens / s")
    ft.set_title("Fine-tuning throughput")
    ft.legend()
    fig.suptitle(f"tandem bench coserve ({report['preset']} preset, CPU)")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
