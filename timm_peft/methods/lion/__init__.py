"""LION: implicit vision prompt tuning (Wang et al., "LION: Implicit Vision Prompt Tuning",
AAAI 2024; arXiv:2303.09992).

Two deep-equilibrium prompt blocks sit at the two ends of a frozen backbone ``F`` and the head
``H`` reads the blended features (paper Eq. 1-3)::

    x̃ = α₁·x + β₁·P₁(x)                 P₁: implicit conv layer on the image
    z̃ = α₂·F(x̃) + β₂·MLP(P₂(F(x̃)))      P₂: implicit layer on the pooled features
    (αᵢ, βᵢ) = softmax(g_αᵢ, g_βᵢ)        logits = H(z̃)

and the prompt blocks (P₁, P₂, the projection and the gates) are trained with the paper's robust
rule (Eq. 7-11, :class:`RobustOptimizer`), the head with the plain optimiser. No code of LION is public, so every
choice below is ours; each is a :class:`LionConfig` field.

Choices where the paper is silent:

* **Cell.** "A ResNet layer" with input injection: ``f(z, u) = GN(relu(u + W₂·relu(W₁·z)))``,
  a residual block whose skip carries the injection ``u``; ``u`` is GroupNorm-ed once (no
  affine), so the cell's gain depends neither on the scale of the backbone's features nor on a
  learned rescaling. GroupNorm (``norm_groups``) keeps each sample's equilibrium independent of
  the rest of the batch. ``W₁, W₂`` start at N(0, 0.01²) and their Frobenius norms are capped at
  ``cell_max_norm`` (0.5), which keeps ``f`` a contraction through training (without the cap,
  Adam at usual learning rates makes the cell expansive within tens of steps); ``z₀ = 0``. The
  DEQ paper's cell normalises ``W₁z`` and adds ``z`` before its last norm; both make the map
  expansive here, so they are left out (see :class:`EquilibriumCell`).
* **P₁** works on the normalised image at stride ``p1_stride``: injection ``u`` = 3×3 conv
  (``in_chans → p1_width``, stride ``p1_stride``); the prompt is read out by a 1×1 conv to
  ``in_chans·stride²`` channels and a pixel shuffle, so it has full resolution while the
  equilibrium is solved on a ``stride²``-times smaller map.
* **P₂** reads the backbone's pooled pre-logits features ``F(x̃)`` (one backbone pass; the paper's
  Eq. 2 writes ``P₂(zᵢ)`` with ``zᵢ = F(xᵢ)``, which would need a second pass): injection
  ``Linear(d → p2_width)``, the same cell on vectors, and "MLP" = ``Linear(p2_width → d)``.
* **Initialisation.** Both read-outs (P₁'s 1×1 conv, P₂'s projection) start at zero. With
  ``identity_prompt=True`` (default) each prompt block is residual like the ResNet layer it is
  built from, ``P₁(x) = x + R₁(x)`` and ``MLP(P₂(F)) = F + R₂(F)``, so the blends are
  ``x + β₁R₁(x)`` and ``F + β₂R₂(F)``: at step 0 the model *is* the frozen backbone for any gate
  value, and the gates start neutral (``gate_init = β = 0.5``, i.e. ``g_α = g_β = 0``). With
  ``identity_prompt=False`` the blends are the literal ``α·x + β·R(x)``; then pick a small
  ``gate_init`` (e.g. 0.01) to start close to the backbone.
* **Solver.** Anderson acceleration (memory ``anderson_m``) or plain iteration (``solver``),
  tolerance ``tol`` on the per-sample relative residual, caps ``max_iter`` (training) and
  ``eval_max_iter``; gradients by implicit differentiation (adjoint solved to ``backward_tol``
  within ``backward_max_iter``) or the phantom gradient (``backward="phantom"``). The solver
  loop (``solver_loop="auto"``) stops early in eager and runs masked, without host syncs, while
  ``torch.compile``/``torch.export`` traces, so the default model compiles whole. See
  :mod:`timm_peft.deq`.
* **Robust training.** τ is the *fraction* of elements that are non-crucial (the paper writes a
  threshold on ``|g·θ|`` but sweeps τ in 0.2-0.8 like a ratio). Elements are ranked within each
  tensor by default (``robust_scope="tensor"``): ranked over all tensors at once, whole tensors
  whose gradients are small in absolute terms (everything behind a zero-initialised read-out, at
  first) would be non-crucial at every step and only ever shrink. The shrink step is the group's
  learning rate (``robust_shrink`` scales it) and never crosses zero; the wrapped optimiser keeps
  its state for every element (see :class:`RobustOptimizer`). The rule covers LION's own
  tensors, not the classifier (``robust_targets="prompts"``): the paper prunes "the parameters
  in these two layers" (its P₁ and P₂), LION-R and every other method train the head plainly,
  and with the head under the rule 40% of its elements are held back each step, which put
  LION below LION-R on the transfer benchmark (``robust_targets="all"`` keeps that reading).
  The training loop picks the wrapper up through :meth:`Lion.training_hooks`
  (``"optimizer_wrapper"``).
* **Where it acts.** A class swap (:mod:`timm_peft.layers.swap`) of the model's own timm class
  overrides ``forward_features`` (P₁ first), and every classifier module the model's family names
  (:meth:`timm_peft.families.Family.classifiers`: ``get_classifier``'s, plus e.g. VOLO's
  auxiliary token head) is swapped to read the blend with P₂ (:class:`LionClassifier`), so the
  model's own ``forward_head`` pools and combines its heads as in timm: both heads of a distilled
  model (DeiT, LeViT, EfficientFormer) read blended features, each CrossViT branch reads the
  blend with the P₂ of its width (one P₂ per classifier input width), and a token head gets P₂
  on every token. ``model(x)``, ``forward_features`` and ``forward_head(pre_logits=True)`` (which
  returns ``z̃``) all include LION; ``forward_intermediates`` (hence ``features_only``) runs the
  backbone on the prompted image ``x̃``. A model that does not pool (``global_pool=''``, or a
  ``features_only`` backbone) is refused at build time unless P₂ is off (``lion_no_p2``). The
  subclasses keep ``isinstance`` and every base state-dict key; LION's modules live under
  ``model.lion``; ``unload`` restores the plain classes. P₁'s image channels come from the
  model's family (``pretrained_cfg['first_conv']``).

Ablations of the paper's Table 4 are presets: ``lion_no_p1`` (LION-P1), ``lion_no_p2``
(LION-P2) and ``lion_no_robust`` (LION-R).

Example:
    >>> import timm, timm_peft, torch
    >>> m = timm.create_model("resnet18.lion", num_classes=10)
    >>> m(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
from .config import LionConfig
from .layers import (BlendGate, EquilibriumCell, ImplicitFeaturePrompt, ImplicitImagePrompt,
                     LionPrompts)
from .method import Lion, LionClassifier, LionForward, lion_class
from .robust import RobustOptimizer

__all__ = ["LionConfig", "Lion", "LionPrompts", "EquilibriumCell", "ImplicitImagePrompt",
           "ImplicitFeaturePrompt", "BlendGate", "RobustOptimizer", "lion_class", "LionForward",
           "LionClassifier"]
