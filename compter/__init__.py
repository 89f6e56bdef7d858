"""Compter: knows that the things we promised actually happened."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("compter")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
