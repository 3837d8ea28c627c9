"""The one error of the probes package: a study or probe cannot run as asked."""


class ProbeError(ValueError):
    """A probe study cannot run as asked; the message says what to change."""
