"""Quantization: schemes (scheme.py) and the fake-quant simulator (simulate.py)."""
