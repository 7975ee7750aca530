"""A site's own train-fn that fails with its training rows and its paths in the message: what
must never leave the site (tests/test_flower_site.py)."""

MARK = "LEAKED-ROW-TOKENS"


def train(model, plan):
    rows = plan.train["input_ids"][:2].tolist()
    raise RuntimeError(f"{MARK} {rows} from {plan.site_config['node_dir']}/"
                       f"{plan.site_config['data']} key {plan.site_config['key_file']} "
                       f"plan {plan!r}")
