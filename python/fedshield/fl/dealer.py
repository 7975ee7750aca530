"""The one-process key dealer of simulations: every party's key material made here.

Shared keys: one key pair, the same client context for every site. Threshold keys: the whole
multiparty key-generation chain (and the Shamir dealing of t-of-n) run in this process, so this
process sees every share; real deployments run the chain across the parties instead.
"""

from __future__ import annotations

from ..config import RunConfig
from ..he import Context, keygen_shared, keygen_threshold


def deal_keys(cfg: RunConfig) -> tuple[list[Context], Context]:
    """(one context per site, the server's public context) for the run's parameters."""
    params = cfg.ckks_params()
    n = cfg.n_sites
    if cfg.keys.mode == "threshold":
        return keygen_threshold(params, n_parties=n, threshold=cfg.keys.threshold or None)
    keys = keygen_shared(params)
    return [keys.client_context()] * n, keys.server_context()
