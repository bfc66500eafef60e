"""The errors the package raises for input a user can fix; the command-line tools print them as one line.

Leaf module (imports nothing of the package), so library code and the CLIs share these types without import cycles.
"""
__all__ = ["UsageError", "CheckpointError"]


class UsageError(Exception):
    """A command-line, YAML or data problem the user can fix; reported as one line (exit code 2)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, mis-shaped, corrupt or does not fit the model; the message says which."""
