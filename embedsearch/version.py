"""The package version, at the bottom of the package: importing it imports nothing else.

``embedsearch.__version__`` re-exports it; modules inside the package import it from here, because
``import embedsearch`` (the package) reaches the engine lazily and would close an import cycle.
"""

__version__ = "0.1.0"
