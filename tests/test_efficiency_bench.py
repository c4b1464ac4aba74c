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
