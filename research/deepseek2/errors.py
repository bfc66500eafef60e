"""The errors the package raises for input a user can fix; the command-line tools print them as one line.

Leaf module (imports nothing of the package), so library code and the CLIs share these types without import cycles.
"""
__all__ = ["UsageError", "CheckpointError", "PetConfigError", "EvaluationError", "BadRecord", "NonFiniteLossError",
           "QuantizationError"]


class UsageError(Exception):
    """A command-line, YAML or data problem the user can fix; reported as one line (exit code 2)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, mis-shaped, corrupt or does not fit the model; the message says which."""


class PetConfigError(ValueError):
    """A pet_config (LoRA) field is wrong; the message names it and says what was expected."""


class EvaluationError(ValueError):
    """A bad configuration, checkpoint or data file given to an evaluation; the message names it."""


class BadRecord(ValueError):
    """A data record that is not a usable {instruction, input, output} sample."""


class NonFiniteLossError(RuntimeError):
    """The training loss (or gradient norm) became NaN or inf; the message names the step."""


class QuantizationError(ValueError):
    """A quantization_config field, or a quantized checkpoint that does not fit it; the message names the field or
    tensor and says what was expected."""
