"""The Flower engine: fedshield's Server and Sites on a real Flower deployment.

- :mod:`.records`: fedshield's messages in Flower records (their fields in a ConfigRecord;
  updates, aggregates and partial decryptions as chunked ``Array``s under fedshield's own
  ``stype``, which a stock strategy refuses instead of averaging bytes).
- :mod:`.transport`: the round protocol (fedshield.fl.protocol) over the Grid, with one
  reply triage; fedshield.fl.rounds drives it. No secret key, no openfhe, no torch.
- :mod:`.server_app`: the ``ServerApp``; :mod:`.polling`: prompt reply collection.
- :mod:`.client_app`: the ``ClientApp`` (shipped in the server's FAB), one handler that
  relays every request to the site's own worker; :mod:`.site_worker`: the process the site
  starts itself (``fedshield site worker``) holding its Site and answering the protocol only,
  through the same handler as the local engine's (fedshield.fl.site_rounds);
  :mod:`.site_ipc`: the authenticated local channel between them.
- :mod:`.launcher` and :mod:`.deployment`: ``fedshield run --engine flower``, each site's
  worker, then a SuperLink and one SuperNode per site on loopback, each site in a directory
  of its own.

Needs the ``flower`` extra (``pip install 'fedshield[flower]'``).
"""
