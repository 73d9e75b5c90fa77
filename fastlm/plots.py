"""Loss curves: a PNG for people and an ASCII chart for the terminal."""
import math


def ascii_curve(points, width=64, height=12, label="loss"):
    """A text chart of (step, value) points: one column per step bucket, '*' at the value."""
    points = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    if not points:
        return f"(no {label} values to plot)"
    steps = [s for s, _ in points]
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi - lo < 1e-12:
        hi = lo + 1e-12
    s0, s1 = min(steps), max(steps)
    columns = {}
    for step, value in points:
        col = 0 if s1 == s0 else round((step - s0) / (s1 - s0) * (width - 1))
        columns.setdefault(col, []).append(value)
    grid = [[" "] * width for _ in range(height)]
    for col, values in columns.items():
        value = sum(values) / len(values)
        row = round((hi - value) / (hi - lo) * (height - 1))
        grid[row][col] = "*"
    lines = [f"{label} vs step"]
    for r, row in enumerate(grid):
        axis = hi - (hi - lo) * r / (height - 1)
        lines.append(f"{axis:8.3f} |{''.join(row)}")
    lines.append(" " * 9 + "+" + "-" * width)
    lines.append(" " * 10 + f"{s0:<{width // 2}d}{s1:>{width - width // 2}d}")
    return "\n".join(lines)


def loss_curves(records, train_measured=False):
    """[(label, [(step, loss), ...], style)] of metrics.jsonl records, as save_loss_plot draws them.

    train_measured: the eval records' train loss was measured in eval mode (--eval_train_split),
    not the mean of the training batches since the previous eval."""
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    train_eval = [(r["step"], r["train_loss"]) for r in records
                  if r.get("type") == "eval" and r.get("train_loss") is not None]
    label = "train (eval mode)" if train_measured else "train (mean since the last eval)"
    curves = [("train (batch)", train, "-"), (label, train_eval, "o-"), ("val", val, "o-")]
    return [curve for curve in curves if curve[1]]


def save_loss_plot(records, path, title="fastlm training", train_measured=False):
    """Write train/val loss curves from metrics.jsonl records to a PNG at `path` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.files import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points, style in loss_curves(records, train_measured):
        if style == "-":
            ax.plot(*zip(*points), label=label, alpha=0.5, linewidth=1)
        else:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
