"""MkDocs hook: the figures of the committed results, for the pages that include their reports.

``results/REPORT.md`` (and ``results/snr/README.md``) are included into the site as they are
committed, with their links relative to ``results/`` (``figures/...``, ``ais/RUN/bdmc.png``).
The pages that include them sit at the top of the site, so every PNG under ``results/`` is
published at its path relative to ``results/``, where those links find it.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "results"


def on_files(files, config):
    for png in sorted(RESULTS.rglob("*.png")):
        files.append(
            File(
                png.relative_to(RESULTS).as_posix(),
                src_dir=str(RESULTS),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
