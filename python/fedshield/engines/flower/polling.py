"""A Grid whose send_and_receive collects replies promptly.

Flower 1.30's ``send_and_receive`` checks for replies every 3 seconds, which costs up to 3 s per
step of a round (join, train, share, evaluate) however fast the sites answer. This wrapper does
the same through the Grid's own ``push_messages`` / ``pull_messages``, polling from 0.1 s and
backing off to 1 s.
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.common import Message
from flwr.serverapp import Grid

FIRST_POLL, MAX_POLL, BACKOFF = 0.1, 1.0, 1.5


class PromptGrid:
    """Delegates everything to ``grid`` except send_and_receive (see the module docstring)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.send_until(messages, timeout=timeout)

    def send_until(self, messages: Iterable[Message], *, timeout: float | None = None,
                   stop=None) -> list[Message]:
        """send_and_receive that returns early, with the replies so far, once ``stop(reply)``
        holds for one (e.g. a site's refusal to join, which ends the run anyway)."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = FIRST_POLL
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if stop is not None and any(stop(m) for m in got):
                break
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(wait)
            wait = min(wait * BACKOFF, MAX_POLL)
        return replies
