"""Modules: CondConv layers, their routers, gated convolutions, and the building blocks of the networks."""

from .blocks import ConvNormAct, make_conv
from .condconv import CondConv2d, RoutedModule, RoutedSequential, Router, call_layer, routed_step
from .deepmoe import DeepMoELosses, GateHead, ShallowEmbedding, freeze_gates, gate_heads
from .gated import ChannelGate, GatedConv2d
from .losses import GateLosses

__all__ = [
    "CondConv2d", "ConvNormAct", "GatedConv2d", "RoutedModule", "RoutedSequential", "Router", "call_layer", "make_conv",
    "routed_step",
]
__all__ += ["DeepMoELosses", "GateHead", "ShallowEmbedding", "freeze_gates", "gate_heads"]
__all__ += ["ChannelGate", "GateLosses"]
