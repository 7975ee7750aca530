"""Key epochs: the server's public context, and when the parties' keys need replacing.

The keys of a federation are set up before its first round and again (a rotation) when some
party's key may not decrypt one more round: each key decrypts a bounded number of ciphertexts
(its decryption budget, reported with every evaluate reply). The server holds the public
context of the current epoch only.
"""

from __future__ import annotations

from ..base.errors import FedShieldError
from ..he import Context
from .record import KeyEpoch, RoundRecord

# Shares asked for at most this many times per round (each time without the parties that
# failed, as long as enough remain).
SHARE_ATTEMPTS = 2


class KeyEpochs:
    """The current key epoch (0: keys not set up yet), its public context and the smallest
    decryption budget the parties reported. ``threshold``: shares may be asked for twice a
    round, so a round costs a key twice its aggregate's ciphertexts."""

    def __init__(self, *, he: bool, threshold: bool) -> None:
        self.he = he
        self.threshold = threshold
        self.ctx: Context | None = None
        self.epoch = 0
        self.budget_left: int | None = None        # smallest count the parties reported

    def set_context(self, ctx: Context) -> None:
        """The public context of the federation's keys (after each key epoch's set-up)."""
        if ctx.has_secret_key or ctx.is_party:
            raise FedShieldError("the server must hold a public context only (saved without "
                                 "its secret key)")
        self.ctx = ctx

    def begin(self, epoch: int, ctx: Context, before_round: int, seconds: float,
              checked: int, message_steps: int = 0) -> KeyEpoch:
        """Switches to a new epoch's public context; returns its entry in the run record."""
        self.set_context(ctx)
        self.epoch = epoch
        self.budget_left = None
        return KeyEpoch(epoch=epoch, before_round=before_round, seconds=round(seconds, 3),
                        subsets_checked=checked, context_fp=ctx.fingerprint.hex(),
                        message_steps=message_steps)

    def report_budgets(self, budgets: list[int]) -> None:
        """The budgets the parties reported after a round: the tightest key decides."""
        if budgets:
            self.budget_left = min(budgets)

    def needs_new_keys(self, rounds: list[RoundRecord]) -> bool:
        """Before planning a round: no keys yet, or some party's key may not decrypt one more
        round (its aggregate's ciphertexts, as often as shares may be asked for)."""
        if not self.he:
            return False
        if self.ctx is None:
            return True
        if self.budget_left is None or not rounds:
            return False
        last = next((r for r in reversed(rounds) if r.n_ciphertexts), None)
        return self.short_of(1, last.n_ciphertexts if last else 0)

    def short_of(self, n_rounds: int, n_ciphertexts: int) -> bool:
        """Whether the tightest key might not decrypt ``n_rounds`` more aggregates of
        ``n_ciphertexts`` ciphertexts, each as often as shares may be asked for (no budget
        reported yet: a fresh key's whole budget)."""
        left = (self.budget_left if self.budget_left is not None
                else 2 ** self.ctx.params.flood_log_queries)
        return left < n_rounds * n_ciphertexts * (SHARE_ATTEMPTS if self.threshold else 1)
