"""User-facing errors.

One exception type per kind of user mistake. Each carries a message that names
the file, line or field at fault; ``llmkit.cli`` prints it as one line and exits
non-zero. Internal bugs are ordinary exceptions and keep their tracebacks.
"""


class LlmkitError(Exception):
    """Base class of every error caused by the user's input rather than a bug."""


class InputError(LlmkitError):
    """A missing, unreadable, empty or malformed input file."""


class ConfigError(LlmkitError):
    """A configuration value that is out of range or inconsistent."""

    def __init__(self, field: str, value, reason: str):
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"config field '{field}' = {value!r}: {reason}")


class MismatchError(LlmkitError):
    """Two artefacts that must agree do not (tokenizer vs. checkpoint, resumed config vs. saved)."""
