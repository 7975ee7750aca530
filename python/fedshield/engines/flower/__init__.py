"""The Flower engine: fedshield's Server and Sites on a real Flower deployment.

- :mod:`.records`: fedshield's round messages in Flower records (their fields in a
  ConfigRecord; updates, aggregates and partial decryptions as chunked ``Array``s under their
  own ``stype``, which a stock strategy refuses instead of averaging bytes).
- :mod:`.strategy`: ``EncryptedFedAvg``, a ``FedAvg`` that hands every step to the Server of
  fedshield.fl (screening, native aggregation, shares); no secret key, no openfhe, no torch.
- :mod:`.server_app`: the ``ServerApp``; :mod:`.polling`: prompt reply collection.
- :mod:`.client_app`: the ``ClientApp`` (shipped in the server's FAB), a relay to the site's
  own worker; :mod:`.site_worker`: the process the site starts itself
  (``fedshield site worker``) holding its Site and answering the protocol only;
  :mod:`.site_ipc`: the authenticated local channel between them.
- :mod:`.launcher` and :mod:`.deployment`: ``fedshield run --engine flower``, each site's
  worker, then a SuperLink and one SuperNode per site on loopback, each site in a directory
  of its own.

Needs the ``flower`` extra (``pip install 'fedshield[flower]'``).
"""
