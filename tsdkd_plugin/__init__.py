"""TSD-KD (Token-Selective Dual Knowledge Distillation) for OpenRLHF.

Kept import-light on purpose: the `.pth` hook imports `tsdkd_plugin._register`
in every Python process, so nothing heavy (torch, ray) may be imported here.
"""

__version__ = "0.1.0"
