"""Errors of checkpoint reading and conversion (each message names the file, field or layout at fault).

They live at the bottom layer because model layout rules, the checkpoint reader and the converters all raise them."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """A source cannot be converted: missing/partial files, a layout that does not divide, an unknown format."""


class UnsupportedArchitecture(ConversionError):
    """The target format cannot represent this model (e.g. grouped-query attention in GPT2LMHeadModel)."""


class VerificationError(ConversionError):
    """A converted model does not compute what its source computes (logits differ beyond the tolerance)."""
