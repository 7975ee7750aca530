"""Identities of hand-built federations in the tests: every party's key, its public form for
enrolment, and the signed records a real site would send beside its messages."""

from __future__ import annotations

from fedshield.trust.guard import sign_update
from fedshield.trust.identity import Identity

IDENTITIES = {p: Identity.generate() for p in range(64)}


def identity_hex(party: int) -> str:
    """What party ``party`` enrols with (SiteInfo.identity)."""
    return IDENTITIES[party].public.to_bytes().hex()


def signed(party: int, update: bytes) -> bytes:
    """Party ``party``'s signed record of its update."""
    return sign_update(IDENTITIES[party], party, update)
