"""Model utilities: parameter and multiply-add counting, gate density."""

from .flops import MAC_RULES, count_macs, count_params, macs_by_module, register_mac_rule
from .flops import conditional_macs
from .gating import set_gate_density

__all__ = ["MAC_RULES", "count_macs", "count_params", "macs_by_module", "register_mac_rule"]
__all__ += ["conditional_macs", "set_gate_density"]
