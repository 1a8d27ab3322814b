"""The package version, in a leaf module so that modules inside the package need not import ``mmpeft``."""

__version__ = "0.1.0"
