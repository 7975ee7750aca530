"""Where key material ended up: every file under a run's directory is scanned for slices of
each party's key share and of the Shamir shares dealt to it."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import fedshield as fs

WINDOW = slice(64, 128)   # 64 bytes: eight residues, far from any header


def key_windows(key_file: Path) -> list[bytes]:
    """Slices of the key share in ``key_file`` and of every Shamir share dealt to it."""
    ctx = fs.load_context(key_file)
    own = b"".join(r.tobytes() for _, r in ctx.key_residues())
    dealt = [ctx.key_share(sender) for sender in ctx.key_share_senders]
    return [own[WINDOW]] + [d[WINDOW] for d in dealt if d is not None]


def assert_key_material_only_in_own_node(root: Path, key_files: Mapping[int, Path]) -> int:
    """Every slice is found (at least in its own key file) and never outside the directory of
    the key file it belongs to. Returns the number of files scanned."""
    windows = {party: key_windows(path) for party, path in key_files.items()}
    found = {party: [0] * len(w) for party, w in windows.items()}
    scanned = 0
    for path in Path(root).rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        scanned += 1
        data = path.read_bytes()
        for party, slices in windows.items():
            for k, window in enumerate(slices):
                if window in data:
                    found[party][k] += 1
                    assert path.parent == key_files[party].parent, (
                        f"party {party}'s key material (slice {k}) is in {path}")
    for party, counts in found.items():
        assert all(counts), f"party {party}'s key material was not even in its key file: {counts}"
    return scanned
