"""Pictures: the retrieval grid of a checkpoint and the Recall@K curves of runs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


visualize = load_script("visualize_retrieval")
plot_recall = load_script("plot_recall")
CODEPOINTS = [ord(c) for c in "ABCDEFGHJKLMNPQRSTUVWXYZ"]


def _rgb(hex_color):
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def test_retrieve_matches_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 6))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    gallery = rng.normal(size=(12, 6))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = [0, 7, 29]
    for leave_one_out, ref in ((True, emb), (False, gallery)):
        sims, ids = visualize.retrieve(torch.tensor(emb), torch.tensor(ref), queries, 4, leave_one_out)
        for row, q in enumerate(queries):
            scored = [(float(emb[q] @ ref[j]), j) for j in range(len(ref)) if not (leave_one_out and j == q)]
            best = sorted(scored, reverse=True)[:4]
            assert ids[row].tolist() == [j for _, j in best]
            assert sims[row].tolist() == pytest.approx([s for s, _ in best], abs=1e-12)
    with pytest.raises(ValueError, match="--topk must be between 1 and 29"):
        visualize.retrieve(torch.tensor(emb), torch.tensor(emb), queries, 30, leave_one_out=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A Glyphs subset and an untrained tiny model saved in the trainer's checkpoint layout."""
    from xbm.config import load_cfg
    from xbm.data.glyphs import bundled_fonts, generate_glyphs
    from xbm.checkpoint.io import save_checkpoint
    from xbm.modeling import build_model

    base = tmp_path_factory.mktemp("vis")
    fonts = [f for f in bundled_fonts() if f.startswith("DejaVu")][:6]
    generate_glyphs(base / "glyphs", min_fonts=4, fonts=fonts, codepoints=CODEPOINTS, progress=False)
    cfg = load_cfg("configs/glyphs_baseline.yaml", [
        "DATA.ROOT", str(base / "glyphs"), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(4, 8, 8, 8)", "MODEL.HEAD.DIM", "8", "DATA.BATCH_SIZE", "8",
    ])
    torch.manual_seed(0)
    path = base / "checkpoints" / "last.pth"
    save_checkpoint({"iteration": 5, "config": cfg.dump(), "model": build_model(cfg).state_dict()}, str(path))
    return path


def test_retrieval_grid_has_the_layout_size_and_colours(tiny_checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["--ckpt", str(tiny_checkpoint), "--query-ids", "0", "5", "--topk", "3", "--out", str(out)]
    assert visualize.main(argv) == 0
    with Image.open(out) as image:
        assert image.size == (4 * 160, 2 * 160)  # (1 query + 3 results) x 2 rows of 160 px cells
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert _rgb(visualize.QUERY_COLOR) in colours

    # Which results are hits, recomputed independently of the script's search.
    from xbm.data.datasets import build_dataset
    from xbm.data.transforms import build_transforms
    from xbm.checkpoint.config import config_of_checkpoint
    from xbm.evaluation.evaluator import compute_embeddings
    from xbm.modeling import build_model

    cfg = config_of_checkpoint(str(tiny_checkpoint))
    model = build_model(cfg)
    model.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["model"])
    emb, labels = compute_embeddings(model, build_dataset(cfg, "test", build_transforms(cfg, train=False)), "cpu")
    hits = []
    for q in (0, 5):
        sims = (emb @ emb[q]).tolist()
        ranked = sorted((j for j in range(len(sims)) if j != q), key=lambda j: -sims[j])[:3]
        hits += [int(labels[j]) == int(labels[q]) for j in ranked]
    assert (_rgb(visualize.HIT_COLOR) in colours) == any(hits)
    assert (_rgb(visualize.MISS_COLOR) in colours) == (not all(hits))


def test_random_queries_and_bad_arguments(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "random.png"
    assert visualize.main(["--ckpt", str(tiny_checkpoint), "--queries", "3", "--topk", "2", "--seed", "1",
                           "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == visualize.grid_pixel_size(3, 2) == (480, 480)
    assert visualize.choose_queries(50, 3, None, seed=1) == visualize.choose_queries(50, 3, None, seed=1)
    assert len(set(visualize.choose_queries(50, 40, None, seed=2))) == 40
    for argv, message in (
        (["--query-ids", "100000"], "outside the query split"),
        (["--task", "gallery"], "--task 'gallery' is not an evaluation task of glyphs"),
        (["--topk", "0"], "--topk must be between 1 and"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            visualize.main(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "bad.png"), *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def _write_metrics(folder, records):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_recall_curves_use_each_runs_last_evaluation(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_metrics(a, [
        {"iteration": 10, "split": "query", "R@1": 0.1, "R@10": 0.2, "R@20": 0.3, "num_queries": 5},
        {"iteration": 20, "split": "query", "R@1": 0.4, "R@10": 0.5, "R@20": 0.6, "num_queries": 5},
        {"iteration": 20, "split": "small", "R@1": 0.7, "R@5": 0.8, "num_queries": 5},
    ])
    _write_metrics(b, [{"iteration": 30, "split": "query", "R@1": 0.45, "R@10": 0.55, "R@20": 0.65}])
    curves = plot_recall.collect([str(a), str(b)], ["A", "B"])
    assert list(curves) == ["query", "small"]
    assert [(label, it) for label, _, it in curves["query"]] == [("A", 20), ("B", 30)]
    from xbm.utils.plotting import recall_curve

    assert recall_curve(curves["query"][0][1]) == ([1, 10, 20], [0.4, 0.5, 0.6])

    out = tmp_path / "curves.png"
    assert plot_recall.main(["--runs", str(a), str(b), "--labels", "A", "B", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == plot_recall.figure_pixel_size(2) == (1200, 450)
    printed = capsys.readouterr().out
    assert "40.00" in printed and "45.00" in printed and "10.00" not in printed

    one = tmp_path / "one.png"
    assert plot_recall.main(["--runs", str(a), "--task", "small", "--out", str(one)]) == 0
    with Image.open(one) as image:
        assert image.size == (600, 450)
    for argv, message in (
        (["--runs", str(a), str(tmp_path / "missing")], "metrics.jsonl does not exist"),
        (["--runs", str(a), "--task", "test"], "--task 'test' is not among"),
    ):
        with pytest.raises(SystemExit):
            plot_recall.main([*argv, "--out", str(tmp_path / "x.png")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_recall.main(["--runs", str(a), str(b), "--labels", "only-one", "--out", str(tmp_path / "x.png")])
    assert plot_recall.default_labels(["x/run", "y/run"]) == ["x/run", "y/run"]


def test_plot_scalars_reads_every_event_file_and_draws_each_tag(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    plot_scalars = load_script("plot_scalars")
    for name, scale in (("a", 1.0), ("b", 10.0)):
        for start in (0, 3):  # two event files, as a resumed run leaves them; the later one wins at step 3
            writer = SummaryWriter(str(tmp_path / name), filename_suffix=f".{start}")
            for step in range(start, start + 4):
                writer.add_scalar("grad/memory_over_inbatch", scale * (step + 1) + start, step)
            writer.close()
        # The first file's name now sorts last (as a writer counter of 9 against 10 does): the order
        # that counts is the order of writing.
        first = next((tmp_path / name).glob("events.out.tfevents.*.0"))
        first.rename(tmp_path / name / "events.out.tfevents.9999999999.sorts-last")
    assert plot_scalars.read_scalars(str(tmp_path / "a"))["grad/memory_over_inbatch"][3] == (3, 7.0)
    out = tmp_path / "ratio.png"
    code = plot_scalars.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--tags",
                              "grad/memory_over_inbatch", "--log-y", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.stat().st_size > 0
    assert "a                    iteration      6: 10" in printed and "b                    iteration      6: 73" in printed
    assert plot_scalars.main(["--runs", str(tmp_path / "a"), "--tags", "nope", "--out", str(out)]) == 2
    assert "no run has the tag(s) ['nope']" in capsys.readouterr().err
