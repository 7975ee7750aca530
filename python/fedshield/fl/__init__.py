"""The federated-learning layer, on top of the encryption layer (fedshield.he):

- protocol.py: the round's requests (train, share, catch-up) and replies, one wire form each;
- rounds.py: RoundDriver, the server's side of the rounds over any transport (no torch);
- site_rounds.py: SiteRounds, a site's answers, the same in both engines;
- messages.py: the typed messages of a round (plan, replies) and their flat fields;
- record.py: the run record (metrics.json), one writer for every engine;
- server.py: the Server (enrol, plan, screen, aggregate, check shares, record); no torch,
  no openfhe;
- party.py: Party, a site's crypto half, usable from any training loop (torch);
- site.py: Site, one organisation with its own data and fedshield's training loop;
- schedule.py, dealer.py (keys of a one-process simulation), site_files.py.

This __init__ imports nothing, so the Server's path never loads the torch modules.
"""
