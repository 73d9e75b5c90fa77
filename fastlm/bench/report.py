"""The one table of benchmark rows (text and markdown), summary.md and the summary plots."""
import json
import os
import sys

COLUMNS = [("name", "name", ""), ("case", "case", ""), ("backend", "backend", ""), ("ref_ms", "ref ms", ".2f"),
           ("fused_ms", "fused ms", ".2f"), ("speedup", "speed-up", ".2f"), ("ref_peak_mb", "ref peak MB", ".1f"),
           ("fused_peak_mb", "fused peak MB", ".1f"), ("max_err", "max err", ".1e")]
HEADERS = [header for _, header, _ in COLUMNS] + ["notes"]
LEFT = {0, 1, 2, len(COLUMNS)}  # text columns; the others are numbers
SCHEMA = 2  # of summary.json; a summary of another schema is neither merged into nor rendered
SUMMARY_PLOTS = ("summary_speedup", "summary_memory", "summary_times")
REFERENCE_NOTE = (
    "Reference = each benchmark's PyTorch baseline (cross_entropy: F.cross_entropy, or lm_head + F.cross_entropy; "
    "adamw: torch.optim.AdamW(fused=True); attention: sdpa; e2e: the best plain-PyTorch step, SDPA, lm_head + "
    "F.cross_entropy and torch's AdamW (fused on CUDA, foreach on CPU) after clip_grad_norm_), and a row with only a "
    "reference time is that baseline itself; fused = the backend named in the row (e2e: every backend auto, as its "
    "notes list). Times are medians after warm-up; peak memory is what one call adds (CPU: RSS high-water mark in a "
    "fresh process; CUDA: max_memory_allocated); max err is against a float64 or reference result (e2e: relative "
    "difference of the first step's loss). Each benchmark's <name>.json says under `about` what its numbers mean.")


def table_rows(benchmarks):
    """Every row of {benchmark: entry}; a benchmark that did not run at all becomes one skipped row."""
    rows = []
    for name, entry in benchmarks.items():
        if "skipped" in entry:
            rows.append({"name": name, "case": "", "backend": "", "skipped": entry["skipped"], "extra": {}})
        rows += entry.get("rows", [])
    return rows


def is_measured(row):
    return not row.get("skipped") and (row.get("ref_ms") is not None or row.get("fused_ms") is not None)


def _number(value):
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _cells(row):
    cells = ["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in COLUMNS]
    if row.get("skipped"):
        return cells + [f"skipped: {row['skipped']}"]
    extra = row.get("extra") or {}
    return cells + [", ".join(f"{key} {_number(value)}" for key, value in extra.items() if value is not None)]


def text_table(rows):
    lines = [HEADERS] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    text = ["  ".join(cell.ljust(w) if i in LEFT else cell.rjust(w) for i, (cell, w) in
                      enumerate(zip(line, widths))).rstrip() for line in lines]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def markdown_table(rows):
    align = "|" + "|".join(":--" if i in LEFT else "--:" for i in range(len(HEADERS))) + "|"
    body = ["| " + " | ".join(cell.replace("|", "/") for cell in _cells(row)) + " |" for row in rows]
    return "\n".join(["| " + " | ".join(HEADERS) + " |", align, *body])


def write_markdown(out_dir):
    """summary.md from summary.json and parity.json, whichever out_dir holds; returns whether it was written.
    Beside a summary.json of an earlier runner (another SCHEMA), summary.md, rendered from that, is kept."""
    docs = {}
    for name in ("summary", "parity"):
        path = os.path.join(out_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                docs[name] = json.load(f)
    summary, parity = docs.get("summary"), docs.get("parity")
    if summary is not None and summary.get("schema") != SCHEMA:  # an earlier runner's, of other fields
        print(f"note: {os.path.join(out_dir, 'summary.json')} is from another runner version (schema "
              f"{summary.get('schema')}): summary.md is left as it is until the benchmarks are rerun", flush=True)
        return False
    env = (summary or parity)["env"]
    lines = ["# fastlm benchmarks", "", f"Measured on **{env['device']}** with torch {env['torch']}, triton "
             f"{env['triton']}, Python {env['python']}, {env['threads']} threads.", ""]
    if summary:
        lines += [f"- {name}: `{e['command']}` ({e['date']}, {e['seconds']:.0f} s" + "".join(
            f", {note}" for note in (e["dtype"], e["quick"] and "quick sizes",
                                     e.get("partial") and f"**partial**: {e['partial']}") if note) + ")"
            for name, e in summary["benchmarks"].items()]
        lines += ["", REFERENCE_NOTE, "", markdown_table(table_rows(summary["benchmarks"])), ""]
        if summary.get("device") == "cuda":
            from fastlm.bench import targets

            lines += ["## Targets", "", targets.markdown(targets.judge(summary), env["device"]), ""]
    if parity:
        from fastlm.bench.parity import describe

        lines += ["## Numerical parity", "", "```", describe(parity), "```", ""]
    plots = [*SUMMARY_PLOTS, *(summary["benchmarks"] if summary else ()), "parity"]
    pngs = [f"{name}.png" for name in plots if os.path.exists(os.path.join(out_dir, f"{name}.png"))]
    if pngs:
        lines += ["## Plots", "", *[f"![{png[:-4]}]({png})\n" for png in pngs]]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    return True


def save_plots(out_dir, draw):
    """Write each figure of draw() -> {name: figure} as out_dir/<name>.png; returns the names
    written. A plot that fails is a warning on stderr: it must never cost the numbers."""
    written = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, fig in draw().items():
            fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(f"{name}.png")
    except Exception as exc:
        print(f"python -m fastlm.bench: warning: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return written


def summary_figures(rows, title):
    """{name: figure}: speed-up and peak-memory ratio of every measured case, time per case per op."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if is_measured(r)]
    label = [f"{r['name']}: {r['case']} [{r['backend']}]" for r in rows]
    figures = {}
    speed = [(lab, r["speedup"]) for lab, r in zip(label, rows) if r.get("speedup")]
    # A ratio over a reference that adds next to nothing (AdamW updates in place) says nothing.
    memory = [(lab, r["fused_peak_mb"] / r["ref_peak_mb"]) for lab, r in zip(label, rows)
              if r.get("fused_peak_mb") is not None and (r.get("ref_peak_mb") or 0) >= 1.0]
    for name, pairs, xlabel, higher_is_better in (
            ("summary_speedup", speed, "speed-up of fused over reference (>1 is faster)", True),
            ("summary_memory", memory, "peak memory, fused / reference (<1 uses less)", False)):
        if pairs:
            figures[name] = _ratio_chart(plt, pairs, xlabel, higher_is_better, title)
    panels = {}
    for row in rows:
        panels.setdefault(row["name"], []).append(row)
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
        for ax, (name, mine) in zip(axes[0], panels.items()):
            _times_panel(ax, name, mine)
        fig.suptitle(f"time per case, fused vs reference, {title}")
        figures["summary_times"] = fig
    return figures


def _ratio_chart(plt, pairs, xlabel, higher_is_better, title):
    values = [value for _, value in pairs]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(pairs) + 1.4))
    ax.barh(range(len(pairs)), values, color=["tab:green" if (v >= 1) == higher_is_better else "tab:red"
                                              for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(pairs)), [lab for lab, _ in pairs], fontsize=7)
    ax.invert_yaxis()
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, title=f"fastlm: fused vs reference, {title}")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def _times_panel(ax, name, rows):
    """Reference and each backend's time on one x position per case, in the benchmark's order."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    reference = {}
    for r in rows:
        if r.get("ref_ms") is not None:
            reference.setdefault(cases.index(r["case"]), r["ref_ms"])
    ax.plot(list(reference), list(reference.values()), "k--", marker="x", label="reference")
    for backend in dict.fromkeys(r["backend"] for r in rows if r.get("fused_ms") is not None):
        mine = [r for r in rows if r["backend"] == backend and r.get("fused_ms") is not None]
        ax.plot([cases.index(r["case"]) for r in mine], [r["fused_ms"] for r in mine], marker="o", label=backend)
    ax.set_xticks(range(len(cases)), cases, rotation=35, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set(ylabel="ms (median)", title=name)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
