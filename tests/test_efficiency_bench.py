"""benchmarks/efficiency.py: failing entries, the saved-bytes count, how entries are built."""
import gc
import weakref

import pytest

from benchmarks import efficiency as eff


def test_a_failing_entry_is_left_out_with_its_error_and_the_references_must_run():
    def ok():
        pass

    def bad():
        raise RuntimeError("boom\nsecond line")

    entries = {"ssf": object(), "bias": object(), "full": object(), eff.LIMIT: object()}
    train = {"ssf": bad, "bias": ok, "full": ok, eff.LIMIT: ok}
    infer = {"plain": ok, "ssf": ok, "ssf (merged)": ok, "bias": ok, "full": ok, eff.LIMIT: ok}
    skipped = []
    eff._drop_failing("vit", "eager", entries, train, infer, skipped)
    assert set(entries) == set(train) == {"bias", "full", eff.LIMIT}
    assert set(infer) == {"plain", "bias", "full", eff.LIMIT}
    assert skipped == ["vit.ssf [eager] FAILED: RuntimeError: boom"]
    infer["bias"] = bad  # an inference failure drops the entry too
    eff._drop_failing("vit", "eager", entries, train, infer, skipped)
    assert "bias" not in entries and len(skipped) == 2
    train["full"] = bad  # a reference that fails stops the run
    with pytest.raises(RuntimeError, match="boom"):
        eff._drop_failing("vit", "eager", entries, train, infer, skipped)


def test_an_entry_slower_than_the_compile_timeout_is_left_out():
    """Compiled mode caps each entry's first calls (where it compiles), so a run cannot hang on
    one model; the others are measured."""
    import time

    def ok():
        pass

    def slow():
        time.sleep(5)  # interrupted at the deadline, not slept out

    entries = {"lion": object(), "bias": object(), "full": object(), eff.LIMIT: object()}
    train = {"lion": slow, "bias": ok, "full": ok, eff.LIMIT: ok}
    infer = {"plain": ok, "lion": ok, "bias": ok, "full": ok, eff.LIMIT: ok}
    skipped = []
    t0 = time.perf_counter()
    eff._drop_failing("vit", "compiled", entries, train, infer, skipped, timeout=0.3)
    assert time.perf_counter() - t0 < 3
    assert set(entries) == {"bias", "full", eff.LIMIT}
    assert skipped == ["vit.lion [compiled] FAILED: TimeoutError: vit.lion: the first calls took "
                       "more than 0.3 s (--compile-timeout)"]
    time.sleep(0.5)  # the alarm is disarmed once the block ends


def test_arch_sets_cover_the_report_families():
    assert eff.expand_archs("vit_small_patch16_224,report")[:2] == list(eff.ARCH_SETS["default"])
    assert set(eff.ARCH_SETS["families"]) <= set(eff.expand_archs("report"))
    assert len(eff.expand_archs("report")) == len(set(eff.expand_archs("report"))) == 7


def test_the_compile_budget_runs_the_references_first_and_leaves_out_the_rest():
    import time

    def ok():
        pass

    def slow():
        time.sleep(0.4)

    entries = {"ssf": object(), "vpt": object(), "full": object(), eff.LIMIT: object()}
    train = {"ssf": slow, "vpt": ok, "full": slow, eff.LIMIT: ok}
    infer = {"plain": ok, "ssf": ok, "vpt": ok, "full": ok, eff.LIMIT: ok}
    skipped = []
    eff._drop_failing("vit", "compiled", entries, train, infer, skipped, timeout=10, budget=0.3)
    # full (0.4 s, not counted) and the limit ran first; ssf hit the budget, vpt was not tried
    assert set(entries) == {"full", eff.LIMIT}
    assert skipped[0].startswith("vit.ssf [compiled] FAILED: TimeoutError")
    assert skipped[1] == ("vit.vpt [compiled] FAILED: TimeoutError: not tried: the "
                          "--compile-budget of 0.3 s is spent")
def test_saved_activation_bytes_counts_distinct_activation_storages():
    """``--saved-bytes``: deterministic, parameters and the input left out, a storage saved by
    two operations counted once; against a hand count on a two-layer model."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    model[2].weight.requires_grad_(True)  # the head: its matmul saves the GELU output
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    entry = eff.Entry(model, "reference", input_grad=True)
    got = eff.saved_activation_bytes(entry, x, y, torch.device("cpu"), None)
    # GELU's input (4, 8) and output (4, 8), cross-entropy's log-softmax (4, 3) and the total
    # weight of its mean (a float32 scalar); the labels are left out like the input
    assert got == 4 * (4 * 8 + 4 * 8 + 4 * 3) + 4

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    before = live_tensors()
    assert got == eff.saved_activation_bytes(entry, x, y, torch.device("cpu"), None)
    assert live_tensors() == before  # what it saved goes with the graph (no cycle keeps it)


def test_a_peft_lora_peer_whose_layers_never_run_is_left_out():
    """timm's BEiT attention calls F.linear on qkv.weight itself, so peft's LoRA on qkv would be
    the plain model under another name: left out, saying why; on ViT the peer is built."""
    pytest.importorskip("peft")
    from benchmarks.efficiency import build_lora
    tiny = dict(depth=1, embed_dim=32, num_heads=2)
    skipped = []
    assert build_lora("beit_base_patch16_224", tiny, ["qkv"], skipped) is None
    assert "never run" in skipped[0] and "blocks.0.attn.qkv" in skipped[0]
    skipped = []
    assert build_lora("vit_small_patch16_224", tiny, ["qkv"], skipped) is not None
    assert skipped == []


def test_entries_are_built_one_at_a_time():
    """--saved-bytes measures every method of an arch one after the other: each entry is built
    when asked for and is gone once the caller drops it (BEiT-B's all at once: about 8 GB)."""
    tiny = dict(depth=1, embed_dim=32, num_heads=2)
    refs, names = [], []
    methods = ["bias", "linear", "ssf", "mlp", "mlp3"]  # mlp3 is mlp; linear shares bias' config
    for name, entry in eff.iter_entries("vit_small_patch16_224", methods, tiny, [],
                                        with_merged=False):
        assert [r() for r in refs] == [None] * len(refs), name
        assert entry.merged is None
        refs.append(weakref.ref(entry.model))
        names.append(name)
        del entry
    assert names[:5] == ["bias", "linear", "ssf", "mlp", "full"] and eff.LIMIT in names
