"""The package's version (one place: the front, the manifest's ``creator`` and ``--version``)."""

__version__ = "0.1.0"
