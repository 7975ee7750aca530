"""`fedshield federation identity | init | add | sign | show`: making the federation file that
every site pins, out of band (fedshield.trust.federation).

The ceremony: each member and the server make an identity key on their own machine
(``identity``) and hand out its public part (``KEY.pub``); one of them writes the file with the
federation's key mode, sites, parameters and security floor (``init``), adds every member's
public identity in party order (``add``); then the file goes round and every member and the
server sign it (``sign``) after reading it (``show``). The finished file goes into every site's
config and the server's run config.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields, replace
from pathlib import Path

from ..config import RunConfig, options
from ..base.errors import FederationError, KeyMaterialError
from ..trust.federation import SERVER, Federation, Floor, federation_for_run
from ..trust.identity import Identity, PublicIdentity

PUBLIC_SUFFIX = ".pub"
# run settings that decide a federation's keys and parameters (the rest is each run's own)
_RUN_SECTIONS = ("he", "keys")
_RUN_FLAGS = ("clients",)


def add_parser(sub, formatter) -> None:
    p = sub.add_parser("federation", formatter_class=formatter,
                       help="make the co-signed federation file every site pins",
                       description=__doc__)
    cmds = p.add_subparsers(dest="federation_command", required=True)

    q = cmds.add_parser("identity", formatter_class=formatter,
                        help="make (or show) an identity key; writes KEY.pub to hand out")
    q.add_argument("key", help="identity key file (made with mode 0600 if missing)")

    q = cmds.add_parser("init", formatter_class=formatter,
                        help="a new federation file: keys, sites, parameters, security floor")
    q.add_argument("file", help="the federation file to write")
    q.add_argument("--server", required=True, metavar="PUB",
                   help="the server's public identity (its `federation identity` KEY.pub)")
    q.add_argument("--name", default="fedshield-federation", help="the federation's name")
    q.add_argument("--server-name", default="server", help="the server's name in the file")
    q.add_argument("--config", help="a run config (TOML/JSON) whose he and keys sections and "
                                    "clients give the federation's settings")
    q.add_argument("--overwrite", action="store_true", help="replace an existing file")
    for option in options():
        if option.section in _RUN_SECTIONS or option.flag in _RUN_FLAGS:
            _add_run_option(q, option)
    floor = q.add_argument_group("security floor (default: what the settings above give, "
                                 "with verify-aggregates on)")
    for f in fields(Floor):
        if f.name != "verify_aggregates":   # --verify-aggregates/--no-verify-aggregates above
            floor.add_argument(f"--floor-{f.name.replace('_', '-')}", type=int,
                               dest=f"floor_{f.name}", help=f.metadata["help"])

    q = cmds.add_parser("add", formatter_class=formatter,
                        help="add a member (the next party id) by its public identity")
    q.add_argument("file")
    q.add_argument("--name", required=True, help="the member's name (e.g. its organisation)")
    q.add_argument("--identity", required=True, metavar="PUB",
                   help="the member's public identity file (its KEY.pub)")

    q = cmds.add_parser("sign", formatter_class=formatter,
                        help="sign the whole file with your identity key (member or server)")
    q.add_argument("file")
    q.add_argument("--identity", required=True, metavar="KEY", help="your identity key file")

    q = cmds.add_parser("show", formatter_class=formatter,
                        help="what the file says, who signed it, whether sites may pin it")
    q.add_argument("file")
    q.add_argument("--check", action="store_true",
                   help="exit 1 unless every member and the server signed it")


def _add_run_option(p, option) -> None:
    flag = "--" + option.flag.replace("_", "-")
    if isinstance(option.default, bool):
        p.add_argument(flag, dest=option.flag, default=None,
                       action=argparse.BooleanOptionalAction, help=option.help)
    else:
        p.add_argument(flag, dest=option.flag, default=None, type=type(option.default),
                       choices=option.choices, help=option.help.replace("%", "%%"))


def read_public(path: str) -> PublicIdentity:
    """A public identity file (KEY.pub: its bytes in hex)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
        return PublicIdentity.from_bytes(bytes.fromhex(text))
    except OSError as exc:
        raise FederationError(f"cannot read public identity {path}: {exc.strerror or exc}"
                              ) from None
    except (ValueError, UnicodeDecodeError, KeyMaterialError):
        raise FederationError(f"{path} is not a public identity file (the KEY.pub that "
                              "`fedshield federation identity KEY` writes)") from None


def _identity(args) -> int:
    path = Path(args.key)
    if path.exists():
        identity = Identity.load(path)
        made = "exists"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = Identity.generate()
        identity.save(path)
        made = "made (mode 0600)"
    pub = path.with_name(path.name + PUBLIC_SUFFIX)
    pub.write_text(identity.public.to_bytes().hex() + "\n", encoding="ascii")
    print(f"identity key {path}: {made}\npublic identity {pub} (hand this out)\n"
          f"fingerprint {identity.public.fingerprint()} (compare it out of band)")
    return 0


def _init(args) -> int:
    target = Path(args.file)
    if target.exists() and not args.overwrite:
        raise FederationError(f"{target} exists; pass --overwrite to replace it")
    cfg = RunConfig.from_file(args.config) if args.config else RunConfig()
    changes = {o.flag: getattr(args, o.flag) for o in options()
               if (o.section in _RUN_SECTIONS or o.flag in _RUN_FLAGS)
               and getattr(args, o.flag) is not None}
    cfg = cfg.replace(**changes, _source="command line")
    fed = federation_for_run(cfg, read_public(args.server), name=args.name)
    floor = fed.floor
    # secure by default: a federation verifies aggregates unless told not to
    overrides = {"verify_aggregates": cfg.keys.verify if args.verify_aggregates is not None
                 else True}
    for f in fields(Floor):
        value = getattr(args, f"floor_{f.name}", None)
        if value is not None:
            overrides[f.name] = value
    fed = replace(fed, floor=replace(floor, **overrides),
                  server=replace(fed.server, name=args.server_name))
    fed.save(target)
    print(f"wrote {target}: {fed.keys} keys, {fed.n} sites (t={fed.t}); next: "
          f"`fedshield federation add {target} --name NAME --identity SITE.pub` for each site "
          "in party order")
    return 0


def _add(args) -> int:
    fed = Federation.load(args.file).with_member(args.name, read_public(args.identity))
    fed.save(args.file)
    party = len(fed.members) - 1
    left = fed.n - len(fed.members)
    print(f"{args.file}: {args.name} is party {party} ({fed.members[-1].identity.fingerprint()})"
          + (f"; {left} more to add" if left else "; every member is in: now each member and "
             "the server signs it (`fedshield federation sign`)"))
    return 0


def _sign(args) -> int:
    fed = Federation.load(args.file)
    identity = Identity.load(args.identity)
    fed = fed.signed_by(identity)
    fed.save(args.file)
    role = fed.role_of(identity.public)
    missing = [("the server" if r == SERVER else f"party {r}")
               for r, ok in fed.signers().items() if not ok]
    who = "the server" if role == SERVER else f"party {role}"
    print(f"{args.file}: signed as {who}; "
          + (f"still to sign: {', '.join(missing)}" if missing else
             "every member and the server signed: the sites may pin it"))
    return 0


def _show(args) -> int:
    fed = Federation.load(args.file)
    signed = fed.signers()
    mark = {True: "signed", False: "NOT SIGNED"}
    p = fed.params
    lines = [f"federation {fed.name!r} ({args.file}), fingerprint {fed.fingerprint()}",
             f"keys: {fed.keys}, n={fed.n}, t={fed.t}",
             f"parameters: ring {p.ring_dim}, modulus {p.first_mod_bits} bits, scale 2^"
             f"{p.scale_bits}, flooding {p.flood_bits} bits, budget 2^{p.flood_log_queries}",
             "floor: " + ", ".join(f"{k}={v}" for k, v in asdict(fed.floor).items()),
             f"server  {fed.server.name!r:24} {fed.server.identity.fingerprint()}  "
             f"{mark[signed[SERVER]]}"]
    for party, member in enumerate(fed.members):
        lines.append(f"party {party} {member.name!r:24} {member.identity.fingerprint()}  "
                     f"{mark[signed[str(party)]]}")
    try:
        fed.check_pinnable()
        status, code = "complete: every member and the server signed; sites may pin it", 0
    except FederationError as exc:
        status, code = f"not ready to pin: {exc}", 1
    print("\n".join(lines + [status]))
    return code if args.check else 0


COMMANDS = {"identity": _identity, "init": _init, "add": _add, "sign": _sign, "show": _show}


def run(args) -> int:
    return COMMANDS[args.federation_command](args)


__all__ = ["add_parser", "read_public", "run"]
