"""klayer: k-layer fully-connected networks with batch normalization, in NumPy.

Every gradient is derived by hand and checked against centred differences and PyTorch.
"""

__version__ = "0.1.0"
