"""PEFT methods. Each module registers its method(s) on import; every module here is imported.

Adding a method is adding a module: it defines its config, layers and surgery and decorates a
:class:`timm_peft.core.PeftMethod` subclass with :func:`timm_peft.core.register_method`.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
