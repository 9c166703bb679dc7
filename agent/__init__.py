"""meta-agent: a streaming, online meta-learning agent.

Importing the package is cheap and silent: heavy parts (torch, River, Prometheus) load when
their modules are imported.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
