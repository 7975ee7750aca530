"""Who may take part and what a party accepts: identities and their signatures, the pinned
federation, the quorum rule and the decryption guard."""
