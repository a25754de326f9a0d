"""The structure package's error, in a module of its own so that every part of the tracer can raise it."""


class UnsupportedOperationError(RuntimeError):
    """The tracer met an operation it cannot follow channels through."""
