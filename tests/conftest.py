"""Shared fixtures of the crypto-core tests.

Nothing here skips when openfhe is missing (no importorskip): CI has the wheel, so every test
that needs keys ERRORS through the `shared_keys` fixture (fs.UnsupportedPlatform), and
tests/test_aggregate.py::test_openfhe_wheel_imports FAILS with the import error. openfhe is
not imported at conftest level so that the tests of the other modules still run and report.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield.he import context as he_context

# Default-parameter constants the tests reason with (see csrc/wire.hpp). The default profile
# is seeded: a client update carries c0 only (ELEMENTS = 1) and one 32-byte seed.
RING_DIM = fs.CKKSParams().ring_dim
BITS = fs.CKKSParams().first_mod_bits     # bit_length of the default modulus
ELEMENTS = 1 if fs.CKKSParams().seeded else 2
SEED = 32
WIRE_OVERHEAD = 168 + 8  # header + checksum


def make_state(seed: int, shapes: dict[str, tuple[int, ...]] | None = None, *,
               low: float = -1.0, high: float = 1.0) -> dict[str, torch.Tensor]:
    """A LoRA-like state (name -> float32 tensor) with values uniform in [low, high)."""
    if shapes is None:
        shapes = {
            "layers.0.q_proj.lora_A.weight": (4, 32),
            "layers.0.q_proj.lora_B.weight": (32, 4),
            "layers.1.v_proj.lora_A.weight": (4, 32),
            "layers.1.v_proj.lora_B.weight": (24, 4),
            "odd": (3, 5),
        }
    rng = np.random.default_rng(seed)
    return {name: torch.from_numpy(rng.uniform(low, high, size=shape).astype(np.float32))
            for name, shape in shapes.items()}


def make_mask(seed: int, state: dict[str, torch.Tensor], keep: float = 0.5
              ) -> dict[str, torch.Tensor]:
    """A random keep-mask (name -> bool tensor) shaped like ``state``."""
    rng = np.random.default_rng(seed)
    return {name: torch.from_numpy(rng.random(tuple(t.shape)) < keep) for name, t in state.items()}


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float],
                     mask: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Plaintext reference sum(w*x)/sum(w) in float64 (zeros where the mask is False)."""
    total = float(sum(weights))
    out = {}
    for name in states[0]:
        acc = sum(float(w) * st[name].double().numpy() for st, w in zip(states, weights))
        ref = acc / total
        if mask is not None:
            ref = np.where(mask[name].numpy(), ref, 0.0)
        out[name] = ref
    return out


@pytest.fixture(scope="session")
def shared_keys() -> fs.SharedKeys:
    return fs.keygen_shared()


@pytest.fixture(scope="session")
def client_ctx(shared_keys) -> fs.Context:
    return shared_keys.client_context()


@pytest.fixture(scope="session")
def server_ctx(shared_keys) -> fs.Context:
    return shared_keys.server_context()


@pytest.fixture(scope="session")
def unseeded_keys() -> fs.SharedKeys:
    """A shared key without seeding: public-key updates with both polynomials on the wire
    (what threshold parties send), at the one-tower profile public-key noise needs for 1e-6
    with the round's weight bound (max_weight=0)."""
    return fs.keygen_shared(fs.CKKSParams.for_precision(keys="threshold", n_parties=0,
                                                        max_weight=0))


@pytest.fixture(scope="session")
def foreign_keys() -> fs.SharedKeys:
    """A second, independent federation with the same parameters."""
    return fs.keygen_shared()


@pytest.fixture(scope="session")
def small_state() -> dict[str, torch.Tensor]:
    return make_state(0)


@pytest.fixture(scope="session")
def small_layout(small_state) -> fs.Layout:
    return fs.Layout.from_state_dict(small_state)


@pytest.fixture(scope="session")
def small_update(client_ctx, small_state, small_layout) -> fs.EncryptedUpdate:
    """One valid client update of the small state (weight 3 of at most 4, round 7)."""
    return fs.encrypt_update(client_ctx, small_state, small_layout, weight=3.0, round=7,
                             weight_bound=4.0)


class Wipes:
    """Every buffer Context.close() handed to wipe(), with what it held before."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, bytes]] = []

    def zeroed(self, content: bytes) -> bool:
        """Whether a buffer that held ``content`` was wiped and now reads all zeros."""
        return any(before == content and not any(_contents(buffer))
                   for buffer, before in self.calls)


def _contents(buffer) -> bytes:
    return buffer.tobytes() if isinstance(buffer, np.ndarray) else bytes(buffer)


@pytest.fixture
def wipes(monkeypatch) -> Wipes:
    """Records the buffers fedshield.he.context wipes (then wipes them, as it would)."""
    seen, real = Wipes(), he_context.wipe

    def recording(buffer) -> None:
        seen.calls.append((buffer, _contents(buffer)))
        real(buffer)

    monkeypatch.setattr(he_context, "wipe", recording)
    return seen
