"""The federated-learning layer, on top of the encryption layer (fedshield.he):

- protocol.py: the round's requests (train, share, catch-up) and replies, one wire form each;
- rounds.py: RoundDriver, the server's side of the rounds over any transport (no torch);
- site_rounds.py: SiteRounds, a site's answers, the same in both engines;
- messages.py: the typed messages of a round (plan, replies) and their flat fields;
- the Server in parts, none importing torch or openfhe: server.py (the Server, a thin
  coordinator: plan, aggregate, collect shares, checkpoint/restore), membership.py (who is
  in the run), screening.py (a pure screen of every reply: each update parsed and hashed
  once), record.py (the run record, metrics.json, typed), key_epochs.py (the public context
  and key rotation);
- party.py: Party, every site-side rule (DP, the algorithm's weight, the round's mask) and
  the crypto, usable from any training loop (torch);
- site.py: Site, one organisation with its own data and fedshield's training loop;
- schedule.py, dealer.py (keys of a one-process simulation), site_files.py.

This __init__ imports nothing, so the Server's path never loads the torch modules.
"""
