"""Readers for checkpoint files and converters into Flax variables."""
