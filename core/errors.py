class PipelineError(Exception):
    """A problem with what the user gave us. The CLI prints it as one line and exits non-zero."""


class Interrupted(Exception):
    """Training was stopped by Ctrl-C or SIGTERM after writing a checkpoint. The CLI exits 130."""
