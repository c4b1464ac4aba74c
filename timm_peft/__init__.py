"""timm_peft: parameter-efficient fine-tuning for any pretrained timm backbone.

After ``import timm_peft``, a method suffix on a timm model name builds the frozen, pretrained
base with the method applied::

    import timm, timm_peft
    model = timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k.ssf", pretrained=True,
                              num_classes=100)
    timm_peft.print_trainable_parameters(model)
"""
__version__ = "0.1.0"

from . import methods  # noqa: F401  (registers every method)
from .core import (AdapterModule, PeftConfig, PeftMethod, apply_method, cfg_field, freeze,
                   get_model_family, get_nb_trainable_parameters, get_peft_config, list_methods,
                   merge, merge_and_unload, print_trainable_parameters, register_method,
                   register_preset, unfreeze, unload, unmerge)
from .integration import create_model, install, list_models
from .adapters import (Adapter, AdapterStateError, Routing, active_adapter, adapter_state,
                       add_adapter, delete_adapter, disable_adapter, get_adapters, route,
                       set_adapter, using_adapter)
from .io import (AdapterError, base_fingerprint, from_pretrained, load_adapter, push_to_hub,
                 read_adapter_config, save_pretrained)
from .deq import DEQ, DEQConvergenceWarning
from .discovery import AdapterInfo, list_adapters
from .methods.e2vpt import E2VPTConfig, train_prune_rewind
from .methods.lion import LionConfig, RobustOptimizer
from .methods.ssf import SSFConfig
from .methods.vpt import VPTConfig

install()
