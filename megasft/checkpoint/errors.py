"""The two ways a checkpoint fails to load (megasft.train exits 3 on either)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or unreadable; the message names the file."""


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model/optimizer it is loaded into; the message says how."""
