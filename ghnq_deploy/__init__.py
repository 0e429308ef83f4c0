"""ghnq-deploy: predict CNN parameters with a graph hypernetwork (GHN-Q), quantize, export, verify."""

__version__ = "0.1.0"
