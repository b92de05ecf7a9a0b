"""Makes `python -m openrlhf.cli.train_tsdkd` resolve to this plugin.

OpenRLHF has no algorithm registry, and one distribution cannot add a module
to another's package by import alone. We ship `_tsdkd_plugin_register.pth`
(site-packages root, regular and editable installs) whose single line imports
this module at interpreter start-up, in every process of the venv, Ray workers
included. It only appends a meta-path finder; nothing is imported eagerly.
"""

import importlib.abc
import importlib.util
import sys

# Virtual module name inside OpenRLHF's namespace -> our real module.
ALIASES = {
    "openrlhf.cli.train_tsdkd": "tsdkd_plugin.cli.train_tsdkd",
}


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves names in ALIASES to the source file of the plugin module."""

    def find_spec(self, fullname, path=None, target=None):
        real = ALIASES.get(fullname)
        if real is None:
            return None
        try:
            real_spec = importlib.util.find_spec(real)
        except ImportError:  # plugin half-installed: behave as if the alias did not exist
            return None
        if real_spec is None or real_spec.origin is None:
            return None
        return importlib.util.spec_from_file_location(fullname, real_spec.origin)


def install():
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


install()
