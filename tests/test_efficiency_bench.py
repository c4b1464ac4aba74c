"""benchmarks/efficiency.py's handling of an entry that fails on the device it measures."""
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
    assert got == eff.saved_activation_bytes(entry, x, y, torch.device("cpu"), None)
