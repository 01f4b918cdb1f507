"""Modules: CondConv layers and their routers, gated convolutions and their gates (batch-shaping,
DeepMoE), the gate-loss collectors, and the building blocks of the networks."""

from .blocks import ConvNormAct, make_conv
from .condconv import CondConv2d, RoutedModule, RoutedSequential, Router, call_layer, routed_step
from .deepmoe import DeepMoELosses, GateHead, ShallowEmbedding, freeze_gates, gate_heads
from .gated import ChannelGate, GatedConv2d
from .losses import GateLosses

__all__ = [
    "ChannelGate", "CondConv2d", "ConvNormAct", "DeepMoELosses", "GateHead", "GateLosses", "GatedConv2d",
    "RoutedModule", "RoutedSequential", "Router", "ShallowEmbedding", "call_layer", "freeze_gates", "gate_heads",
    "make_conv", "routed_step",
]
