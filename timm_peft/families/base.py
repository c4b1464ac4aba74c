"""The family protocol: what methods may ask about a model's structure.

A :class:`Family` answers structural questions about the timm models of one model file (timm
keeps one file per family, and so do we: ``timm_peft/families/<family>.py``). Methods ask these
questions and never look at a family's name; a family that cannot answer one returns ``None``, and
the method refuses at build time with :func:`refuse`'s message.

The base class answers from what every timm model exposes (``group_matcher``,
``get_classifier``, ``pretrained_cfg``), so the generic fallback family is the base class itself;
a family module overrides only what its models do differently.

Questions:

* :meth:`Family.layer_groups`: the residual blocks (Partial-k) and the modules after them.
* :meth:`Family.token_sequence`: a token model's blocks, prefix tokens, width and patch size
  (token prompts: VPT, E²VPT).
* :meth:`Family.kv_attention`: attention layers that accept key-value prompts (E²VPT).
* :meth:`Family.window_attention`: windowed attention layers that accept extra keys and values
  shared by every window (VPT and E²VPT on Swin-style models).
* :meth:`Family.pixel_input`: where pixel prompts go and the input they are sized for (VPT on
  ConvNets).
* :meth:`Family.ssf_sites`: the operations SSF follows, and the ones it must skip (with why).
* :meth:`Family.residual_branches`: pre-norm residual blocks whose adds SSF may move into each
  branch's last Linear (memory only).
* :meth:`Family.block_layers`: each block's MLP and attention, the width-preserving residual
  bodies bottleneck adapters follow or run beside (Adapter, AdaptFormer).
* :meth:`Family.linear_layers`: the Linear and 1×1 conv layers whose outputs a low-rank update
  may change (LoRA), with any layer the model reads without calling it reported.
* :meth:`Family.ssf_attention`: attentions that can run from the ``qkv`` output SSF saves
  (memory only).
* :meth:`Family.final_norms`: the norms between the last block and the head.
* :meth:`Family.classifiers` and :meth:`Family.pooled`: the modules that turn pooled features
  into logits, and whether the model pools at all (LION's feature prompt).

``capabilities`` says which questions a family answers for *every* model it claims; it drives
``list_models`` without building a model. The generic fallback claims none (it answers only
once a model is built, from what timm exposes), so ``list_models`` lists registered families only.
"""
from __future__ import annotations

import copy

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

from torch import nn

from ..layers.swap import Swappable

__all__ = ["Family", "TokenSequence", "WindowLayer", "PixelInput", "LayerGroups", "SsfSite",
           "BlockLayers", "LinearLayer", "FamilyCapabilityError", "classifier_modules",
           "pre_norm_blocks"]


class FamilyCapabilityError(ValueError):
    """A method needs something the model's family does not provide (raised at build time)."""


@dataclass
class TokenSequence:
    """A token model as token prompts see it: ``[prefix tokens, patch tokens]`` through ``blocks``.

    Prompts are inserted after the ``num_prefix_tokens`` prefix tokens (class, register and
    distillation tokens), after the position embedding, so they carry none.
    """

    blocks: list[nn.Module]
    num_prefix_tokens: int
    dim: int
    patch_size: tuple[int, int]
    #: attention layers that treat their ``num_prefix_tokens`` first tokens apart (rotary
    #: embeddings skip them): prompts join that prefix (:class:`~timm_peft.layers.PromptsAsPrefix`)
    prefix_attention: list[nn.Module] = field(default_factory=list)
    #: ``(module, mixin)`` pairs that adapt position-dependent parts to the prompts (e.g. a
    #: relative-position bias padded for them); swapped in with references ``vpt_prompts`` and
    #: ``vpt_num_prefix``
    prompt_adapters: list[tuple[nn.Module, type]] = field(default_factory=list)


@dataclass
class WindowLayer:
    """One block of a windowed-attention stage: its pre-attention norm and its attention."""

    norm: nn.Module
    attn: nn.Module
    dim: int


@dataclass
class PixelInput:
    """Where a ConvNet reads its image: channels, the input size it is built for, normalisation."""

    in_chans: int
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class LayerGroups:
    """Residual blocks (each a list of modules) in forward order, and the modules after them."""

    blocks: list[list[nn.Module]]
    tail: list[nn.Module] = field(default_factory=list)


@dataclass
class SsfSite:
    """An operation SSF follows (``reason`` None) or skips (``reason`` says why)."""

    name: str
    op: nn.Module
    reason: str | None = None
    #: channels of the map where ``op`` does not say (an ``nn.Identity`` standing for a norm)
    channels: int | None = None
    #: set on the two alternative last sites of a token-pooled model whose final norm comes
    #: after pooling: ``"before_pool"`` (on the tokens) or ``"after_fc_norm"``; SSF keeps the one
    #: its config's ``pooled_norm_site`` names
    placement: str | None = None
    #: why a site that runs exactly cannot be folded into a plain timm model (merge refuses it)
    merge_reason: str | None = None


@dataclass
class BlockLayers:
    """One residual layer of a block as bottleneck adapters see it: the block's MLP and its
    attention (token mixer), each mapping ``dim`` channels to ``dim`` channels, either None.

    ``channel_axis`` is where the channels are in both modules' inputs and outputs: -1 for
    Linear MLPs (tokens, channels-last maps), 1 for 1×1-conv MLPs on NCHW maps.
    """

    mlp: nn.Module | None
    attn: nn.Module | None
    dim: int
    channel_axis: int = -1


@dataclass
class LinearLayer:
    """A Linear (or 1×1 conv) layer a low-rank update may change, by its name in the model.

    ``reason`` says why its output cannot be changed through its ``forward`` (the model reads its
    weight itself); ``caller`` is a ``(module, mixin)`` pair whose :func:`~timm_peft.layers.
    swap_class` makes the model call it (same function) so that it can.
    """

    name: str
    op: nn.Module
    reason: str | None = None
    caller: tuple[nn.Module, type] | None = None


class SeparateQkvBias(Swappable):
    """An attention of timm's (EVA, BEiT, Swin-V2) with separate q/v biases that calls its
    ``qkv`` Linear and adds the biases after it (timm's ``qkv_bias_separate=True`` path, the same
    function) instead of calling ``F.linear`` on ``qkv.weight``: so a method that changes
    ``qkv``'s forward (LoRA) is not bypassed."""

    prefix = "SeparateQkvBias"
    method = "lora"
    fx_transparent = True  # timm's own computation

    @property
    def qkv_bias_separate(self) -> bool:  # a data descriptor: wins over timm's instance attribute
        return True

    @qkv_bias_separate.setter
    def qkv_bias_separate(self, value: bool) -> None:
        pass


def _mlp_classes() -> tuple[type, ...]:
    from timm.layers import ConvMlp, GatedMlp, GluMlp, Mlp, SwiGLU
    return (Mlp, GluMlp, SwiGLU, GatedMlp, ConvMlp)


def mlp_width(mlp: nn.Module) -> tuple[int, int] | None:
    """``(channels, channel axis)`` of a width-preserving MLP: read from its first and last
    Linear / 1×1 conv (``fc1``/``fc2`` in timm's MLPs); None when they differ or are missing."""
    layers = [m for m in mlp.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        return None
    first, last = layers[0], layers[-1]
    if isinstance(first, nn.Linear) and isinstance(last, nn.Linear):
        cin, cout, axis = first.in_features, last.out_features, -1
    elif isinstance(first, nn.Conv2d) and isinstance(last, nn.Conv2d):
        cin, cout, axis = first.in_channels, last.out_channels, 1
    else:
        return None
    return (cout, axis) if cin == cout else None


def pre_norm_blocks(blocks: Iterable[nn.Module], block_cls: type, attn_cls: type,
                    branches: tuple[Any, ...]) -> list[tuple[nn.Module, tuple[Any, ...]]]:
    """``(block, branches)`` for the blocks of exactly ``block_cls`` whose ``attn`` is exactly
    ``attn_cls`` and whose ``mlp`` is one of timm's MLPs: the classes whose ``forward`` the
    :class:`~timm_peft.layers.scale_shift.ResidualBranch` descriptions were read from (their
    bodies end ``proj_drop(proj(x))`` / ``drop2(fc2(x))``; E²VPT's attentions keep that)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    from ..layers.swap import original_class
    return [(b, branches) for b in blocks
            if original_class(b) is block_cls and original_class(b.attn) is attn_cls
            and original_class(b.mlp) in (Mlp, GluMlp, SwiGLU)]


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The model's classifier module(s) from ``get_classifier``: two for distilled models (a
    tuple), one per branch for CrossViT (a ``ModuleList``). Where ``get_classifier`` returns a
    whole timm head that pools before its ``fc`` (Sequencer's and SAM-ViT's ``ClassifierHead``),
    the classifier is that ``fc``, as ``get_classifier`` gives it for ConvNeXt."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    heads = head if isinstance(head, (tuple, list, nn.ModuleList)) else (head,)
    return [h.fc if isinstance(getattr(h, "global_pool", None), nn.Module)
            and isinstance(getattr(h, "fc", None), nn.Module) else h
            for h in heads if isinstance(h, nn.Module)]


def entrypoint_uses(arch: str, name: str) -> bool:
    """Whether timm's entrypoint for ``arch`` builds with ``name`` (read from its source, so no
    model is built): how a family tells its archs apart for :meth:`Family.arch_capabilities`.

    Example:
        >>> entrypoint_uses("resnetaa50", "aa_layer=nn.AvgPool2d")
        True
    """
    import inspect
    from timm.models import _registry
    fn = _registry._model_entrypoints.get(arch)
    fn = getattr(fn, "__timm_peft_original__", fn)
    try:
        return name in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Family:
    """Structural knowledge of one timm model family; the base class is the generic fallback.

    Subclass in ``timm_peft/families/<name>.py``, set ``name`` and ``modules`` (the timm model
    modules whose archs belong to the family, e.g. ``("swin_transformer",)``), override the
    questions the generic answers get wrong, and decorate with :func:`register_family`.
    ``capabilities`` says which questions the family answers for every model it lists, so that
    ``list_models`` can decide without building a model.

    Example:
        >>> import timm
        >>> from timm_peft.families import get_family
        >>> fam = get_family(timm.create_model("resnet18"))
        >>> fam.name, len(fam.layer_groups(timm.create_model("resnet18")).blocks)
        ('resnet', 8)
    """

    name: ClassVar[str] = "generic"
    modules: ClassVar[tuple[str, ...]] = ()
    #: what every model of the family provides: ``layer_groups``, ``ssf``, ``tokens``,
    #: ``kv_attention``, ``windows``, ``pixels``, ``classifier`` (pooled features read by
    #: ``get_classifier``'s module(s) and the family's extra heads: LION), ``block_mlp`` (every
    #: block has a width-preserving MLP: :meth:`block_layers`), ``block_attn`` (and an
    #: attention), ``qkv`` (every attention has a packed ``qkv`` Linear LoRA can change:
    #: :meth:`linear_layers`)
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: what only some of the family's timm modules provide (module -> capabilities), for the
    #: declaration families whose modules differ: e.g. a packed ``qkv`` in some mixers'
    #: attention. Each entry is a cell of the coverage sweep (``benchmarks/coverage.py``)
    module_capabilities: ClassVar[dict[str, frozenset[str]]] = {}

    # --- membership ----------------------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to the family: its class is defined in one of ``modules``."""
        from ..layers.swap import original_class
        mod = original_class(model).__module__
        return any(mod == f"timm.models.{m}" for m in self.modules)

    def __repr__(self) -> str:
        return f"<family {self.name!r}>"

    def arch_capabilities(self, arch: str) -> frozenset[str]:
        """``capabilities`` for one registered arch of the family (no model is built), with
        what its module adds (:attr:`module_capabilities`): a family whose archs differ in a
        capability narrows it here."""
        from timm.models import _registry
        return self.capabilities | self.module_capabilities.get(
            _registry._model_to_module.get(arch), frozenset())

    def widest(self) -> "Family":
        """This family as its best-provided module sees it (``capabilities`` with every
        :attr:`module_capabilities` entry): whether a method may apply to any of its archs."""
        if not self.module_capabilities:
            return self
        view = copy.copy(self)
        view.capabilities = self.capabilities.union(*self.module_capabilities.values())
        return view

    # --- blocks and layer groups ---------------------------------------------------------------
    def layer_groups(self, model: nn.Module) -> LayerGroups | None:
        """Blocks from timm's ``group_matcher(coarse=False)``: the groups its ``blocks`` patterns
        number (``block_types`` in HRNet's); the tail is every later group but the classifier
        (final norms, pre-logits). A matcher that is a function of the module name (Inception's)
        numbers the model's top-level modules: each numbered group of them is a block."""
        matcher_fn = getattr(model, "group_matcher", None)
        if not callable(matcher_fn):
            return None
        from timm.models._manipulate import group_modules
        try:
            matcher = matcher_fn(coarse=False)
        except (NotImplementedError, TypeError):
            return None
        if callable(matcher):
            return self._called_groups(model, matcher)
        specs = (matcher.get("blocks", matcher.get("block_types"))
                 if isinstance(matcher, dict) else None)
        if specs is None:
            return None
        specs = [specs] if isinstance(specs, str) else [s[0] for s in specs]
        numbered = [re.compile(s) for s in specs if re.compile(s).groups > 0]
        lid = group_modules(model, matcher, reverse=True)
        named = dict(model.named_modules())
        heads = {id(h) for h in classifier_modules(model)}
        head_names = {n for n, m in named.items() if id(m) in heads}
        # a block is the module its pattern matched (``blocks.3`` of ``blocks.3.attn.qkv``)
        matched: dict[str, str] = {}
        for n in lid:
            for r in numbered:
                hit = r.match(n)
                if hit is not None:
                    matched[n] = hit.group(0).rstrip(".")
                    break
        block_ids = sorted({lid[n] for n in matched})
        if not block_ids:
            return None
        groups = [[named[b] for b in dict.fromkeys(matched[n] for n in matched if lid[n] == g)]
                  for g in block_ids]
        # timm puts the final norm in the last block's group (MATCH_PREV_GROUP): it is tail
        tail = [named[n] for n in lid if lid[n] >= block_ids[-1] and n not in matched
                and not any(n == h or n.startswith(h + ".") for h in head_names)]
        return LayerGroups(groups, tail)

    @staticmethod
    def _called_groups(model: nn.Module, matcher: Any) -> LayerGroups | None:
        """Blocks of a function matcher: top-level modules (the classifier's aside) grouped by
        the finite ordinal it gives their names, in ordinal order."""
        heads = {id(h) for h in classifier_modules(model)}
        by_ordinal: dict[float, list[nn.Module]] = {}
        for name, child in model.named_children():
            ordinal = matcher(name)
            ordinal = ordinal[0] if isinstance(ordinal, (tuple, list)) else ordinal
            if id(child) in heads or not isinstance(ordinal, (int, float)) \
                    or ordinal != ordinal or ordinal == float("inf") \
                    or not any(True for _ in child.parameters()):
                continue
            by_ordinal.setdefault(ordinal, []).append(child)
        if len(by_ordinal) < 2:
            return None
        return LayerGroups([by_ordinal[k] for k in sorted(by_ordinal)])

    def blocks(self, model: nn.Module) -> list[nn.Module] | None:
        """The residual blocks in forward order, when they are single modules."""
        groups = self.layer_groups(model)
        if groups is None or any(len(g) != 1 for g in groups.blocks):
            return None
        return [g[0] for g in groups.blocks]

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        """Norms between the last block and the classifier."""
        groups = self.layer_groups(model)
        return list(groups.tail) if groups is not None else []

    # --- classifier ----------------------------------------------------------------------------
    def classifiers(self, model: nn.Module) -> list[nn.Module]:
        """Every module that reads the pooled features (or tokens) and produces logits: the
        one(s) ``get_classifier`` returns, plus any auxiliary head a family knows of."""
        return classifier_modules(model)

    def pooled(self, model: nn.Module) -> bool | None:
        """Whether ``forward_head`` pools the features before the classifier, from timm's
        ``global_pool`` (a pool type string, or a ``SelectAdaptivePool2d`` on the model or its
        head); None when the model does not say."""
        for owner in (model, getattr(model, "head", None)):
            pool = getattr(owner, "global_pool", None) if isinstance(owner, nn.Module) else None
            if isinstance(pool, str):
                return bool(pool)
            is_identity = getattr(pool, "is_identity", None)
            if callable(is_identity):
                return not is_identity()
        return None

    # --- tokens and attention ------------------------------------------------------------------
    def token_sequence(self, model: nn.Module) -> TokenSequence | None:
        """The token sequence token prompts join; None: not a token model we can prompt."""
        return None

    def prompted_model_mixin(self, model: nn.Module) -> type | None:
        """Mixin (for :func:`timm_peft.layers.swap_class`) that hides prompt tokens from callers."""
        return None

    def kv_attention(self, model: nn.Module) -> list[nn.Module] | None:
        """Attention layers, one per block, that take key-value prompts."""
        return None

    def window_attention(self, model: nn.Module) -> list[list[WindowLayer]] | None:
        """Per stage, the blocks' windowed attention (extra keys and values for every window)."""
        return None

    # --- pixels --------------------------------------------------------------------------------
    def pixel_input(self, model: nn.Module) -> PixelInput | None:
        """A ConvNet's image input (pixel prompts); None for models that are not ConvNets."""
        return None

    def in_chans(self, model: nn.Module) -> int | None:
        """Image channels: the model's own ``in_chans`` where it keeps one, else read from the
        layer timm's ``pretrained_cfg['first_conv']`` names (the layer timm itself adapts to
        ``in_chans``; after a space-to-depth stem, as TResNet's, that layer sees more)."""
        in_chans = getattr(model, "in_chans", None)
        if isinstance(in_chans, int):
            return in_chans
        pc = getattr(model, "pretrained_cfg", None) or {}
        first = pc.get("first_conv")
        if isinstance(first, (tuple, list)):
            first = first[0]
        try:
            conv = model.get_submodule(first) if first else None
        except AttributeError:
            conv = None
        return getattr(conv, "in_channels", None)

    def _pretrained_pixel_input(self, model: nn.Module) -> PixelInput | None:
        """Channels from :meth:`in_chans`, size from ``pretrained_cfg['input_size']``."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        pc = getattr(model, "pretrained_cfg", None) or {}
        in_chans = self.in_chans(model)
        if in_chans is None:
            return None
        return PixelInput(in_chans, _pair(tuple(pc.get("input_size", (3, 224, 224))[-2:])),
                          tuple(pc.get("mean", IMAGENET_DEFAULT_MEAN)),
                          tuple(pc.get("std", IMAGENET_DEFAULT_STD)))

    # --- SSF -----------------------------------------------------------------------------------
    def ssf_sites(self, model: nn.Module) -> list[SsfSite]:
        """Every operation of a type SSF knows, outside the classifier; the rest is reported.

        SSF's :func:`~timm_peft.methods.ssf.site_reason` decides per operation whether the map
        can follow it and fold into it exactly.
        """
        from ..layers.scale_shift import scan
        return list(scan(model, ("",), skip_unfoldable=True,
                         exclude=tuple(classifier_modules(model))))

    def ssf_attention(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        """``(attention, mixin)`` pairs: attentions that, with SSF after their ``qkv``, can run
        from the ``qkv`` output SSF saves anyway instead of saving copies of q, k and v (memory
        only; default: none)."""
        return []

    def residual_branches(self, model: nn.Module) -> list[tuple[nn.Module, tuple[Any, ...]]]:
        """Pre-norm blocks ``x + drop_path(λ ⊙ body(norm(x)))`` whose bodies each end in a
        Linear, with their :class:`~timm_peft.layers.scale_shift.ResidualBranch` descriptions.

        SSF moves those adds into the Linears (:class:`~timm_peft.layers.scale_shift.
        ResidualIntoBranch`) and then saves no activation there; without them (the default:
        none) it saves each branch's output, which is only memory.
        """
        return []

    # --- bottleneck adapters and low-rank updates ---------------------------------------------
    def block_layers(self, model: nn.Module) -> list[BlockLayers] | None:
        """Per residual layer of every block, its MLP and attention (Adapter, AdaptFormer).

        Generic answer: in each block of :meth:`blocks`, the child ``mlp`` (or the one timm MLP
        inside it: ``Mlp``, ``GluMlp``, ``SwiGLU``, ``GatedMlp``, ``ConvMlp``) and the child
        ``attn``; None when a block has no width-preserving MLP. ``attn`` is None where a block
        has none.
        """
        blocks = self.blocks(model)
        if not blocks:
            return None
        out = []
        for b in blocks:
            mlp = b._modules.get("mlp")
            if not isinstance(mlp, nn.Module):
                mlps = [m for m in b.modules() if isinstance(m, _mlp_classes())]
                mlp = mlps[0] if len(mlps) == 1 else None
            width = mlp_width(mlp) if mlp is not None else None
            if width is None:
                return None
            attn = b._modules.get("attn")
            out.append(BlockLayers(mlp, attn if isinstance(attn, nn.Module) else None, *width))
        return out

    def linear_layers(self, model: nn.Module) -> list[LinearLayer]:
        """Every ``nn.Linear`` and 1×1 ``nn.Conv2d`` (no groups) outside the classifier and the
        modules methods inserted, in ``named_modules`` order (LoRA picks its targets by name).

        A packed ``qkv`` whose attention keeps separate q/v biases (EVA, BEiT, Swin-V2: ``q_bias``
        set) is read with ``F.linear(x, qkv.weight, ...)``, never called: where the attention
        offers timm's ``qkv_bias_separate`` path it comes with the :class:`SeparateQkvBias`
        caller, else with the reason.
        """
        from ..layers.swap import AdapterModule
        heads = classifier_modules(model)
        head_ids = {id(m) for h in heads for m in h.modules()}
        # layers another method inserted are not the base's
        head_ids |= {id(m) for a in model.modules() if isinstance(a, AdapterModule)
                     for m in a.modules()}
        named = dict(model.named_modules())
        out = []
        for name, op in named.items():
            if id(op) in head_ids or not _low_rank_able(op):
                continue
            layer = LinearLayer(name, op)
            parent_name, _, attr = name.rpartition(".")
            parent = named.get(parent_name)
            if attr == "qkv" and getattr(parent, "q_bias", None) is not None:
                if hasattr(parent, "qkv_bias_separate"):
                    layer.caller = (parent, SeparateQkvBias)
                else:
                    layer.reason = FUNCTIONAL_QKV_LORA
            out.append(layer)
        return out

    # --- helpers -------------------------------------------------------------------------------
    @staticmethod
    def submodules(model: nn.Module, names: tuple[str, ...]) -> Iterator[nn.Module]:
        for n in names:
            m = getattr(model, n, None)
            if isinstance(m, nn.Module):
                yield m


class TokenBlocksFamily(Family):
    """Base of ViT-like families: ``model.blocks`` in order after ``[prefix tokens, patches]``,
    the final norms ``norm``/``fc_norm``/``head_norm``, prompts hidden from callers like ViT's.

    A subclass sets ``name``/``modules``/``matches`` and overrides :meth:`token_sequence` only for
    what its attention does with extra tokens (relative-position bias, rotary embeddings).
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"layer_groups", "ssf", "classifier", "tokens"})

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return LayerGroups([[b] for b in model.blocks], self.final_norms(model))

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        return list(self.submodules(model, ("norm", "fc_norm", "head_norm")))

    def kv_attention(self, model: nn.Module) -> list[nn.Module] | None:
        """Each block's ``attn`` (E²VPT keeps the classes that take key-value prompts)."""
        attns = [getattr(b, "attn", None) for b in model.blocks]
        return attns if all(isinstance(a, nn.Module) for a in attns) else None

    def token_sequence(self, model: nn.Module, **extra: Any) -> TokenSequence:
        return TokenSequence(list(model.blocks), model.num_prefix_tokens, model.embed_dim,
                             _pair(getattr(model.patch_embed, "patch_size", 16)), **extra)

    def prompted_model_mixin(self, model: nn.Module) -> type:
        from ..layers.prompts import PromptedViT
        return PromptedViT


FUNCTIONAL_QKV = ("the attention calls F.linear on qkv.weight itself (separate q/k/v biases), "
                  "so a scale-shift after qkv would never run; SSF follows the attention's proj")


FUNCTIONAL_QKV_LORA = ("the attention calls F.linear on qkv.weight itself (separate q/v biases), "
                       "so a change to qkv's forward would never run")


def _low_rank_able(op: nn.Module) -> bool:
    """Exactly ``nn.Linear`` (or timm's ``Linear``) or a 1×1, ungrouped, undilated ``nn.Conv2d``:
    subclasses may compute something else in ``forward``."""
    from timm.layers.linear import Linear as TimmLinear

    from ..layers.swap import original_class
    cls = original_class(op)
    if cls in (nn.Linear, TimmLinear):
        return True
    return cls is nn.Conv2d and tuple(op.kernel_size) == (1, 1) and op.groups == 1 \
        and tuple(op.stride) == (1, 1) and op.padding in ((0, 0), 0, "valid")


def report_functional_qkv(model: nn.Module, sites: Iterable[SsfSite]) -> list[SsfSite]:
    """SSF sites of a family whose attention bypasses ``qkv``'s forward when it has separate
    q/k/v biases (EVA, BEiT, Swin-V2: ``attn.q_bias`` set): those ``attn.qkv`` sites are kept as
    skipped sites with the reason, so SSF reports them instead of training a map that never runs."""
    out = []
    for site in sites:
        parent = site.name.rpartition(".")[0]
        if site.name.endswith("attn.qkv") and site.reason is None \
                and getattr(model.get_submodule(parent), "q_bias", None) is not None:
            site.reason = FUNCTIONAL_QKV
        out.append(site)
    return out
