"""COINCIDE data selection for vision-language instruction tuning, as a Ray data job."""

__version__ = "0.1.0"
