"""The error every reader and writer of the dataset format raises for bad data (a subclass of ValueError)."""

from __future__ import annotations


class FormatError(ValueError):
    """A sample or dataset folder that does not follow this format."""
