"""The latency table printed at the end of ``diffserve profile`` (and after ``import-csv``)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from diffserve.schemas import ProfileFile


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:,.1f}")


_KINDS = {"time limit": "time limit", "out of memory": "OOM", "memory limit": "mem limit", "failed": "error"}


def _short(reason: str | None) -> str:
    """The kind of failure only, to keep the table narrow (the file keeps the whole reason)."""
    if not reason:
        return "yes"
    if reason.startswith("larger than infeasible batch "):
        return "after b" + reason.removeprefix("larger than infeasible batch ").split(" ", 1)[0]
    head = reason.split(":", 1)[0]
    return _KINDS.get(head, "published" if "published" in reason or "artifact" in reason else head[:12])


def gpu_options_text(options: dict) -> str:
    """One short line of the GPU-path options that were on, e.g. ``float16 sdpa channels-last compile``."""
    on = [str(options.get("dtype", ""))]
    on += [name.replace("_", "-") for name in ("sdpa", "channels_last", "cuda_graphs", "same_stream_decode", "step_sync", "pinned_outputs") if options.get(name)]
    if options.get("compile") not in (None, "off"):
        on.append(f"compile={options['compile']}")
    return " ".join(x for x in on if x)


def profile_table(profile: ProfileFile) -> Table:
    weights = " [bold yellow](RANDOM WEIGHTS)[/]" if profile.random_weights else ""
    table = Table(title=f"Latency per batch on {profile.device}{weights}", title_justify="left")
    table.add_column("model", no_wrap=True)
    edits = any(b.edit_median_ms is not None for m in profile.models.values() for b in m.batches)
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "peak MB", *(["edit p50 ms"] if edits else [])):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("infeasible")
    for model in profile.models.values():
        labels = [model.name + (" *" if model.random_weights else "")]
        if model.label:
            labels.append(f"[dim]{escape(model.label)}[/]")
        if model.load_time_s is not None:
            labels.append(f"[dim]load {model.load_time_s:.2f} s[/]")
        if model.gpu_options:
            labels.append(f"[dim]{escape(gpu_options_text(model.gpu_options))}[/]")
        for i, b in enumerate(model.batches):
            label = labels[i] if i < len(labels) else ""
            if b.feasible:
                row = [_ms(b.median_ms), _ms(b.p90_ms), _ms(b.p99_ms), f"{b.throughput_ips or 0:.2f}",
                       "-" if b.peak_memory_mb is None else f"{b.peak_memory_mb:,.0f}"]
                row += [_ms(b.edit_median_ms) if b.edit_median_ms else "-"] if edits else []
                row.append("")
            else:
                row = ["-", "-", "-", "-", "-", *(["-"] if edits else []), f"[red]{escape(_short(b.reason))}[/]"]
            table.add_row(label, str(b.batch_size), *row, end_section=i == len(model.batches) - 1)
    if profile.random_weights:
        table.caption = "* random weights: latencies and memory are real, image quality is not"
    if edits:
        strengths = sorted({m.edit_strength for m in profile.models.values() if m.edit_strength})
        note = f"edit: img2img at strength {', '.join(f'{s:g}' for s in strengths)}; planning prices a batch at the dearer of the two"
        table.caption = f"{table.caption}\n{note}" if table.caption else note
    return table
