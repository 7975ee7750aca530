"""A site's own configuration: what its worker reads, holds and lets leave the site.

The server's run config (Flower ships it with the app) carries training hyperparameters only.
Everything that decides what code runs on a site, which files it touches, or what leaves it
comes from this file, which the site writes and keeps: its data, model, key and identity
files, its training function, its metrics policy, and the local channel its SuperNode's
ClientApp relays requests over. A run config that names any of these settings is refused
(:func:`site_settings_in`).

A TOML file with one ``[site]`` table; relative paths are relative to ``node_dir``, and
``node_dir`` to the file's directory::

    [site]
    node_dir = "/srv/fedshield/site-a"     # mode 0700, the worker's account alone
    party_id = 0
    data = "train.jsonl"
    metrics = "aggregate"

A new setting is one more field here (a default, help text, and a check in
``__post_init__``); the file format follows. A site joins a run only with its pinned
federation file (``federation``) or, for simulations, the loudly named opt-in
``insecure_trust_server_roster``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping

from ..base.atomic import write_atomic
from ..config import _opt
from ..data.files import parse_columns
from ..base.errors import ParameterError
from ..base.validate import is_int, is_real

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TABLE = "site"
METRICS_POLICIES = ("none", "aggregate", "all")
MAX_SOCKET_PATH = 107    # AF_UNIX sun_path; longer paths are reached through /proc/self/fd


@dataclass(frozen=True)
class SiteConfig:
    """One site of a federation, as its own administrator configures it."""

    node_dir: str = _opt("", "the directory where all of this site's files live (key, "
                         "identity, global adapters, logs, socket, token); made mode 0700")
    party_id: int = _opt(-1, "this site's party id in the federation (0..sites-1)")
    data: str = _opt("", "this site's own instruction-data file (.json, .jsonl, .csv, "
                     ".parquet)")
    eval_data: str = _opt("", "its own held-out file (default: a held-out part of data)")
    name: str = _opt("", "the name it enrols with (default: the data file's stem)")
    columns: str = _opt("", "FIELD=COLUMN pairs naming the data file's columns")
    model: str = _opt("tiny", "'tiny' or this site's own local model directory (the run "
                      "config's model name is not used)")
    key_file: str = _opt("party.key", "where the key set-up writes this site's key or key "
                         "share (mode 0600; it never leaves the site)")
    identity_file: str = _opt("identity.key", "its long-term identity key (made on first "
                              "start, mode 0600)")
    out_dir: str = _opt("out", "where the adapter goes when the server asks this site to "
                        "write it")
    train_fn: str = _opt("", "the site's own training function, 'package.module:function' "
                         "(empty: fedshield's loop); never taken from the run config")
    metrics: str = _opt("aggregate", "which metrics leave the site: none (only what the "
                        "protocol needs: example counts, fingerprints, the decryption "
                        "budget), aggregate (also its held-out losses, the summands of the "
                        "federation's example-weighted eval loss), all (also training losses, "
                        "train-fn metrics, the DP update norm, timings and the data file name)",
                        choices=METRICS_POLICIES)
    socket: str = _opt("worker.sock", "the Unix socket the worker listens on for its "
                       "SuperNode's ClientApp (its directory decides who may connect)")
    token_file: str = _opt("relay.token", "the relay secret (made on first start, mode "
                           "0600); the SuperNode's node config names a copy of it")
    log_file: str = _opt("worker.log", "the worker's log (mode 0600)")
    idle_timeout: float = _opt(0.0, "seconds without a request after which the worker exits "
                               "(0: it serves until stopped)")
    federation: str = _opt("", "the site's pinned, co-signed federation file (`fedshield "
                           "federation`); every key set-up is held to it")
    insecure_trust_server_roster: bool = _opt(False, "SIMULATIONS ONLY: join without a "
                                              "federation file, taking the server's word for "
                                              "who the other parties are")

    def __post_init__(self) -> None:
        if self.metrics not in METRICS_POLICIES:
            raise ParameterError(f"site metrics={self.metrics!r} is not one of "
                                 f"{METRICS_POLICIES}")
        for f in fields(self):
            if f.type == "str" and not isinstance(getattr(self, f.name), str):
                raise ParameterError(f"site {f.name}={getattr(self, f.name)!r} must be a string")
        for name in ("node_dir", "data", "key_file", "identity_file", "out_dir", "socket",
                     "token_file", "log_file"):
            if not getattr(self, name):
                raise ParameterError(f"site {name}={getattr(self, name)!r}: a path is needed")
        if not is_int(self.party_id) \
                or self.party_id < 0:
            raise ParameterError(f"site party_id={self.party_id!r} must be an int >= 0 (this "
                                 "site's party id in the federation)")
        if self.train_fn:
            module, sep, attr = self.train_fn.partition(":")
            if not (sep and module and attr):
                raise ParameterError(f"site train_fn={self.train_fn!r} must be "
                                     "'package.module:function'")
        if (not is_real(self.idle_timeout)
                or not math.isfinite(self.idle_timeout) or self.idle_timeout < 0):
            raise ParameterError(f"site idle_timeout={self.idle_timeout!r} must be a number of "
                                 "seconds >= 0 (0: never)")
        parse_columns(self.columns)
        if not isinstance(self.insecure_trust_server_roster, bool):
            raise ParameterError(f"site insecure_trust_server_roster="
                                 f"{self.insecure_trust_server_roster!r} must be true or false")

    # -- where things are ---------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """The setting ``name`` as a path (relative ones are under node_dir)."""
        value = Path(getattr(self, name))
        return value if name == "node_dir" or value.is_absolute() else Path(self.node_dir) / value

    @property
    def site_name(self) -> str:
        return self.name or Path(self.data).stem

    # -- files --------------------------------------------------------------------------------
    def to_toml(self) -> str:
        def value(v) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            return repr(v) if isinstance(v, (int, float)) else json.dumps(v)
        return f"[{TABLE}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in asdict(self).items())

    def save(self, path: str | Path) -> Path:
        """Writes the config (mode 0600: it names the site's files)."""
        write_atomic(path, self.to_toml().encode(), mode=0o600)
        return Path(path)

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "site config",
                  base: Path | None = None) -> "SiteConfig":
        """From the ``[site]`` table's keys; unknown keys are an error. ``base``: the
        directory a relative ``node_dir`` is relative to."""
        if not isinstance(data, Mapping):
            raise ParameterError(f"{source}: [{TABLE}] must be a table, got "
                                 f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise ParameterError(f"{source}: unknown settings {bad} in [{TABLE}]; known: "
                                 f"{sorted(known)}")
        values = dict(data)
        node_dir = values.get("node_dir")
        if isinstance(node_dir, str) and node_dir and base is not None:
            values["node_dir"] = str((base / node_dir).resolve())
        try:
            return cls(**values)
        except TypeError as exc:
            raise ParameterError(f"{source}: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> "SiteConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ParameterError(f"cannot read site config {path}: {exc.strerror or exc}") from exc
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ParameterError(f"cannot read site config {path}: not valid TOML: {exc}") from exc
        extra = sorted(set(data) - {TABLE})
        if TABLE not in data or extra:
            raise ParameterError(f"site config {path}: expected one [{TABLE}] table, got "
                                 f"{sorted(data)}")
        return cls.from_dict(data[TABLE], source=f"site config {path}",
                             base=path.resolve().parent)


# The settings a run config may not name (in either spelling): what code runs, which files
# are read or written, what leaves the site. (A run config's own out-dir is the ServerApp's.)
SITE_ONLY = ("train_fn", "metrics", "model", "data", "eval_data", "columns", "key_file",
             "identity_file", "node_dir", "party_id", "socket", "token_file", "log_file",
             "federation", "insecure_trust_server_roster")


def site_settings_in(keys: Iterable[str]) -> list[str]:
    """The keys (of a run config) that name a site setting: only the site decides those."""
    site = {s for name in SITE_ONLY for s in (name, name.replace("_", "-"))}
    return sorted(k for k in keys if k in site)
