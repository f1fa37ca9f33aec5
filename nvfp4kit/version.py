"""The package version (one place: the package, the checkpoint producer field and the build read it)."""

__version__ = "0.1.0"
