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
