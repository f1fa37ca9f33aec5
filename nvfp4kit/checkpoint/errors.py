"""The one error type of the checkpoint package (a ValueError, so CLIs report it as bad input)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written: the message names the file, tensor or option at fault."""
