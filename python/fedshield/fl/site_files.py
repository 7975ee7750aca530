"""Which file each site reads: its own --site-data file as given, or one data set split into
per-site files (OUT/sites/site-I.jsonl) by the same function as `fedshield split`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data.sites import data_set, split_into_sites, write_site_files


@dataclass(frozen=True)
class SiteFile:
    """One site's data file and the column mapping it is read with."""

    path: Path
    columns: str = ""

    @property
    def name(self) -> str:
        return self.path.stem


def split_how(cfg: RunConfig) -> str:
    """The split of one data set: as configured, auto = tasks for synthetic data, iid for a file."""
    if cfg.data.split != "auto":
        return cfg.data.split
    return "tasks" if cfg.data.path == "synthetic" else "iid"


def site_files(cfg: RunConfig, out_dir: str | Path) -> list[SiteFile]:
    """The run's site files; a split writes them under ``out_dir`` (already in fedshield's
    field names, so they are read without a column mapping)."""
    data = cfg.data
    if data.site_data:
        return [SiteFile(Path(p), data.columns) for p in data.site_data]
    examples = data_set(data.path, data.clients, data.examples_per_client, cfg.training.seed,
                        data.columns)
    shards = split_into_sites(examples, data.clients, split_how(cfg), cfg.training.seed,
                              data.dirichlet_alpha, source=data.path)
    return [SiteFile(p) for p in write_site_files(shards, Path(out_dir))]
