"""A save never loses a user's file: kills at every point of the swap (with and without
``renameat2``), other filesystems, OS errors, and directories that only look like ours.

Kills are real: the save runs in a forked child that SIGKILLs itself at the chosen point, so no
``finally`` of the library runs, as after ``kill -9`` or a power cut.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal

import pytest
import timm
import torch

import timm_peft
from timm_peft.io import WEIGHTS_NAME, AdapterError
from timm_peft.io import save_load

CNN = dict(channels=(8, 16, 16, 16), stem_width=8)


def _model(bias: float) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("resnet10t.bias", num_classes=3, **CNN)
    with torch.no_grad():
        m.fc.bias.fill_(bias)
    return m


def _bias_of(out) -> float:
    m = timm_peft.load_adapter(_model(0.0), out, check_base=False)
    return float(m.fc.bias[0].detach())


def _dot_entries(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _killed_save(model, out, at: str, monkeypatch) -> None:
    """Run ``save_pretrained(model, out)`` in a child that is SIGKILLed ``at`` a point."""
    real_rename, real_fsync = os.rename, os.fsync
    renames, fsyncs = [], []

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def rename(a, b):
        renames.append((a, b))
        if at == "between renames" and len(renames) == 1:
            real_rename(a, b)
            die()
        real_rename(a, b)
        if at == "after renames" and len(renames) == 2:
            die()

    def fsync(fd):
        fsyncs.append(fd)
        if at == "writing" and len(fsyncs) == 3:  # the journal, one file, then killed
            die()
        real_fsync(fd)

    def exchange(*args):
        real_exchange(*args)
        if at == "after swap":
            die()

    real_exchange = save_load._exchange
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, no library finally
        try:
            if at in ("between renames", "after renames"):
                monkeypatch.setattr(save_load, "_RENAMEAT2", None)  # the fallback
            monkeypatch.setattr(save_load.os, "rename", rename)
            monkeypatch.setattr(save_load.os, "fsync", fsync)
            monkeypatch.setattr(save_load, "_exchange", exchange)
            timm_peft.save_pretrained(model, out)
        finally:
            os._exit(3)  # not killed: the test fails below
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.parametrize("at,survivor", [
    ("writing", 1.0), ("between renames", 1.0), ("after renames", 2.0), ("after swap", 2.0)])
@pytest.mark.parametrize("next_op", ["load", "save"])
def test_a_save_killed_anywhere_is_recovered_by_the_next_load_or_save(
        tmp_path, monkeypatch, at, survivor, next_op):
    out = tmp_path / "adapter"
    timm_peft.save_pretrained(_model(1.0), out)
    mine = tmp_path / ".adapter.tmp-mine"  # the user's, named like a temporary
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _killed_save(_model(2.0), out, at, monkeypatch)
    if at == "between renames":  # the moment the fallback leaves no adapter at the path
        assert not out.exists()
        assert any(n.startswith(".adapter.old-") for n in _dot_entries(tmp_path))
    if next_op == "load":
        # the previous adapter comes back (or the new one, where it was complete and in place)
        assert _bias_of(out) == survivor
    else:
        # the next save first puts the previous adapter back; make it fail after that point to
        # see what it recovered
        def fail(*args):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(save_load, "_exchange", fail)
        with pytest.raises(AdapterError, match="No space left on device"):
            timm_peft.save_pretrained(_model(3.0), out)
        monkeypatch.undo()
        assert _bias_of(out) == survivor
        timm_peft.save_pretrained(_model(3.0), out)
        assert _bias_of(out) == 3.0
    assert _dot_entries(tmp_path) == [".adapter.tmp-mine"]  # nothing of ours is left
    assert (mine / "notes.txt").read_text() == "keep"


def test_the_fallback_swaps_and_cleans_up_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(save_load, "_RENAMEAT2", None)
    out = tmp_path / "adapter"
    timm_peft.save_pretrained(_model(1.0), out)
    (out / "training_args.json").write_text("{}")
    timm_peft.save_pretrained(_model(2.0), out)
    assert _bias_of(out) == 2.0 and (out / "training_args.json").read_text() == "{}"
    assert _dot_entries(tmp_path) == []


def _fake_renameat2(err: int):
    def fn(*args):
        ctypes.set_errno(err)
        return -1
    return fn


def test_a_cross_device_swap_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    timm_peft.save_pretrained(_model(1.0), out)
    monkeypatch.setattr(save_load, "_RENAMEAT2", _fake_renameat2(errno.EXDEV))
    with pytest.raises(AdapterError, match=f"cannot save the adapter to {out}: .*EXDEV.*another "
                                           "filesystem.*previous adapter there.*unchanged"):
        timm_peft.save_pretrained(_model(2.0), out)
    # the fallback's renames across devices too
    monkeypatch.setattr(save_load, "_RENAMEAT2", None)
    real_rename = os.rename

    def rename(a, b):
        if str(b) == str(out):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(a), str(b))
        real_rename(a, b)
    monkeypatch.setattr(save_load.os, "rename", rename)
    with pytest.raises(AdapterError, match="EXDEV.*another filesystem"):
        timm_peft.save_pretrained(_model(2.0), out)
    monkeypatch.undo()
    assert _bias_of(out) == 1.0 and _dot_entries(tmp_path) == []


def test_os_errors_during_a_save_name_the_path_and_change_nothing(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    timm_peft.save_pretrained(_model(1.0), out)
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(save_load.os, "fsync", fsync)
    with pytest.raises(AdapterError, match=f"cannot save the adapter to {out}: No space left on "
                                           "device \\(ENOSPC\\)"):
        timm_peft.save_pretrained(_model(2.0), out)
    monkeypatch.undo()
    assert _bias_of(out) == 1.0 and _dot_entries(tmp_path) == []
    # a name too long for the filesystem; one that fits, but not with a suffix, still saves
    with pytest.raises(AdapterError, match="ENAMETOOLONG.*shorter directory name"):
        timm_peft.save_pretrained(_model(2.0), tmp_path / ("a" * 300))
    long = timm_peft.save_pretrained(_model(2.0), tmp_path / ("b" * 250))
    assert _bias_of(long) == 2.0 and _dot_entries(tmp_path) == []


def test_a_journal_that_is_not_ours_is_left_alone(tmp_path):
    out = tmp_path / "adapter"
    timm_peft.save_pretrained(_model(1.0), out)
    journal = tmp_path / ".adapter.timm_peft-save"
    journal.write_text("my own notes")
    with pytest.raises(AdapterError, match="is not a journal timm_peft wrote.*move the file away"):
        timm_peft.save_pretrained(_model(2.0), out)
    assert journal.read_text() == "my own notes" and _bias_of(out) == 1.0
    journal.unlink()
    journal.write_bytes(b"")  # a save killed before it wrote its journal leaves it empty
    timm_peft.save_pretrained(_model(2.0), out)
    assert _bias_of(out) == 2.0 and _dot_entries(tmp_path) == []
