"""Model utilities: parameter and multiply-add counting."""

from .flops import MAC_RULES, count_macs, count_params, macs_by_module, register_mac_rule

__all__ = ["MAC_RULES", "count_macs", "count_params", "macs_by_module", "register_mac_rule"]
