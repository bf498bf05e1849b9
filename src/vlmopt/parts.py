"""The parts every family's model is split into, in pipeline order (a family may leave any empty).

A module of its own so that code without torch (planning, figures) names them the same way as
the model adapters and the compression selector.
"""

__all__ = ["PARTS"]

PARTS = ("vision", "bridge", "language")
