"""An evaluation's files: `metrics.json` (everything) and `metrics.md` (the headline numbers as one table, the
warnings first, then the diagnostics)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ldm.evaluation.diagnostics import diagnostics_rows

REPORT_ROWS = ("fid", "kid", "kid_std", "clip_score", "precision", "recall", "density", "coverage", "is_mean", "is_std",
               "prompt_fidelity_color", "prompt_fidelity_shape", "prompt_fidelity_position", "prompt_fidelity_all",
               "prompt_fidelity_reconstruction_color", "prompt_fidelity_reconstruction_shape",
               "prompt_fidelity_reconstruction_position", "prompt_fidelity_reconstruction_all", "num_samples", "num_real", "k")


def write_report(metrics: Mapping[str, Any], out: str) -> None:
    """`out/metrics.json` (everything) and `out/metrics.md` (one table of the headline numbers)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=1, default=str)
    with open(os.path.join(out, "metrics.md"), "w") as handle:
        for warning in metrics.get("warnings") or ():
            handle.write(f"> **WARNING**: {warning}\n\n")
        if "fid" in metrics:
            handle.write(markdown_table(metrics))
        if metrics.get("diagnostics"):
            rows = diagnostics_rows(metrics["diagnostics"])
            handle.write("\n".join(["", "| diagnostic | value |", "|---|---|", *(f"| {n} | {v} |" for n, v in rows)]))
            handle.write("\n")


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """One `| metric | value |` table; FID and IS rows carry their feature-specific names."""
    names = {"fid": metrics.get("fid_name") or "fid", "is_mean": f"{metrics.get('is_name') or 'IS'} mean",
             "is_std": f"{metrics.get('is_name') or 'IS'} std", "kid": metrics.get("kid_name") or "kid",
             "kid_std": f"{metrics.get('kid_name') or 'kid'} std"}
    features = metrics.get("features", {})
    rows = [(names.get(key, key), _format(metrics.get(key))) for key in REPORT_ROWS]
    rows.append(("features", f"{features.get('network')} / {features.get('layer')} ({features.get('dim')}-d)"))
    if "checkpoint" in metrics:
        rows.append(("checkpoint step", _format(metrics["checkpoint"].get("global_step"))))
    lines = ["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines) + "\n"


def _format(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
