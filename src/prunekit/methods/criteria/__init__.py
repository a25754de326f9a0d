"""Criteria: how important each weight is (higher = keep). One file per family, each registered by
name; see :mod:`prunekit.methods.criteria.base` for the table of criteria and how to add one."""

from .base import Criterion
from .custom import Custom
from .gradient import Gradient, GradientProduct, Movement
from .magnitude import L2Magnitude, Magnitude
from .random import Random
from .registry import CRITERIA, get_criterion, register_criterion

__all__ = [
    "CRITERIA",
    "Criterion",
    "Custom",
    "Gradient",
    "GradientProduct",
    "L2Magnitude",
    "Magnitude",
    "Movement",
    "Random",
    "get_criterion",
    "register_criterion",
]
