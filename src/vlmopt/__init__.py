"""vlmopt: measure what compressing a vision-language model costs in quality and buys in speed."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
