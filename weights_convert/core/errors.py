"""The error of the bottom layer: a checkpoint, or an optimizer setting, that cannot be read, written
or trusted. Its own module so that the checkpoint (``core.checkpoint``) and the optimizer registry
and state it holds (``core.optim``, ``core.optimizer_state``) raise it without importing each other."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or trusted; the message is one line for the user."""


def shown(value, width: int = 40) -> str:
    """``repr(value)`` cut to ``width`` characters: a hostile or pasted value (a 400-digit number,
    JSON nested thousands deep) still makes a one-line message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
