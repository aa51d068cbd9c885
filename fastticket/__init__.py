"""fastticket: lottery-ticket search (iterative magnitude pruning) with Triton masked-training kernels."""
from fastticket.nn import MaskedConv2d, MaskedLinear, densify, density, masked_modules, sparsify

__version__ = "0.1.0"
__all__ = ["MaskedLinear", "MaskedConv2d", "sparsify", "densify", "density", "masked_modules", "__version__"]
