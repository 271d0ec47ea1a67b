"""Errors raised at the pipeline's boundaries (loading, CLI input, artifacts, parity).

Every message is one line that names the thing that is wrong and how to fix it; the CLI prints
it without a traceback.
"""


class Qwen3ExportError(Exception):
    """Base class: a user-facing, one-line error."""

    def __init__(self, message: str):
        if "\n" in message:
            message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        super().__init__(message)


class ConfigError(Qwen3ExportError):
    """A model config.json or preset is malformed or unsupported."""


class WeightsError(Qwen3ExportError):
    """A weight file or tensor is missing, truncated, mis-shaped or unexpected."""


class TargetError(Qwen3ExportError):
    """An unknown target, or something the target cannot run (dtype, backend)."""


class InputError(Qwen3ExportError):
    """Bad runtime input: token ids out of range, parameters out of range, …"""


class ArtifactError(Qwen3ExportError):
    """An artifact folder is incomplete, tampered with or of an unknown schema."""


class ParityError(Qwen3ExportError):
    """An engine does not reproduce eager PyTorch within the gate's thresholds."""
