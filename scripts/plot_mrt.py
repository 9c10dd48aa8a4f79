"""An MRT run's mean candidate reward and risk per logged step:

python scripts/plot_mrt.py METRICS.jsonl OUT.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(metrics: str, out: str) -> None:
    rows = [json.loads(line) for line in open(metrics)]
    rows = [r for r in rows if r.get("split") == "train" and "mrt_reward" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [100 * r["mrt_reward"] for r in rows])
    ax[0].set(xlabel="MRT step", ylabel="candidates' sentence BLEU (ids)", title="mean reward")
    ax[1].plot(steps, [r["mrt_risk"] for r in rows], label="risk")
    ax[1].plot(steps, [r["nll"] for r in rows], label="token NLL (gold)")
    ax[1].set(xlabel="MRT step", title="risk and token NLL")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
