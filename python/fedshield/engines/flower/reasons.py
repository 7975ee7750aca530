"""The text of a Flower error reply, as fedshield reports it.

Flower 1.30 turns an exception a ClientApp raised into ``"<class 'MODULE.TYPE'>:<'TEXT'>"``;
the ClientApp's TEXT is already the site worker's error type and fixed message (e.g.
``SiteCheckFailed: the site failed its start-up checks (party 2 (c): site setting 'data': a
configured column is missing)``), which is what the server's log and metrics.json name.
"""

from __future__ import annotations

import re

_FLOWER_REASON = re.compile(r"<class '[\w.]+'>:<'(.*)'>", re.DOTALL)


def reason_text(reason: str) -> str:
    """The ClientApp's own text of a Flower error reason (the reason itself if it is not in
    Flower's format)."""
    match = _FLOWER_REASON.fullmatch(str(reason).strip())
    return match.group(1) if match else str(reason)
