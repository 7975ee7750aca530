"""How many updates a round needs: the one rule the Server enforces and every key holder's
guard checks again on its own (it does not take the server's word for it)."""

from __future__ import annotations

from ..config import RunConfig


def min_updates_for(cfg: RunConfig) -> int:
    """Fewest accepted updates a round needs: engine.min_clients, else a majority of the sites;
    threshold keys need at least t (and 2: one update alone is never decrypted)."""
    sites = cfg.n_sites
    need = cfg.engine.min_clients or sites // 2 + 1
    if cfg.keys.mode == "threshold":
        need = max(need, cfg.keys.threshold or sites, 2)
    return min(need, sites)
