"""A site's global adapters on disk (fedshield.fl.adapter_store): what a restarted site worker
goes on from, what it steps back to when the server redoes a round, and what a catch-up
carries."""

from __future__ import annotations

import pytest
import torch

import fedshield as fs
from fedshield.fl.adapter_store import (CURRENT, AdapterStore, adapter_fingerprint,
                                        pack_adapter, unpack_adapter)


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 8, generator=g),
            "a.lora_B.weight": torch.randn(8, 4, generator=g)}


def same(x: dict, y: dict) -> bool:
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_the_last_two_rounds_are_kept(tmp_path):
    store = AdapterStore(tmp_path / "global")
    assert store.latest() is None and store.at(0) is None
    for version in (1, 2, 3):
        store.save(version, state(version))
    version, latest = store.latest()
    assert version == 3 and same(latest, state(3))
    assert same(store.at(2), state(2)) and store.at(1) is None   # two rounds, not more
    store.save(3, state(30))                                      # round 3 again: replaced
    assert same(store.latest()[1], state(30)) and same(store.at(2), state(2))
    assert oct((tmp_path / "global" / CURRENT).stat().st_mode & 0o777) == "0o600"


def test_pack_round_trip_and_fingerprint():
    blob = pack_adapter(7, state(1))
    version, back = unpack_adapter(blob)
    assert version == 7 and same(back, state(1))
    assert adapter_fingerprint(back) == adapter_fingerprint(state(1))
    assert adapter_fingerprint(state(1)) != adapter_fingerprint(state(2))
    renamed = {k.replace("a.", "b."): v for k, v in state(1).items()}
    assert adapter_fingerprint(renamed) != adapter_fingerprint(state(1))


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "no version"])
def test_a_damaged_adapter_is_a_storage_error(tmp_path, damage):
    from safetensors.torch import save

    blob = pack_adapter(2, state(1))
    bad = {"empty": b"", "truncated": blob[:len(blob) // 2], "garbage": b"\xff" * 64,
           "no version": save({k: v.contiguous() for k, v in state(1).items()})}[damage]
    with pytest.raises(fs.StorageError, match="not a saved global adapter"):
        unpack_adapter(bad, "the test's adapter")
    store = AdapterStore(tmp_path)
    (tmp_path / CURRENT).write_bytes(bad)
    with pytest.raises(fs.StorageError, match=CURRENT):
        store.latest()


class _Party:
    """What SiteRounds.step_back uses of a party: its global adapter and round."""

    def __init__(self, version: int, global_state: dict) -> None:
        self.version, self.global_state = version, global_state

    def set_global(self, global_state: dict, version: int) -> None:
        self.version, self.global_state = version, global_state


def test_a_resumed_server_makes_a_site_step_back_to_a_kept_round_only(tmp_path):
    from types import SimpleNamespace

    from fedshield.fl.site_rounds import SiteRounds

    store = AdapterStore(tmp_path)
    for version in (1, 2):
        store.save(version, state(version))
    party = _Party(2, state(2))
    rounds = SiteRounds(SimpleNamespace(party=party, party_id=0), store=store)
    assert rounds.step_back(2, "same round") and party.version == 2
    assert rounds.step_back(1, "the server resumes after round 1")
    assert party.version == 1 and same(party.global_state, state(1))
    assert not rounds.step_back(2, "ahead of the site")      # never forward
    party.set_global(state(2), 2)
    assert not rounds.step_back(0, "not kept") and party.version == 2
    assert not SiteRounds(SimpleNamespace(party=party, party_id=0)).step_back(1, "no store")
