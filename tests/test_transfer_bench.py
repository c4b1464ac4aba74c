"""The transfer benchmark's pieces (benchmarks/transfer.py) on tiny settings: its numbers are
only as good as the learning-rate choice, the summary and the claim verdicts."""
import json
import statistics

import pytest
import timm
import torch
from safetensors.torch import load_file

from benchmarks import transfer as tb

TINY = tb.Backbone("tiny", "vit_tiny_r_s16_p8_224",
                   dict(img_size=32, patch_size=2, embed_dim=32, depth=1, num_heads=2,
                        global_pool="avg", class_token=False),
                   dict(train_size=64, epochs=1, lr=1e-3, batch_size=32))


def test_select_lr_uses_validation_never_test():
    runs = [dict(lr=1e-3, val_acc=0.6, val_loss=1.0, test_acc=0.9),
            dict(lr=3e-3, val_acc=0.7, val_loss=1.2, test_acc=0.1),
            dict(lr=1e-2, val_acc=0.7, val_loss=0.8, test_acc=0.2)]
    assert tb.select_lr(runs) == 1e-2  # best val accuracy, then lowest val loss
    assert tb.select_lr(runs[:2]) == 3e-3


def test_lr_grid_follows_the_method_not_the_preset_name():
    assert tb.lr_grid("lion_no_robust") == tb.lr_grid("lion") == tb.LR_GRID
    assert tb.lr_grid("full") == tb.LR_GRID_BACKBONE
    assert min(tb.LR_GRID_BACKBONE) < min(tb.LR_GRID)


def test_verdict_is_a_paired_test_over_seeds():
    beats = tb.Claim("P", "a beats b", "a", "b")
    # a wins by 10 on every seed although the seeds' levels differ by 30: paired, so confirmed
    assert tb.verdict(beats, {0: 50.0, 1: 80.0}, {0: 40.0, 1: 70.0})["verdict"] == "confirmed"
    assert tb.verdict(beats, {0: 40.0, 1: 70.0}, {0: 50.0, 1: 80.0})["verdict"] == "contradicted"
    # a mean gain of 1.5 with a spread of 7 is noise
    v = tb.verdict(beats, {0: 55.0, 1: 48.0, 2: 52.0}, {0: 50.0, 1: 50.0, 2: 50.5})
    assert v["verdict"] == "not resolved"
    assert v["diff"] == pytest.approx(statistics.fmean([5.0, -2.0, 1.5]))
    assert v["std"] == pytest.approx(statistics.stdev([5.0, -2.0, 1.5]))
    # a steady gain below the margin is no win
    assert tb.verdict(beats, {0: 50.5, 1: 60.5}, {0: 50.0, 1: 60.0})["verdict"] == "not resolved"
    # one seed: no spread, no verdict
    assert tb.verdict(beats, {0: 90.0}, {0: 10.0})["verdict"] == "not resolved"
    no_worse = tb.Claim("P", "a keeps b's accuracy", "a", "b", ">=")
    assert tb.verdict(no_worse, {0: 49.8, 1: 59.7}, {0: 50.0, 1: 60.0})["verdict"] == "confirmed"
    assert tb.verdict(no_worse, {0: 45.0, 1: 55.0}, {0: 50.0, 1: 60.0})["verdict"] == "contradicted"


def _run(group, seed, lr, acc, val=0.5, task="count"):
    return dict(group=group, backbone="b", method=group.split("/")[1], task=task, seed=seed,
                lr=lr, val_acc=val, val_loss=1.0, test_acc=acc, trainable=10, adapter_bytes=40,
                cpu_seconds=1.0)


def test_summary_reports_only_the_chosen_rate():
    runs = [_run("b/m/count", 0, 1e-3, 0.9), _run("b/m/count", 0, 1e-2, 0.5),
            _run("b/m/count", 1, 1e-2, 0.7), _run("b/m/texture", 0, 1e-3, 0.2),
            _run("b/m/texture", 1, 1e-3, 0.4, task="texture")]
    runs[3]["task"] = "texture"
    chosen = {"b/m/count": 1e-2, "b/m/texture": 1e-3}
    (row,) = tb.summarize(tb.reported_runs(runs, chosen), chosen)
    assert row["tasks"]["count"][0] == pytest.approx(60.0)  # 0.5 and 0.7, not the 0.9 run
    assert row["tasks"]["count"][1] == pytest.approx(statistics.stdev([50.0, 70.0]))
    assert row["seed_means"] == pytest.approx({0: 35.0, 1: 55.0})
    assert row["mean"][0] == pytest.approx(45.0)
    assert row["lrs"] == {"count": 1e-2, "texture": 1e-3}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A cache directory holding TINY's pre-trained weights (trained once for this module)."""
    cache = tmp_path_factory.mktemp("cache")
    tb.pretrained_weights(TINY, cache, progress=False)
    return cache


def test_pretrained_weights_are_cached_and_load_through_timm(tiny_cache, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("cached weights were trained again")
    monkeypatch.setattr(tb, "train", no_training)
    path, info = tb.pretrained_weights(TINY, tiny_cache, progress=False)
    assert info["arch"] == TINY.arch and info["epochs"] == TINY.pretrain["epochs"]
    assert 0.0 <= info["test_acc"] <= 1.0 and info["cpu_seconds"] > 0
    # another recipe is another file
    other = tb.Backbone(TINY.name, TINY.arch, TINY.model_kwargs, dict(TINY.pretrain, epochs=2))
    with pytest.raises(AssertionError, match="trained again"):
        tb.pretrained_weights(other, tiny_cache, progress=False)
    # the file is what timm's own pretrained path loads
    model = timm.create_model(TINY.arch, pretrained=True, num_classes=0, **TINY.model_kwargs,
                              pretrained_cfg_overlay=dict(file=str(path), custom_load=False))
    saved = load_file(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_main_end_to_end_on_tiny_settings(tmp_path, monkeypatch, tiny_cache):
    monkeypatch.setitem(tb.BACKBONES, "tiny", TINY)
    monkeypatch.setattr(tb, "CLAIMS", (tb.Claim("P", "bias beats linear", "bias", "linear"),))
    monkeypatch.setattr(tb, "LR_GRID", (1e-3, 1e-2))
    md = tb.main(["--backbones", "tiny", "--methods", "linear,bias", "--tasks", "count",
                  "--seeds", "0,1", "--epochs", "1", "--warmup-epochs", "0",
                  "--train-size", "40", "--test-size", "20",
                  "--jobs", "1", "--cache-dir", str(tiny_cache),
                  "--out-dir", str(tmp_path / "out"), "--note", "a note"])
    data = json.loads((tmp_path / "out" / "transfer.json").read_text())
    groups = {r["group"] for r in data["runs"]}
    assert groups == {"tiny/linear/count", "tiny/bias/count",
                      "tiny/linear (reference: random-init base)/count"}
    assert len(data["runs"]) == 3 * (2 + 1)  # each group: the grid with seed 0, then seed 1
    for g in groups:
        grid = [r for r in data["runs"] if r["group"] == g and r["stage"] == "select"]
        assert data["chosen"][g] == tb.select_lr(grid)
        (other,) = [r for r in data["runs"] if r["group"] == g and r["seed"] == 1]
        assert other["lr"] == data["chosen"][g]
    assert data["timing"]["cpu"] >= data["timing"]["runs_cpu"] > 0
    text = md.read_text()
    assert text.startswith("# Transfer") and "**a note**" in text and "bias beats linear" in text
    assert (tmp_path / "out" / "transfer.svg").read_text().startswith("<svg")
    # the report is rebuilt from the JSON alone
    (tmp_path / "out" / "transfer.md").unlink()
    assert tb.main(["--replot", "--out-dir", str(tmp_path / "out")]).read_text() == text
    # a run cut short reports only the tasks every method finished, and says so
    data["complete"] = False
    data["runs"] = [r for r in data["runs"] if not (r["group"] == "tiny/bias/count"
                                                    and r["seed"] == 1)]
    # ... and one group cut short inside its grid: no rate chosen yet
    data["runs"] = [r for r in data["runs"] if not (r["group"] == "tiny/linear/count"
                                                    and r["lr"] != data["runs"][0]["lr"])]
    del data["chosen"]["tiny/linear/count"]
    (tmp_path / "out" / "transfer.json").write_text(json.dumps(data))
    partial = tb.main(["--replot", "--out-dir", str(tmp_path / "out")]).read_text()
    assert "Partial run" in partial and "| bias |" not in partial and "| bias |" in text


def test_merge_adds_methods_to_saved_runs_without_rerunning_them(tmp_path, monkeypatch,
                                                                 tiny_cache):
    monkeypatch.setitem(tb.BACKBONES, "tiny", TINY)
    monkeypatch.setattr(tb, "CLAIMS", (tb.Claim("P", "bias beats linear", "bias", "linear"),))
    monkeypatch.setattr(tb, "LR_GRID", (1e-3, 1e-2))
    out = tmp_path / "out"
    common = ["--backbones", "tiny", "--tasks", "count", "--seeds", "0,1", "--epochs", "1",
              "--warmup-epochs", "0", "--train-size", "40", "--test-size", "20", "--jobs", "1",
              "--cache-dir", str(tiny_cache), "--out-dir", str(out)]
    tb.main(["--methods", "linear", *common])
    before = json.loads((out / "transfer.json").read_text())
    ran = []
    real = tb.run_one
    monkeypatch.setattr(tb, "run_one", lambda job: ran.append(job["group"]) or real(job))
    md = tb.main(["--merge", "--methods", "bias", *common])
    # the cheapest saved run once again (it must reproduce), then only the added method
    cheapest = min(before["runs"], key=lambda r: r["cpu_seconds"] if "reference" not in
                   r["method"] else float("inf"))
    assert ran[0] == cheapest["group"] and set(ran[1:]) == {"tiny/bias/count"}
    after = json.loads((out / "transfer.json").read_text())
    assert after["runs"][:len(before["runs"])] == before["runs"]  # the saved runs, untouched
    assert {r["group"] for r in after["runs"]} == {r["group"] for r in before["runs"]} | {
        "tiny/bias/count"}
    assert after["complete"] and after["planned"] == len(after["runs"]) == 9
    assert [m["command"] for m in after["merges"]] == [before["command"], after["merges"][1]["command"]]
    assert "--merge" in after["command"] and after["timing"]["wall"] > before["timing"]["wall"]
    text = md.read_text()
    assert "| bias |" in text and "| linear |" in text and "bias beats linear" in text
    # a saved run that does not reproduce (other weights or code): refused, nothing added
    (out / "transfer.json").write_text(json.dumps(dict(before, runs=[
        dict(r, test_acc=r["test_acc"] + 0.01) for r in before["runs"]])))
    with pytest.raises(SystemExit, match="the weights or the code differ"):
        tb.main(["--merge", "--methods", "bias", *common])
    assert "tiny/bias/count" not in {r["group"] for r in
                                     json.loads((out / "transfer.json").read_text())["runs"]}
    # other settings than the saved runs': refused before anything runs
    ran.clear()
    with pytest.raises(SystemExit, match="other settings: epochs=1"):
        tb.main(["--merge", "--methods", "ssf", *common[:-10], "--epochs", "2",
                 *common[-10:]])
    with pytest.raises(SystemExit, match="name them with --methods"):
        tb.main(["--merge", *common])
    assert ran == []
