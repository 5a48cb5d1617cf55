"""Errors a user can act on, raised before deep library tracebacks would be."""


class CheckpointError(ValueError):
    """A checkpoint (config, weights or tokenizer files) cannot be found or loaded.

    The message is one line that names the file and the problem, so the pipeline and CLI can
    print it as is and stop before reading any data.
    """
