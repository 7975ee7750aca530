"""The decryption budget (fedshield.he.budget): exact persistent counts, the refusal that says
to rotate keys, rotation, corrupt counter files, and processes charging one budget at once."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedshield as fs
from fedshield.he import DecryptionBudget
from fedshield.he import budget as budget_module

KEY_A, KEY_B, KEY_C = (bytes([i]) * 32 for i in (0xA1, 0xB2, 0xC3))
LIMIT = 2**5


@pytest.fixture()
def counter(tmp_path) -> Path:
    return tmp_path / "party0.key.budget.json"


def _on_disk(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_fresh_budget_has_the_whole_limit_and_writes_nothing(counter):
    budget = DecryptionBudget(counter, LIMIT)
    assert (budget.remaining, budget.decrypted, budget.context_fp) == (LIMIT, 0, None)
    assert not counter.exists()


def test_charge_counts_exactly_and_persists_before_returning(counter):
    budget = DecryptionBudget(str(counter), LIMIT)
    assert budget.charge(KEY_A, 3) == LIMIT - 3
    # on disk when charge returns: a crash after this point cannot lose the count
    assert _on_disk(counter) == {"version": 1, "context_fp": KEY_A.hex(), "decrypted": 3,
                                 "limit": LIMIT, "retired": []}
    assert stat.S_IMODE(counter.stat().st_mode) == 0o600
    assert budget.charge(bytearray(KEY_A), 0) == LIMIT - 3
    assert budget.charge(KEY_A, 10) == LIMIT - 13
    assert (budget.decrypted, budget.remaining, budget.context_fp) == (13, LIMIT - 13, KEY_A)
    reopened = DecryptionBudget(counter, LIMIT)
    assert reopened.decrypted == 13
    assert reopened.charge(KEY_A, 1) == LIMIT - 14


def test_the_limit_itself_is_allowed_and_one_more_is_refused_with_a_clear_message(counter):
    budget = DecryptionBudget(counter, LIMIT)
    budget.charge(KEY_A, LIMIT - 2)
    with pytest.raises(fs.DecryptionBudgetExceeded) as err:
        budget.charge(KEY_A, 3)
    message = str(err.value)
    for part in (KEY_A.hex()[:16], f"{LIMIT - 2} ciphertexts decrypted", "3 more asked",
                 f"limit {LIMIT} (2**5", "flood_log_queries", "rotate keys", "new key epoch",
                 str(counter)):
        assert part in message, (part, message)
    assert budget.decrypted == LIMIT - 2            # the refused charge counted nothing
    assert budget.charge(KEY_A, 2) == 0             # exactly the limit
    with pytest.raises(fs.DecryptionBudgetExceeded, match=f"{LIMIT} ciphertexts decrypted, "
                                                          "1 more asked"):
        budget.charge(KEY_A, 1)
    assert budget.charge(KEY_A, 0) == 0
    assert _on_disk(counter)["decrypted"] == LIMIT
    with pytest.raises(fs.DecryptionBudgetExceeded):
        DecryptionBudget(counter, LIMIT).charge(KEY_A, 1)   # still spent after reopening


def test_a_limit_that_is_not_a_power_of_two_is_named_as_is(counter):
    with pytest.raises(fs.DecryptionBudgetExceeded, match=r"limit 10\. Noise flooding"):
        DecryptionBudget(counter, 10).charge(KEY_A, 11)


def test_another_key_is_refused_until_rotation(counter):
    budget = DecryptionBudget(counter, LIMIT)
    budget.charge(KEY_A, 5)
    with pytest.raises(fs.KeyMaterialError, match=f"counts key {KEY_A.hex()[:16]}, not key "
                                                  f"{KEY_B.hex()[:16]}.*reset_for"):
        budget.charge(KEY_B, 1)
    assert _on_disk(counter)["decrypted"] == 5


def test_rotation_starts_a_new_count_and_a_spent_key_stays_spent(counter):
    budget = DecryptionBudget(counter, LIMIT)
    budget.charge(KEY_A, LIMIT)
    with pytest.raises(fs.KeyMaterialError, match="already been counted"):
        budget.reset_for(KEY_A)                      # resetting the current key: refused
    budget.reset_for(KEY_B)
    assert (budget.context_fp, budget.remaining) == (KEY_B, LIMIT)
    assert _on_disk(counter)["retired"] == [KEY_A.hex()]
    assert budget.charge(KEY_B, 7) == LIMIT - 7
    with pytest.raises(fs.KeyMaterialError, match="counts key"):
        budget.charge(KEY_A, 1)                      # the old key decrypts no more
    with pytest.raises(fs.KeyMaterialError, match=f"{KEY_A.hex()[:16]} has already been"):
        budget.reset_for(KEY_A)                      # rotating back to a spent key: refused
    budget.reset_for(KEY_C)
    assert _on_disk(counter)["retired"] == [KEY_A.hex(), KEY_B.hex()]
    assert budget.decrypted == 0


def test_reset_for_on_a_fresh_file_starts_the_first_key(counter):
    budget = DecryptionBudget(counter, LIMIT)
    budget.reset_for(KEY_A)
    assert _on_disk(counter) == {"version": 1, "context_fp": KEY_A.hex(), "decrypted": 0,
                                 "limit": LIMIT, "retired": []}
    with pytest.raises(fs.KeyMaterialError, match="counts key"):
        budget.charge(KEY_B, 1)


def _state(**changes):
    state = {"version": 1, "context_fp": KEY_A.hex(), "decrypted": 4, "limit": LIMIT,
             "retired": []}
    state.update(changes)
    return json.dumps(state).encode()


@pytest.mark.parametrize("content", [
    b"", b"{", b"\xff\xfe", b"[]", b"null", b"12", b"{}",
    _state()[:-5],
    _state(version=2), _state(version=True), _state(version="1"),
    _state(decrypted=-1), _state(decrypted=LIMIT + 1), _state(decrypted=True),
    _state(decrypted=4.0), _state(decrypted="4"),
    _state(limit=LIMIT * 2), _state(limit=float(LIMIT)), _state(limit=True),
    _state(context_fp=KEY_A.hex()[:-1]), _state(context_fp=KEY_A.hex().upper()),
    _state(context_fp=None), _state(retired=[KEY_A.hex()]), _state(retired=["ab"]),
    _state(retired=KEY_B.hex()),
    _state()[:-1] + b', "extra": 1}',
    b"[" * 100_000 + b"]" * 100_000,
    b" " * (2**20 + 1),
])
def test_a_corrupt_counter_file_is_refused_never_reset(counter, content):
    counter.write_bytes(content)
    budget = DecryptionBudget(counter, LIMIT)
    for action in (lambda: budget.charge(KEY_A, 1), lambda: budget.reset_for(KEY_B),
                   lambda: budget.remaining):
        with pytest.raises(fs.KeyMaterialError, match=f"{counter}.*malformed"):
            action()
    assert counter.read_bytes() == content


def test_the_control_state_of_the_corrupt_file_test_loads(counter):
    counter.write_bytes(_state())
    assert DecryptionBudget(counter, LIMIT).charge(KEY_A, 1) == LIMIT - 5


def test_an_unreadable_counter_file_is_a_key_material_error(counter):
    counter.mkdir()
    with pytest.raises(fs.KeyMaterialError, match="cannot read decryption counter"):
        DecryptionBudget(counter, LIMIT).charge(KEY_A, 1)


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "8", None])
def test_the_limit_must_be_a_positive_int(counter, limit):
    with pytest.raises(fs.ParameterError, match="limit"):
        DecryptionBudget(counter, limit)


@pytest.mark.parametrize("fp, n", [
    (KEY_A, -1), (KEY_A, True), (KEY_A, 1.0), (KEY_A[:31], 1), (KEY_A + b"\0", 1),
    (KEY_A.hex(), 1), (None, 1),
])
def test_charge_arguments_are_checked(counter, fp, n):
    with pytest.raises(fs.ParameterError):
        DecryptionBudget(counter, LIMIT).charge(fp, n)
    assert not counter.exists()


def test_a_failed_write_raises_and_counts_nothing(counter, monkeypatch):
    """The decryption must not go ahead when the count could not be stored."""
    budget = DecryptionBudget(counter, LIMIT)
    budget.charge(KEY_A, 2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(budget_module, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        budget.charge(KEY_A, 1)
    monkeypatch.undo()
    assert budget.decrypted == 2


CHILD = """
import os, sys, time
import fedshield as fs
from fedshield.he import DecryptionBudget
path, limit, fp, n, ready, go = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), \\
    int(sys.argv[4]), sys.argv[5], sys.argv[6]
budget = DecryptionBudget(path, limit)
open(ready, "w").close()
while not os.path.exists(go):      # both processes start charging together
    time.sleep(0.001)
granted = 0
for _ in range(n):
    try:
        budget.charge(fp, 1)
        granted += 1
    except fs.DecryptionBudgetExceeded:
        pass
print(granted)
"""


def _charge_in_two_processes(tmp_path, counter, limit: int, each: int) -> list[int]:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(counter), str(limit),
                               KEY_A.hex(), str(each), str(ready[i]), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):   # both imported fedshield: start them together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()
    granted = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        granted.append(int(out))
    return granted


def test_two_processes_charging_at_once_count_exactly(tmp_path, counter):
    granted = _charge_in_two_processes(tmp_path, counter, limit=10_000, each=150)
    assert granted == [150, 150]
    assert _on_disk(counter)["decrypted"] == 300


def test_two_processes_together_never_pass_the_limit(tmp_path, counter):
    granted = _charge_in_two_processes(tmp_path, counter, limit=200, each=150)
    assert sum(granted) == 200 and min(granted) >= 50, granted
    assert _on_disk(counter)["decrypted"] == 200
