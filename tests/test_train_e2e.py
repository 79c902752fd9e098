"""A real end-to-end run on a tiny Glyphs subset: every promised file appears and the loss falls."""
import json
import re

import pytest
import torch

from xbm.cli import eval_main, train_main


def _run_opts(root, out, *extra):
    return [
        "--cfg", "configs/glyphs_xbn.yaml",
        "OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4",
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32",
        "DATA.BATCH_SIZE", "8", "XBM.SIZE", "36", "XBM.START_ITERATION", "10",
        "SOLVER.MAX_ITERS", "40", "SOLVER.LOG_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "20",
        "SOLVER.BASE_LR", "0.001", "TEST.EVAL_PERIOD", "20", *extra,
    ]


@pytest.mark.slow
def test_training_writes_every_output_and_the_loss_falls(glyph_root, tmp_path, capsys):
    out = tmp_path / "run"
    opts = _run_opts(glyph_root, out, "DRIFT.ENABLE", "True", "DRIFT.INTERVAL", "10",
                     "DRIFT.NUM_SAMPLES", "32", "SOLVER.KEEP_CHECKPOINTS", "1")
    assert train_main(opts) == 0

    assert (out / "config.yaml").read_text().count("xbn") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [20, 40]
    for record in records:
        assert record["split"] == "test"
        for k in (1, 10, 100):
            assert 0.0 <= record[f"R@{k}"] <= 1.0
        assert record["R@1"] <= record["R@10"] <= record["R@100"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000040.pth", "last.pth"]
    drift = [json.loads(line) for line in (out / "drift.jsonl").read_text().splitlines()]
    assert [d["iteration"] for d in drift] == [10, 20, 30, 40]
    assert all(d["drift/mean_distance"] > 0 for d in drift)
    assert list(out.glob("events.out.tfevents.*"))
    log = (out / "log.txt").read_text()
    assert "cross-batch memory: 36 x 32 float32" in log

    # The total jumps when the memory term starts at iteration 10; the in-batch term is comparable throughout.
    assert len(re.findall(r"loss/total=", log)) == 40
    assert len(re.findall(r"loss/memory=", log)) == 30
    losses = [float(x) for x in re.findall(r"loss/inbatch=([0-9.eE+-]+)", log)]
    assert len(losses) == 40
    early, late = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert late < 0.8 * early, (early, late)

    state = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert state["iteration"] == 40
    assert state["layout"] == 2 and "memory.feats" in state["objective"]
    assert state["objective"]["_extra_state"]["adapter"] is not None
    assert "final retrieval metrics" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/glyphs_xbn.yaml", "tests/fixtures/tiny_vit_xbn.yaml"])
def test_eval_tool_reads_the_checkpoint(glyph_root, tmp_path, capsys, config):
    out = tmp_path / "run"
    opts = _run_opts(glyph_root, out, "SOLVER.MAX_ITERS", "5", "TEST.EVAL_PERIOD", "0")
    train_main([config if opt == "configs/glyphs_xbn.yaml" else opt for opt in opts])
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    report = tmp_path / "report"
    assert eval_main(["--ckpt", str(out / "checkpoints" / "*.pth"), "--out", str(report), "--export", "test"]) == 0
    rows = json.loads((report / "eval_metrics.json").read_text())
    assert len(rows) == 1 and rows[0]["iteration"] == 5
    assert rows[0]["R@1"] == pytest.approx(logged["R@1"])  # same weights, same numbers
    assert (report / "eval_metrics.csv").read_text().startswith("checkpoint,iteration,task,R@1")
    assert (report / "last_test_embeddings.npy").is_file()
    assert f"wrote {report}/last_test_embeddings.npy and {report}/last_test_labels.npy" in capsys.readouterr().err


def test_bad_input_stops_before_training(glyph_root, tmp_path, capsys):
    cases = [
        (["DATA.NAME", "imagenet"], "DATA.NAME 'imagenet' is not a known dataset"),
        (["DATA.NAME", "sop", "DATA.ROOT", str(tmp_path / "missing")], "DATA.ROOT .* does not exist"),
        (["XBM.SIZE", "4"], "XBM.SIZE \\(4\\) is smaller than DATA.BATCH_SIZE \\(8\\)"),
        (["DATA.BATCH_SIZE", "10"], "DATA.BATCH_SIZE \\(10\\) must be a multiple of DATA.NUM_INSTANCES \\(4\\)"),
        (["XBM.SIZEE", "4"], "unknown config key 'XBM.SIZEE'"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((["DATA.NAME", "cub200", "DATA.ROOT", str(tmp_path / "empty")], "DATA.ROOT .* is empty"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train_main(_run_opts(glyph_root, tmp_path / "bad", *extra))
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "bad" / "checkpoints").exists()
