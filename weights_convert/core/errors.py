"""The error of the bottom layer: a checkpoint, or an optimizer setting, that cannot be read, written
or trusted. Its own module so that the checkpoint (``core.checkpoint``) and the optimizer registry
and state it holds (``core.optim``, ``core.optimizer_state``) raise it without importing each other."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or trusted; the message is one line for the user."""
