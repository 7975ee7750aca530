"""The transports of a run: the local engine (in-process) and the Flower engine."""
