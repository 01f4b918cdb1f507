"""Modules: CondConv layers, their routers, and the building blocks of the networks."""

from .blocks import ConvNormAct, make_conv
from .condconv import CondConv2d, RoutedModule, RoutedSequential, Router, call_layer, routed_step

__all__ = [
    "CondConv2d", "ConvNormAct", "RoutedModule", "RoutedSequential", "Router", "call_layer", "make_conv",
    "routed_step",
]
