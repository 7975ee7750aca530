"""What a site checks before it enrols, and what `fedshield site check` reports.

Each problem names a site setting and one check from a fixed list (:data:`CHECKS`), plus the
detail (a path, a column, a mode) for the site's own eyes. A worker that fails a check still
answers its SuperNode, but refuses to join with :class:`SiteCheckFailed`, whose text is only
the party, its name, the setting and the check: the server learns within seconds which site
cannot take part and why, and nothing of the site's files or data.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import DataError, FedShieldError
from ..data.files import MissingColumns, load_instruction_data
from ..trust.federation import load_pinned
from ..trust.identity import Identity
from .site_config import SiteConfig

# check -> the fixed words that may leave the site
CHECKS = {
    "missing": "the file does not exist",
    "unreadable": "the file cannot be read by the site's account",
    "columns": "a configured column is missing",
    "content": "the file's records cannot be used",
    "model": "not 'tiny' and not a model directory with a config.json",
    "mode": "the file is open to other accounts (wider than 0600)",
    "key": "the key file does not load",
    "not-pinned": "the identity is not this party's in the federation file",
    "federation": "the federation file does not load or is not signed by every member",
    "directory": "the directory cannot be made or written",
    "unreachable": "the SuperLink does not answer",
}
PRIVATE_FILES = ("key_file", "identity_file", "token_file")


@dataclass(frozen=True)
class Problem:
    """One failed check: the setting, the check (a key of :data:`CHECKS`) and its detail."""

    setting: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.setting}: {CHECKS[self.check]} ({self.detail})"


class SiteCheckFailed(FedShieldError):
    """The site failed a start-up check. Its text holds no path, value or datum of the site:
    only its party id and name (which it sends at enrolment anyway), the setting and the
    fixed words of the check."""

    def __init__(self, site: SiteConfig, problem: Problem) -> None:
        super().__init__(f"party {site.party_id} ({site.site_name}): site setting "
                         f"{problem.setting!r}: {CHECKS[problem.check]}")
        self.problem = problem


def check_data_file(path: str | Path, columns: str = "", setting: str = "data") -> Problem | None:
    """Whether ``path`` exists, can be read and has the configured columns and usable
    records."""
    path = Path(path)
    if not path.is_file():
        return Problem(setting, "missing", str(path))
    if not os.access(path, os.R_OK):
        return Problem(setting, "unreadable", str(path))
    try:
        load_instruction_data(path, columns)
    except MissingColumns as exc:
        return Problem(setting, "columns", str(exc))
    except DataError as exc:
        return Problem(setting, "content", str(exc))
    return None


def check_model(name: str, setting: str = "model") -> Problem | None:
    """'tiny', or a directory that holds a Hugging Face model's config.json."""
    if name == "tiny" or (Path(name) / "config.json").is_file():
        return None
    return Problem(setting, "model", name)


def _private_file(path: Path, setting: str) -> Problem | None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Problem(setting, "unreadable", f"{path}: {exc.strerror or exc}")
    if mode & 0o077:
        return Problem(setting, "mode", f"{path} has mode {mode:04o}: chmod 600 {path}")
    if not os.access(path, os.R_OK):
        return Problem(setting, "unreadable", str(path))
    return None


def check_site(site: SiteConfig) -> list[Problem]:
    """Every check a site passes before it enrols: its node directory, data and held-out
    files, model, the modes of its key, identity and token files, its identity key and its
    pinned federation (and that the federation pins this identity as this party's)."""
    problems: list[Problem] = []
    node_dir = site.path("node_dir")
    try:
        node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(node_dir, os.W_OK | os.X_OK):
            problems.append(Problem("node_dir", "directory", str(node_dir)))
    except OSError as exc:
        problems.append(Problem("node_dir", "directory", f"{node_dir}: {exc.strerror or exc}"))
    if problems:   # every other file of the site is under it
        return problems
    for setting in ("data", "eval_data"):
        if setting == "data" or site.eval_data:
            problem = check_data_file(site.path(setting), site.columns, setting)
            problems += [problem] if problem else []
    problem = check_model(site.model)
    problems += [problem] if problem else []
    for setting in PRIVATE_FILES:
        problem = _private_file(site.path(setting), setting)
        problems += [problem] if problem else []
    problems += _trust(site, {p.setting for p in problems})
    return problems


def _trust(site: SiteConfig, failed: set[str]) -> list[Problem]:
    """The identity key loads and, with a pinned federation, is this party's member."""
    identity_path = site.path("identity_file")
    identity = None
    if "identity_file" not in failed and identity_path.exists():
        try:
            identity = Identity.load(identity_path)
        except FedShieldError as exc:
            return [Problem("identity_file", "key", str(exc))]
    if not site.federation:
        return []
    if identity is None and "identity_file" not in failed:
        return [Problem("identity_file", "missing", f"{identity_path}: the federation file "
                        "pins the identity this site made for it")]
    fed_path = site.path("federation")
    if not fed_path.is_file():
        return [Problem("federation", "missing", str(fed_path))]
    try:
        fed = load_pinned(fed_path)
    except (FedShieldError, OSError) as exc:
        return [Problem("federation", "federation", str(exc))]
    if identity is not None and fed.roster.get(site.party_id) != identity.public:
        return [Problem("identity_file", "not-pinned",
                        f"{identity_path} (fingerprint {identity.public.fingerprint()}) is not "
                        f"party {site.party_id}'s in {fed_path}")]
    return []


def check_superlink(address: str, timeout: float = 5.0) -> Problem | None:
    """Whether HOST:PORT (the SuperLink's Fleet API) accepts a connection within
    ``timeout`` seconds."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return Problem("superlink", "unreachable", f"{address!r} is not HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return Problem("superlink", "unreachable", f"{address}: {exc.strerror or exc} "
                       f"(within {timeout:g} s)")


__all__ = ["CHECKS", "Problem", "SiteCheckFailed", "check_data_file", "check_model",
           "check_site", "check_superlink"]
