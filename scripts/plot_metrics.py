"""Plot a run's metrics.jsonl into <run_dir>/report.png: reward, pass@1 / pass@k, sequence length.

    python scripts/plot_metrics.py RUN_DIR

Called at the end of every train_rl.py run. Warm-start rows (phase "warmstart", which scripts/demo.py
puts in front) come first on the x axis; the RL steps follow from where the warm start ended (a dotted line), so
RL's step-0 eval sits on the warm start's last one.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrl.metrics import read_metrics  # noqa: E402


def _series(rows, event, key, phase, offset=0):
    pts = [(r["step"] + offset, r[key]) for r in rows if r.get("event") == event and r.get("phase", "rl") == phase
           and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _rolling(y, n=10):
    return [sum(y[max(0, i - n + 1): i + 1]) / len(y[max(0, i - n + 1): i + 1]) for i in range(len(y))]


def _pass_panel(ax, rows, phase, offset, top_k, style):
    for k, color in zip(sorted({1, top_k} - {None}), ("tab:green", "tab:red")):
        x, y = _series(rows, "eval", f"pass@{k}", phase, offset)
        if x:
            first = "first sample" if k == 1 else f"first {k} samples"
            ax.plot(x, y, style, color=color, marker="o", ms=4, label=f"{phase} pass@{k} ({first})")
    x, y = _series(rows, "eval", "unbiased_pass@1", phase, offset)
    _, lo = _series(rows, "eval", "unbiased_pass@1_lo", phase, offset)
    _, hi = _series(rows, "eval", "unbiased_pass@1_hi", phase, offset)
    if x and len(lo) == len(x) == len(hi):
        ax.plot(x, y, style, color="gray", lw=1, label=f"{phase} pass@1 unbiased (95% CI)")
        ax.fill_between(x, lo, hi, color="gray", alpha=0.2)


def plot_run(run_dir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no rows to plot")
    ks = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("pass@")})
    top_k = max(ks) if ks else None
    ws = [r["step"] for r in rows if r.get("phase") == "warmstart" and r.get("event") == "eval"]
    offset = max(ws) if ws else 0  # x of RL step 0 = warm-start steps done
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), sharex=True)
    x, y = _series(rows, "step", "reward", "rl", offset)
    if x:
        axes[0].plot(x, y, "-", color="tab:blue", alpha=0.35, lw=1, label="rl reward (train batch)")
        axes[0].plot(x, _rolling(y), "-", color="tab:blue", label="rl reward, mean of last 10 steps")
    x, y = _series(rows, "step", "loss", "warmstart")
    if x:  # the warm start has no reward: show its supervised loss on a second axis
        twin = axes[0].twinx()
        twin.semilogy(x, y, "--", color="tab:gray", label="warmstart loss (nats/token, right axis)")
        twin.legend(fontsize=7, loc="lower left")
    for phase, style in (("warmstart", "--"), ("rl", "-")):
        _pass_panel(axes[1], rows, phase, offset if phase == "rl" else 0, top_k, style)
        x, y = _series(rows, "step", "seq_len", phase, offset if phase == "rl" else 0)
        if x:
            what = "demonstrations" if phase == "warmstart" else "rollouts"
            axes[2].plot(x, y, style, color="tab:purple", label=f"{phase} mean sequence length ({what})")
    titles = ("reward per RL step" + (" (warm start: loss)" if ws else ""), "pass@k on held-out questions",
              "mean sequence length (tokens, incl. prompt)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("warm-start steps, then RL steps (from the dotted line)" if ws else "step")
        ax.grid(alpha=0.3)
        if ws:
            ax.axvline(offset, color="k", ls=":", lw=1)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1)
    fig.suptitle(f"jaxrl run: {run_dir.name}" + _summary(rows))
    fig.tight_layout()
    out = run_dir / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _summary(rows) -> str:
    """' | pass@1 a (after warm start) -> b (after RL)' from the first and last RL evals."""
    evals = [r for r in rows if r.get("event") == "eval" and r.get("phase", "rl") == "rl" and "pass@1" in r]
    if len(evals) < 2:
        return ""
    start = "after warm start" if any(r.get("phase") == "warmstart" for r in rows) else "at RL step 0"
    a, b = evals[0], evals[-1]
    return (f" | pass@1 {a['pass@1']:.3f} ({start}) -> {b['pass@1']:.3f} (after {b['step']} RL steps)"
            + (f"; unbiased {a['unbiased_pass@1']:.3f} -> {b['unbiased_pass@1']:.3f}" if "unbiased_pass@1" in b else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir))


if __name__ == "__main__":
    main()
