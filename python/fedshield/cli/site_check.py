"""`fedshield site check --config SITE.toml`: what a site's worker checks before it enrols,
run by the site's administrator on the site's own machine before the run (and after any
change): the data and held-out files, the model, the modes of the key, identity and token
files, the identity against the pinned federation file, and, given ``--superlink``, that the
SuperLink answers. One line per problem; exit status 3 (a site failure) on any."""

from __future__ import annotations

import argparse
import sys

from ..fl.site_check import check_site, check_superlink
from ..fl.site_config import SiteConfig
from ..run.outcome import EXIT_OK, EXIT_SITE


def add_parser(commands, formatter) -> None:
    p = commands.add_parser("check", formatter_class=formatter,
                            help="check this site's config, files and SuperLink before a run",
                            description=__doc__)
    p.add_argument("--config", required=True, help="the site config (TOML)")
    p.add_argument("--superlink", metavar="HOST:PORT",
                   help="also check that the SuperLink's Fleet API answers there")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for the SuperLink")


def run(args: argparse.Namespace) -> int:
    site = SiteConfig.from_file(args.config)
    problems = check_site(site)
    if args.superlink:
        problem = check_superlink(args.superlink, args.timeout)
        problems += [problem] if problem else []
    who = f"{args.config}: party {site.party_id} ({site.site_name})"
    for problem in problems:
        print(f"{who}: {problem}")
    if problems:
        print(f"fedshield: error: {who}: {len(problems)} problem(s); this site cannot take "
              "part until they are fixed", file=sys.stderr)
        return EXIT_SITE
    reached = f"; the SuperLink at {args.superlink} answers" if args.superlink else ""
    print(f"{who}: data, model, key, identity and federation files pass{reached}")
    return EXIT_OK
