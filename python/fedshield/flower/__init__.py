"""fedshield on Flower: encrypted LoRA aggregation across processes and machines.

- :mod:`.records`: encrypted updates and partial decryptions in Flower records, chunked,
  under their own ``stype`` (a stock strategy refuses them instead of averaging bytes).
- :mod:`.strategy`: ``EncryptedFedAvg``, a ``FedAvg`` whose aggregation step validates every
  reply and then adds ciphertexts natively (no secret key, no openfhe import).
- :mod:`.server_app` / :mod:`.client_app`: the Flower ``ServerApp`` and ``ClientApp``.
- :mod:`.launcher`: ``fedshield run --engine flower``: a SuperLink and N SuperNodes on loopback.

Needs the ``flower`` extra (``pip install 'fedshield[flower]'``).
"""
