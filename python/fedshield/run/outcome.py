"""How a run ends: the exit status of `fedshield` (both engines) per kind of failure, and the
step each kind asks of the user.

| status | kind | what happened |
|---|---|---|
| 0 | | the run finished |
| 2 | `error` | a setting, file or command line was refused before or during the run |
| 3 | `site` | a site cannot take part (it failed its start-up checks, or did not enrol) |
| 4 | `keys` | the key set-up failed (a party is named) |
| 5 | `storage` | a file could not be written (full disk, read-only directory) |
| 6 | `run` | the run failed otherwise (too few parties, a Flower process died) |
| 130 | `interrupted` | Ctrl-C or SIGTERM; what was saved is said |

The ServerApp records the kind as ``failure_kind`` beside ``failure`` in metrics.json, which
is how a multi-machine `flwr run` (whose own exit status is 0 whatever the ServerApp did) is
read (docs/RUNS.md, "Exit status").
"""

from __future__ import annotations

from ..base.errors import FedShieldError, KeySetupError, StorageError

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_SITE = 3
EXIT_KEYS = 4
EXIT_STORAGE = 5
EXIT_FAILED = 6
EXIT_INTERRUPTED = 130     # the shell's 128 + SIGINT

EXIT_CODES = {"error": EXIT_ERROR, "site": EXIT_SITE, "keys": EXIT_KEYS,
              "storage": EXIT_STORAGE, "run": EXIT_FAILED, "interrupted": EXIT_INTERRUPTED}
# a few words per kind, for `fedshield --help`
WORDS = {"error": "refused input", "site": "a site cannot take part",
         "keys": "key set-up failed", "storage": "storage", "run": "the run failed",
         "interrupted": "interrupted"}
NEXT_STEP = {
    "site": "run `fedshield site check --config SITE.toml` on that site's machine, fix what it "
            "reports, and start the run again",
    "keys": "the named party's worker log says why; fix it and start the run again",
    "storage": "free space or fix the permissions of the path named, then resume",
    "run": "see the logs named; resume the run if it recorded a round",
}


class RunFailed(FedShieldError):
    """A run that started and failed; ``kind`` is a key of :data:`EXIT_CODES`. Its text ends
    with what to do (``next_step``, by default the kind's)."""

    def __init__(self, message: str, kind: str = "run", next_step: str | None = None) -> None:
        if kind not in EXIT_CODES:
            raise ValueError(f"failure kind {kind!r} is not one of {sorted(EXIT_CODES)}")
        step = next_step if next_step is not None else NEXT_STEP.get(kind, "")
        super().__init__(f"{message}; {step}" if step else message)
        self.kind = kind


def status_help() -> str:
    """The exit statuses in one line (`fedshield --help`)."""
    return ("Exit status: 0 done, " + ", ".join(f"{code} {WORDS[kind]}"
                                                for kind, code in EXIT_CODES.items())
            + " (docs/RUNS.md).")


def failure_kind(exc: BaseException) -> str:
    """The kind of failure an exception reports."""
    if isinstance(exc, RunFailed):
        return exc.kind
    if isinstance(exc, KeySetupError):
        return "keys"
    if isinstance(exc, StorageError):
        return "storage"
    return "error"


def exit_code(exc: BaseException) -> int:
    """`fedshield`'s exit status for a FedShieldError."""
    return EXIT_CODES[failure_kind(exc)]


__all__ = ["EXIT_CODES", "EXIT_ERROR", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_KEYS",
           "EXIT_OK", "EXIT_SITE", "EXIT_STORAGE", "NEXT_STEP", "RunFailed", "WORDS", "exit_code",
           "failure_kind", "status_help"]
