"""Datasets that ship with the package."""
from .peptides_mini import PeptidesMini

__all__ = ["PeptidesMini"]
