"""Model utilities: parameter and multiply-add counting, gate density."""

from .flops import MAC_RULES, conditional_macs, count_macs, count_params, macs_by_module, register_mac_rule
from .gating import set_gate_density

__all__ = [
    "MAC_RULES", "conditional_macs", "count_macs", "count_params", "macs_by_module", "register_mac_rule",
    "set_gate_density",
]
