"""The public error types. The native module raises these same classes."""


class FedShieldError(Exception):
    """Base class of every error fedshield raises on purpose."""


class ParameterError(FedShieldError, ValueError):
    """Insecure, inconsistent or out-of-range parameters."""


class DataError(FedShieldError, ValueError):
    """An instruction-data file that cannot be used: unreadable, empty, missing columns, bad rows,
    or too few examples for the clients asked for. The message names the file."""


class HeadroomError(ParameterError):
    """A value (or a number of summed updates) that would overflow the CKKS modulus.

    fedshield rejects it instead of letting the sum wrap around mod q silently.
    """


class PrecisionError(FedShieldError, ArithmeticError):
    """A decrypted average that could be further from the plaintext one than the caller's
    tolerance (e.g. client weights far below the weight bound): refused, never returned."""


class InvalidUpdate(FedShieldError, ValueError):
    """Malformed, truncated, corrupted or tampered update bytes."""


class IncompatibleUpdate(FedShieldError, ValueError):
    """A well-formed update made for another context, layout, mask or round."""


class StorageError(FedShieldError, OSError):
    """A file could not be written (full disk, read-only directory, I/O error). The message
    names the path; the previous version of the file is left as it was."""


class KeyMaterialError(FedShieldError):
    """An operation needs key material the context does not hold, or a key file is bad."""


class AuthenticationError(FedShieldError, ValueError):
    """A signature, a sealed message or a signed record that does not verify: tampered,
    replayed, relabelled or from another party. The message names what did not match."""


class KeySetupError(FedShieldError):
    """Key set-up found a party whose contribution is inconsistent; the message names the
    party, and ``culprit`` holds its id when one party is to blame (None otherwise)."""

    def __init__(self, message: str = "", culprit: "int | None" = None) -> None:
        super().__init__(message)
        self.culprit = culprit

    def __reduce__(self):
        return type(self), (str(self), self.culprit)


class KeyMessageRefused(KeySetupError):
    """A party refused a key set-up message that another party signed (malformed, made for
    other parameters or moduli, residues out of range, not its step of the chain...): the
    signer, ``sender``, is to blame for the failed set-up, not the party that refused it."""

    def __init__(self, message: str, sender: int) -> None:
        super().__init__(message, culprit=sender)
        self.sender = sender

    def __reduce__(self):
        return type(self), (str(self), self.sender)


class FederationError(FedShieldError, ValueError):
    """A federation file that is malformed, incomplete, not signed by every member and the
    server, or that a signer does not belong to (fedshield.trust.federation)."""


class DecryptionRefused(FedShieldError):
    """A key holder refuses to decrypt: not an aggregate of enough signed updates of its round,
    or a second aggregate of a round it already decrypted."""


class DecryptionBudgetExceeded(FedShieldError):
    """A key holder asked to decrypt more ciphertexts than its key's budget allows (the queries
    the noise flooding covers): rotate keys, i.e. start a new key epoch."""


class NotEnoughShares(FedShieldError):
    """Threshold mode: fewer partial decryptions (or present parties) than decryption needs."""


class UnsupportedPlatform(FedShieldError, RuntimeError):
    """The openfhe wheel cannot be imported on this interpreter."""


class ConcurrentUseError(FedShieldError, RuntimeError):
    """An object that is not thread-safe (e.g. the native Aggregator) was called from a second
    thread while a call was still running; the call is refused, nothing is changed."""
