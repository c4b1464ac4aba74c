"""The adapter state machine (timm_peft.adapters' table): every illegal transition is refused
before the model changes, and random sequences of operations keep the model consistent.

The reference for "consistent" is independent of the switching machinery: a deep copy of the
plain timm model given the active adapter's method(s) by ``apply_method``/``PeftMethod.apply``
and its tensors; inside ``disable_adapter`` the plain timm model itself.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import timm
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import timm_peft
from timm_peft.adapters import ALLOWED, AdapterStateError
from timm_peft.core import get_method

VIT_ARCH = "vit_tiny_patch16_224"
VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)

#: spec name -> (method, peft_cfg); the two "_nohead" ones compose with the others
SPECS = {
    "ssf": ("ssf", {}),
    "ssf_nohead": ("ssf", {"train_head": False}),
    "vpt": ("vpt", {"num_prompts": 2}),
    "vpt_nohead": ("vpt", {"num_prompts": 2, "train_head": False}),
    "bias": ("bias", {}),
}


def _plain(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(VIT_ARCH, num_classes=num_classes, **VIT).eval()


def _perturb_registry(model, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Give adapter ``name`` random values in place; a copy of its tensors."""
    g = torch.Generator().manual_seed(seed)
    state = timm_peft.get_adapters(model)[name].state
    with torch.no_grad():
        for t in state.values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return {k: t.detach().clone() for k, t in state.items()}


def _reference(plain, members: list[tuple[str, dict, int, dict[str, torch.Tensor]]]):
    """``plain`` with the members' methods applied in turn and given their tensors."""
    ref = copy.deepcopy(plain)
    heads = [n for _, cfg, n, _ in members if cfg.get("train_head", True)]
    n = heads[0] if heads else plain.num_classes
    if n != ref.num_classes:
        ref.reset_classifier(n)
    first, *rest = members
    timm_peft.apply_method(ref, first[0], first[1])
    for method, cfg, _, _ in rest:
        impl = get_method(method)
        impl.apply(ref, impl.config_cls.from_dict({**impl.config_cls().to_dict(), **cfg}))
    ref.eval()
    sd = ref.state_dict()
    with torch.no_grad():
        for *_, tensors in members:
            for k, t in tensors.items():
                sd[k].copy_(t)
    return ref


def _model():
    plain = _plain()
    model = timm_peft.apply_method(copy.deepcopy(plain), "ssf").eval()
    return plain, model


X = torch.randn(2, 3, 32, 32)


def _out(model):
    with torch.no_grad():
        return model(X)


# ----------------------------------------------------------------------------------------------
# the cases of issue 22, one by one
# ----------------------------------------------------------------------------------------------

def test_deleting_the_suspended_adapter_inside_disable_is_refused_and_changes_nothing():
    plain, model = _model()
    timm_peft.add_adapter(model, "b", method="bias")
    y = _out(model)
    with timm_peft.disable_adapter(model):
        with pytest.raises(AdapterStateError, match="delete_adapter is not allowed inside "
                                                    "disable_adapter.*'default' comes back"):
            timm_peft.delete_adapter(model, "default")
        with pytest.raises(AdapterStateError, match="not allowed inside disable_adapter"):
            timm_peft.delete_adapter(model, "b")  # not the suspended one: still no change
        assert torch.equal(_out(model), _out(plain))
    assert timm_peft.active_adapter(model) == "default"
    assert sorted(timm_peft.get_adapters(model)) == ["b", "default"]
    assert torch.equal(_out(model), y)
    timm_peft.set_adapter(model, "b")  # the model works on


def test_nested_disable_adapter_changes_nothing():
    plain, model = _model()
    y = _out(model)
    with timm_peft.disable_adapter(model):
        with timm_peft.disable_adapter(model):
            assert timm_peft.adapter_state(model) == "disabled"
            assert torch.equal(_out(model), _out(plain))
        assert timm_peft.adapter_state(model) == "disabled"  # the inner block restored nothing
        assert torch.equal(_out(model), _out(plain))
    assert timm_peft.adapter_state(model) == "active" and torch.equal(_out(model), y)


def _changes(model, tmp_path):
    """Every operation that changes the adapters (name -> call)."""
    saved = tmp_path / "saved"  # saved before the block
    return {
        "add_adapter": lambda: timm_peft.add_adapter(model, "c", method="bias"),
        "set_adapter": lambda: timm_peft.set_adapter(model, "b"),
        "set_adapter(list)": lambda: timm_peft.set_adapter(model, ["default"]),
        "using_adapter": lambda: timm_peft.using_adapter(model, "b").__enter__(),
        "delete_adapter": lambda: timm_peft.delete_adapter(model, "b"),
        "route": lambda: timm_peft.route(model, ["default", "b"]).__enter__(),
        "load_adapter": lambda: timm_peft.load_adapter(model, saved),
        "load_adapter(named)": lambda: timm_peft.load_adapter(model, saved, adapter_name="d"),
        "save_pretrained": lambda: timm_peft.save_pretrained(model, tmp_path / "new"),
        "merge_and_unload": lambda: timm_peft.merge_and_unload(model),
        "merge": lambda: timm_peft.merge(model),
        "unload": lambda: timm_peft.unload(model),
        "apply_method": lambda: timm_peft.apply_method(model, "bias"),
    }


def test_every_change_inside_disable_adapter_is_refused_before_it_happens(tmp_path):
    plain, model = _model()
    timm_peft.add_adapter(model, "b", method="ssf")
    _perturb_registry(model, "default", 1)
    y = _out(model)
    timm_peft.save_pretrained(model, tmp_path / "saved", adapter_name="default")
    with timm_peft.disable_adapter(model):
        for what, call in _changes(model, tmp_path).items():
            with pytest.raises(AdapterStateError, match="inside disable_adapter.*allowed there: "
                                                        "disable_adapter, reading"):
                call()
            assert torch.equal(_out(model), _out(plain)), what
            assert timm_peft.active_adapter(model) is None, what
    assert not (tmp_path / "new").exists()
    assert sorted(timm_peft.get_adapters(model)) == ["b", "default"]
    assert torch.equal(_out(model), y)


def test_every_change_inside_route_is_refused_before_it_happens(tmp_path):
    plain, model = _model()
    timm_peft.add_adapter(model, "b", method="ssf")
    _perturb_registry(model, "b", 2)
    y = _out(model)
    timm_peft.save_pretrained(model, tmp_path / "saved", adapter_name="default")
    with timm_peft.route(model, ["b", "default"]):
        routed = _out(model)
        changes = {**_changes(model, tmp_path),
                   "disable_adapter": lambda: timm_peft.disable_adapter(model).__enter__()}
        for what, call in changes.items():
            with pytest.raises(AdapterStateError, match="inside route"):
                call()
            assert torch.equal(_out(model), routed), what
    assert timm_peft.active_adapter(model) == "default" and torch.equal(_out(model), y)
    assert set(ALLOWED) == {"active", "disabled", "routed"} and set(changes) - {
        "set_adapter(list)", "load_adapter(named)"} <= ALLOWED["active"]
    with pytest.raises(ValueError, match="already carries PEFT method"):
        timm_peft.apply_method(model, "bias")  # active: a model takes one method, as before


def test_set_adapter_and_route_refuse_malformed_names_before_any_change():
    plain, model = _model()
    timm_peft.add_adapter(model, "b", method="bias", num_classes=4)
    y = _out(model)
    with pytest.raises(ValueError, match="empty list.*the model has \\['default', 'b'\\]"):
        timm_peft.set_adapter(model, [])
    timm_peft.add_adapter(model, "p", dict(num_prompts=2, train_head=False), method="vpt")
    timm_peft.set_adapter(model, dict.fromkeys(["default", "p"]).keys())  # ordered: composes
    assert timm_peft.active_adapter(model) == ("default", "p")
    timm_peft.set_adapter(model, ("default",))
    for bad in (None, 3, [None], {"default"}):
        with pytest.raises(TypeError, match="set_adapter takes an adapter name or a list"):
            timm_peft.set_adapter(model, bad)
    with pytest.raises(TypeError, match="the string 'default'.*\\['default'\\] \\* n"):
        with timm_peft.route(model, "default"):
            pass
    for bad in ([], None, [1, 2]):
        with pytest.raises(TypeError, match="non-empty list of adapter names"):
            with timm_peft.route(model, bad):
                pass
    assert timm_peft.active_adapter(model) == "default" and torch.equal(_out(model), y)


def test_a_failed_add_adapter_gives_the_active_adapter_back():
    model = timm.create_model("resnet10t.ssf", num_classes=3, channels=(8, 16, 16, 16),
                              stem_width=8).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    with pytest.raises(ValueError, match="'e2vpt' needs a token sequence"):
        timm_peft.add_adapter(model, "e", method="e2vpt")
    assert list(timm_peft.get_adapters(model)) == ["default"] and model.peft_method == "ssf"
    with torch.no_grad():
        assert torch.equal(model(x), y)
    with timm_peft.disable_adapter(model):
        pass
    with torch.no_grad():
        assert torch.equal(model(x), y)


# ----------------------------------------------------------------------------------------------
# random sequences of operations
# ----------------------------------------------------------------------------------------------

NAMES = ("default", "a", "b")
#: weighted towards adapters of one structure (switching only re-points tensors between them)
SPEC_CHOICES = ["ssf", "ssf", "ssf", "vpt", "vpt_nohead", "ssf_nohead", "bias"]


class AdapterMachine(RuleBasedStateMachine):
    """Shadow of the model: each adapter's spec and tensors, and which one is active."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        self.plain, self.model = _model()
        self.specs = {"default": ("ssf", {}, 3)}
        self.tensors = {"default": _perturb_registry(self.model, "default", 0)}
        self.active: str | tuple[str, ...] = "default"
        self.seed = itertools.count(1)

    def teardown(self) -> None:
        self.tmp.cleanup()

    # -- the reference -----------------------------------------------------------------------
    def members(self, names):
        return [(*self.specs[n], self.tensors[n]) for n in names]

    def expected(self) -> torch.Tensor:
        names = self.active if isinstance(self.active, tuple) else (self.active,)
        return _out(_reference(self.plain, self.members(names)))

    def unchanged(self, call, *errors) -> None:
        """``call`` must raise one of ``errors`` (AdapterError and friends are ValueErrors)."""
        with pytest.raises(errors):
            call()

    # -- operations ----------------------------------------------------------------------------
    @rule(name=st.sampled_from(NAMES), spec=st.sampled_from(SPEC_CHOICES),
          n=st.sampled_from([3, 3, 5]))
    def add(self, name, spec, n):
        method, cfg = SPECS[spec]
        n = n if cfg.get("train_head", True) else 3  # a head it does not train is the base's
        if name in self.specs:
            return self.unchanged(lambda: timm_peft.add_adapter(self.model, name, cfg,
                                                                 method=method, num_classes=n),
                                  ValueError)
        timm_peft.add_adapter(self.model, name, dict(cfg), method=method, num_classes=n)
        self.specs[name] = (method, cfg, n)
        self.tensors[name] = _perturb_registry(self.model, name, next(self.seed))

    @rule(name=st.sampled_from(NAMES))
    def set(self, name):
        if name not in self.specs:
            return self.unchanged(lambda: timm_peft.set_adapter(self.model, name), KeyError)
        timm_peft.set_adapter(self.model, name)
        self.active = name

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def compose(self, a, b):
        names = [a, b]
        try:
            timm_peft.set_adapter(self.model, names)
        except (KeyError, ValueError):
            return  # refused (unknown, repeated, or not composable): the invariant checks
        self.active = tuple(names)

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name):
        if name not in self.specs or len(self.specs) == 1:
            return self.unchanged(lambda: timm_peft.delete_adapter(self.model, name),
                                  KeyError, ValueError)
        timm_peft.delete_adapter(self.model, name)
        active = self.active if isinstance(self.active, tuple) else (self.active,)
        del self.specs[name], self.tensors[name]
        if name in active:
            self.active = next(iter(self.specs))

    @rule(inside=st.sampled_from(["delete", "add", "set", "route", "save", "nested"]))
    def disable(self, inside):
        plain = _out(self.plain)
        with timm_peft.disable_adapter(self.model):
            assert torch.equal(_out(self.model), plain)
            if inside == "nested":
                with timm_peft.disable_adapter(self.model):
                    assert torch.equal(_out(self.model), plain)
            else:
                call = {"delete": lambda: timm_peft.delete_adapter(self.model, "default"),
                        "add": lambda: timm_peft.add_adapter(self.model, "z"),
                        "set": lambda: timm_peft.set_adapter(self.model, "default"),
                        "route": lambda: timm_peft.route(self.model, ["default"]).__enter__(),
                        "save": lambda: timm_peft.save_pretrained(self.model, self.tmp.name)}
                self.unchanged(call[inside], AdapterStateError)
            assert torch.equal(_out(self.model), plain)

    @rule(names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3))
    def route(self, names):
        try:
            ctx = timm_peft.route(self.model, names)
            ctx.__enter__()
        except (KeyError, ValueError):
            return
        try:
            batch = torch.cat([X, X])[:len(names)]
            with torch.no_grad():
                routed = self.model(batch)
            for i, n in enumerate(names):  # each sample as if it ran alone with its adapter
                with torch.no_grad():
                    alone = _reference(self.plain, self.members([n]))(batch[i:i + 1])[0]
                torch.testing.assert_close(routed[i, :alone.shape[0]], alone,
                                           atol=2e-5, rtol=1e-4)
            self.unchanged(lambda: timm_peft.set_adapter(self.model, names[0]), AdapterStateError)
        finally:
            ctx.__exit__(None, None, None)

    @rule(name=st.sampled_from(NAMES), into=st.sampled_from(["new", "active"]))
    def save_and_load(self, name, into):
        if name not in self.specs:
            return
        d = f"{self.tmp.name}/{name}-{next(self.seed)}"
        timm_peft.save_pretrained(self.model, d, adapter_name=name)
        if into == "new":
            new = next((n for n in NAMES if n not in self.specs), None)
            if new is None:
                return
            timm_peft.load_adapter(self.model, d, adapter_name=new)
            self.specs[new], self.tensors[new] = self.specs[name], dict(self.tensors[name])
            return
        active = self.active
        same = not isinstance(active, tuple) and self.specs[active] == self.specs[name]
        if not same:
            return self.unchanged(lambda: timm_peft.load_adapter(self.model, d), ValueError)
        timm_peft.load_adapter(self.model, d)
        self.tensors[active] = dict(self.tensors[name])

    # -- the model stays consistent ------------------------------------------------------------
    @invariant()
    def consistent(self):
        m = self.model
        assert timm_peft.adapter_state(m) == "active"
        assert timm_peft.active_adapter(m) == self.active
        adapters = timm_peft.get_adapters(m)
        assert list(adapters) == list(self.specs)
        for name, tensors in self.tensors.items():
            state = adapters[name].state
            assert set(state) == set(tensors), name
            for k, t in tensors.items():
                assert torch.equal(state[k].detach(), t), (name, k)
        torch.testing.assert_close(_out(m), self.expected(), atol=2e-5, rtol=1e-4)


AdapterMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=8, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck))
test_random_operation_sequences_keep_the_model_consistent = AdapterMachine.TestCase
