"""What mixing costs: the benchmark's raw shards read as one dataset against the same shards as
a 50/50 mixture of their two halves (``shardkit bench --mix``; also a row of the main run)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .loaders import _time_loader, shardkit_loader, shardkit_mixture

__all__ = ["format_mix_report", "run_mix"]


def run_mix(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
            per_class: int = 200, batch_size: int = 256, workers: int = 2,
            repeats: int = 3) -> dict:
    """The raw shards read as one dataset and as a 50/50 mixture of their two halves,
    alternated ``repeats`` times in one run (the mixture issue's figure; also a row of
    :func:`run`)."""
    import shardkit

    from .synth import make_image_folder

    out.mkdir(parents=True, exist_ok=True)
    images = Path(folder or make_image_folder(out / "images", classes=classes, per_class=per_class))
    files = sorted(p for p in images.rglob("*") if p.is_file())
    m = shardkit.pack_folder(images, out / "raw", mode="raw", resume=True, progress=False,
                             max_samples=max(1, len(files) // 16))
    configs = {"shardkit raw, train": lambda: shardkit_loader(out / "raw", batch_size, workers),
               "shardkit raw, train, 50/50 mixture of its halves":
                   lambda: shardkit_mixture(out / "raw", batch_size, workers)}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, make in configs.items():
            runs[name].append(_time_loader(make, m.num_bytes, m.num_samples))
    rates = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    one, mixed = rates.values()
    return {"samples": m.num_samples, "shards": len(m.shards), "batch_size": batch_size,
            "workers": workers, "repeats": repeats, "samples_per_s": rates,
            "runs": {k: [r["samples_per_s"] for r in v] for k, v in runs.items()},
            "mixture / one dataset": mixed / one}


def format_mix_report(report: dict) -> str:
    lines = [f"{report['samples']} samples in {report['shards']} raw shards, batch "
             f"{report['batch_size']}, {report['workers']} workers, median of "
             f"{report['repeats']} alternated runs"]
    for name, rate in report["samples_per_s"].items():
        runs = ", ".join(f"{r:.0f}" for r in report["runs"][name])
        lines.append(f"  {name:52s} {rate:8.0f} samples/s  ({runs})")
    lines.append(f"mixture / one dataset: {report['mixture / one dataset']:.3f}")
    return "\n".join(lines)
