"""The error of the network-file readers, in a module of its own so that checkpoint.py (our training states) can
import legacy.py (the reference's files) and both raise the same class."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not of a kind we can read. The message says which and why."""
