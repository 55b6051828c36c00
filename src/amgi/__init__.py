"""AMGI: the Asynchronous Messaging Gateway Interface for Python."""

__version__ = "0.1.0"
