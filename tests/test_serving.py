"""xbm-index, xbm-search and xbm-export on a tiny convnet and the Glyphs test split: results
against a brute-force numpy search of the evaluator's own embeddings, the exported models
against PyTorch, every refusal in one sentence, and the old index surviving a kill mid-write."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from xbm.serving import cli
from xbm.serving.images import describe_transform, preprocess
from xbm.serving.index import FORMAT_VERSION, MANIFEST, default_nlist, factory_string, load_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(glyph_root, dim):
    from xbm.config import load_cfg

    return load_cfg("configs/glyphs_baseline.yaml", [
        "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(4, 8, 8, 8)", "MODEL.HEAD.DIM", str(dim), "TEST.BATCH_SIZE", "64",
    ])


@pytest.fixture(scope="module")
def tiny(glyph_root, tmp_path_factory):
    """Three untrained tiny checkpoints (8-d twice with different weights, 16-d) in the trainer's layout,
    and the evaluator's embeddings of the test split by the first one (the reference)."""
    from xbm.data.datasets import build_dataset
    from xbm.data.transforms import build_transforms
    from xbm.checkpoint.io import save_checkpoint
    from xbm.evaluation.evaluator import compute_embeddings
    from xbm.modeling import build_model

    base = tmp_path_factory.mktemp("serving")
    paths, models = {}, {}
    for name, dim, seed in (("a", 8, 0), ("b", 8, 1), ("wide", 16, 2)):
        cfg = _cfg(glyph_root, dim)
        torch.manual_seed(seed)
        models[name] = build_model(cfg).eval()
        paths[name] = str(base / f"{name}.pth")
        save_checkpoint({"iteration": 7, "config": cfg.dump(), "model": models[name].state_dict()}, paths[name])
    cfg = _cfg(glyph_root, 8)
    test = build_dataset(cfg, "test", build_transforms(cfg, train=False))
    reference, labels = compute_embeddings(models["a"], test, "cpu", 64)
    files = [os.path.abspath(str(test.full_path(i))) for i in range(len(test))]
    return SimpleNamespace(base=base, ckpt=paths, model=models["a"], cfg=cfg, reference=reference.numpy(),
                           labels=labels.numpy(), files=files)


def _run(main, argv, capsys):
    """(exit status, stdout, stderr) of one of the command lines."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def _one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _brute_force(reference, query_rows, k):
    """Top-k rows of `reference` for each query row, by a plain Python ranking of inner products."""
    ranked = []
    for q in query_rows:
        scores = [(float(np.dot(reference[q].astype(np.float64), reference[j].astype(np.float64))), j)
                  for j in range(len(reference))]
        ranked.append(sorted(scores, key=lambda sj: -sj[0])[:k])
    return ranked


def test_transform_replay_equals_the_torchvision_transform():
    from xbm.config import load_cfg
    from xbm.data.transforms import build_transforms

    rng = np.random.default_rng(0)
    cases = [("configs/glyphs_baseline.yaml", [], [(32, 32)]),
             ("configs/glyphs_baseline.yaml", ["INPUT.IMAGE_SIZE", "40"], [(32, 32)]),
             ("configs/sop_baseline.yaml", ["INPUT.RESIZE", "45", "INPUT.IMAGE_SIZE", "32"],
              [(61, 47), (47, 90), (45, 45), (32, 300)]),
             ("configs/sop_bninception_baseline.yaml", ["INPUT.RESIZE", "45", "INPUT.IMAGE_SIZE", "32"],
              [(61, 47), (90, 33)])]
    for config, opts, sizes in cases:
        cfg = load_cfg(config, opts, check=False)
        transform = build_transforms(cfg, train=False)
        steps = describe_transform(transform)
        for width, height in sizes:
            mode_shape = (height, width) if cfg.DATA.NAME == "glyphs" else (height, width, 3)
            image = Image.fromarray(rng.integers(0, 256, mode_shape, dtype=np.uint8))
            expected = transform(image).numpy()
            assert np.array_equal(preprocess(image, steps), expected), (config, width, height)
    bgr = describe_transform(build_transforms(load_cfg("configs/sop_bninception_baseline.yaml", check=False), False))
    assert bgr[-1]["channel_order"] == "BGR" and bgr[-1]["max_value"] == 255.0


def test_index_of_a_split_holds_the_evaluators_embeddings_and_search_ranks_like_brute_force(tiny, tmp_path, capsys):
    out = tmp_path / "idx"
    status, stdout, _ = _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out,
                                              "--no-progress"], capsys)
    assert status == 0 and f"indexed {len(tiny.files)} images" in stdout
    gallery = load_index(str(out))
    stored = gallery.index.reconstruct_n(0, len(gallery))
    assert np.abs(stored - tiny.reference).max() <= 1e-6
    assert gallery.paths == tiny.files and gallery.labels == tiny.labels.tolist()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["version"] == FORMAT_VERSION and manifest["dim"] == 8
    assert manifest["model"]["sha256"] == __import__("hashlib").sha256(open(tiny.ckpt["a"], "rb").read()).hexdigest()
    assert manifest["transform"]["steps"][-1]["mean"] == [0.5, 0.5, 0.5]

    queries = [3, 17]
    folder = tmp_path / "queries"
    folder.mkdir()
    for q in queries:  # the query files are copies: found by content, not by path
        shutil.copy(tiny.files[q], folder / f"q{q:03d}.png")
    status, stdout, _ = _run(cli.search_main, ["--index", out, "--query", folder, "--topk", 4,
                                               "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png"], capsys)
    assert status == 0
    document = json.loads((tmp_path / "r.json").read_text())
    for result, expected in zip(document["results"], _brute_force(tiny.reference, queries, 4)):
        assert [m["path"] for m in result["matches"]] == [tiny.files[j] for _, j in expected]
        assert [m["score"] for m in result["matches"]] == pytest.approx([s for s, _ in expected], abs=1e-5)
        assert [m["rank"] for m in result["matches"]] == [1, 2, 3, 4]
    assert stdout.count("query ") == 2 and tiny.files[queries[0]] in stdout
    with Image.open(tmp_path / "r.png") as picture:
        assert picture.size == (5 * 160, 2 * 160)


def test_add_embeds_only_the_new_images_and_keeps_the_old_vectors(tiny, tmp_path, capsys, monkeypatch):
    from xbm.serving import gallery as gallery_module
    from xbm.serving.models import load_embedder

    folder = tmp_path / "catalogue"
    folder.mkdir()
    for i, path in enumerate(tiny.files[:12]):
        shutil.copy(path, folder / f"{i:02d}.png")
    out = tmp_path / "idx"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--images", folder, "--out", out, "--no-progress"],
                capsys)[0] == 0
    before = load_index(str(out))
    old_vectors = before.index.reconstruct_n(0, len(before))

    embedded = []
    real = gallery_module.embed_images_of

    def counting(embedder, source, positions, *args):
        embedded.extend(source.paths[p] for p in positions)
        return real(embedder, source, positions, *args)

    monkeypatch.setattr(gallery_module, "embed_images_of", counting)
    for i, path in enumerate(tiny.files[12:20], start=12):  # the catalogue grows by 8 images
        shutil.copy(path, folder / f"{i:02d}.png")
    embedder = load_embedder(ckpt=tiny.ckpt["a"], device="cpu")
    summary = gallery_module.build_index(embedder, gallery_module.images_source(str(folder)), str(out), add=True,
                                         progress=False)
    assert "added 8 images (20 in all" in summary
    assert sorted(os.path.basename(p) for p in embedded) == [f"{i:02d}.png" for i in range(12, 20)]
    after = load_index(str(out))
    assert np.array_equal(after.index.reconstruct_n(0, 12), old_vectors)
    assert after.paths[:12] == before.paths and len(after.paths) == 20
    # Every vector is the model's embedding of its file, old and new.
    order = [int(os.path.basename(p)[:2]) for p in after.paths]
    assert np.abs(after.index.reconstruct_n(0, 20) - tiny.reference[order]).max() <= 1e-6
    assert sorted(os.listdir(out)) == sorted([MANIFEST, json.loads((out / MANIFEST).read_text())["index"]["file"]])


def test_approximate_index_types_are_built_from_factory_strings(tiny, tmp_path, capsys):
    assert factory_string("ivf-flat", 1_000_000, 128) == "IVF4096,Flat"
    assert factory_string("ivf-pq", 100_000, 512) == "IVF1024,PQ128"
    assert factory_string("HNSW16", 10, 8) == "HNSW16" and default_nlist(100) == 2
    out = tmp_path / "hnsw"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out, "--index-type",
                                 "hnsw", "--no-progress"], capsys)[0] == 0
    gallery = load_index(str(out))
    assert gallery.factory == "HNSW32" and gallery.search_params == "efSearch=256"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out, "--index-type",
                                 "IVF2,Flat", "--overwrite", "--no-progress"], capsys)[0] == 0
    replaced = load_index(str(out))
    assert replaced.factory == "IVF2,Flat" and replaced.search_params == "nprobe=1" and len(os.listdir(out)) == 2
    assert np.array_equal(replaced.search(tiny.reference[:5], 1)[1][:, 0], np.arange(5))
    scores, ids = gallery.search(tiny.reference[:5], 3)
    exact = _brute_force(tiny.reference, range(5), 3)
    assert [row[0] for row in ids.tolist()] == [e[0][1] for e in exact]  # the query itself comes first
    status, _, err = _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", tmp_path / "ivf",
                                           "--index-type", "IVF4096,Flat", "--no-progress"], capsys)
    assert status == 2 and "cannot be trained on" in _one_sentence(err) and not (tmp_path / "ivf").exists()
    status, _, err = _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", tmp_path / "bad",
                                           "--index-type", "Bogus7", "--no-progress"], capsys)
    assert status == 2 and "'Bogus7' is neither" in _one_sentence(err)


def test_searching_with_another_model_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "idx"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out, "--no-progress"],
                capsys)[0] == 0
    query = tiny.files[0]
    status, _, err = _run(cli.search_main, ["--index", out, "--query", query, "--ckpt", tiny.ckpt["wide"],
                                            "--json", tmp_path / "r.json"], capsys)
    assert status == 2 and "embeds into 16 dimensions" in _one_sentence(err) and "8-dimensional" in err
    status, _, err = _run(cli.search_main, ["--index", out, "--query", query, "--ckpt", tiny.ckpt["b"]], capsys)
    assert status == 2 and "was built by the model of checkpoint sha256" in _one_sentence(err)
    status, _, err = _run(cli.index_main, ["--ckpt", tiny.ckpt["b"], "--images", os.path.dirname(query),
                                           "--out", out, "--add"], capsys)
    assert status == 2 and "was built by the model of checkpoint sha256" in _one_sentence(err)
    assert not (tmp_path / "r.json").exists()


def test_bad_input_ends_in_one_sentence_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "idx"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out, "--no-progress"],
                capsys)[0] == 0
    manifest = (out / MANIFEST).read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    old = tmp_path / "old_version"
    shutil.copytree(out, old)
    stale = json.loads((old / MANIFEST).read_text())
    stale["version"] = FORMAT_VERSION + 1
    (old / MANIFEST).write_text(json.dumps(stale))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    gallery_with_bad = tmp_path / "gallery"
    gallery_with_bad.mkdir()
    shutil.copy(tiny.files[0], gallery_with_bad / "good.png")
    shutil.copy(broken, gallery_with_bad / "bad.png")

    cases = [
        (cli.search_main, ["--index", out, "--query", broken, "--json", tmp_path / "r.json"],
         f"cannot decode image {broken}"),
        (cli.search_main, ["--index", out, "--query", empty], f"folder {empty} holds no images"),
        (cli.index_main, ["--ckpt", tiny.ckpt["a"], "--images", empty, "--out", tmp_path / "new"],
         f"folder {empty} holds no images"),
        (cli.search_main, ["--index", old, "--query", tiny.files[0]],
         f"written in index format version {FORMAT_VERSION + 1}"),
        (cli.search_main, ["--index", tmp_path / "nowhere", "--query", tiny.files[0]], "does not exist"),
        (cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", foreign], "is not an xbm index"),
        (cli.index_main, ["--ckpt", tiny.ckpt["a"], "--images", gallery_with_bad, "--out", out, "--add",
                          "--no-progress"],
         "cannot decode image"),
        (cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out], "already holds an index"),
        (cli.index_main, ["--ckpt", broken, "--split", "test", "--out", tmp_path / "new"],
         f"{broken} is not a readable checkpoint: it is not a file written by torch.save"),
        (cli.search_main, ["--index", out, "--query", tiny.files[0], "--topk", "0"], "--topk must be at least 1"),
    ]
    for main, argv, message in cases:
        status, _, err = _run(main, argv, capsys)
        assert status == 2 and message in _one_sentence(err), (argv, err)
    assert (out / MANIFEST).read_bytes() == manifest and len(os.listdir(out)) == 2
    assert os.listdir(foreign) == ["thesis.tex"]
    assert not (tmp_path / "new").exists() and not (tmp_path / "r.json").exists()
    # --skip-bad leaves the undecodable file out and indexes the rest.
    status, stdout, err = _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--images", gallery_with_bad, "--out",
                                                tmp_path / "skipped", "--skip-bad", "--no-progress"], capsys)
    assert status == 0 and "indexed 1 images" in stdout and "bad.png" in err


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from xbm.serving import index as index_module
    from xbm.serving.gallery import build_index, images_source
    from xbm.serving.models import load_embedder

    calls = []
    real_fsync = os.fsync

    def fsync_then_wait(fd):
        real_fsync(fd)
        calls.append(fd)
        if len(calls) == {stop_at}:
            open({marker!r}, "w").close()
            time.sleep(60)

    index_module.os.fsync = fsync_then_wait
    embedder = load_embedder(ckpt={ckpt!r}, device="cpu")
    build_index(embedder, images_source({images!r}), {out!r}, add=True, progress=False)
""")


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [1, 2], ids=["after-the-faiss-file", "manifest-written-not-renamed"])
def test_a_kill_while_writing_leaves_the_old_index_intact(tiny, tmp_path, capsys, stop_at):
    out, images = tmp_path / "idx", tmp_path / "new_images"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out, "--no-progress"],
                capsys)[0] == 0
    images.mkdir()
    for i in range(3):
        shutil.copy(tiny.files[0], images / f"copy{i}.png")
    before = load_index(str(out))
    marker = tmp_path / "marker"
    script = _KILL_SCRIPT.format(root=ROOT, stop_at=stop_at, marker=str(marker), ckpt=tiny.ckpt["a"],
                                 images=str(images), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), child.communicate()[1].decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(os.listdir(out)) > 2  # the killed write left its files behind...
    after = load_index(str(out))  # ...but the manifest still names the complete old index
    assert after.paths == before.paths and len(after) == len(before)
    assert np.array_equal(after.index.reconstruct_n(0, len(after)), before.index.reconstruct_n(0, len(before)))
    # The next write succeeds and removes the leftovers.
    status, stdout, _ = _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--images", images, "--out", out, "--add",
                                              "--no-progress"], capsys)
    assert status == 0 and "added 3 images" in stdout and len(os.listdir(out)) == 2


def test_a_failing_write_leaves_the_old_index_and_no_temporary_files(tiny, tmp_path, capsys, monkeypatch):
    from xbm.serving import index as index_module

    out = tmp_path / "idx"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--split", "test", "--out", out, "--no-progress"],
                capsys)[0] == 0
    files = sorted(os.listdir(out))
    manifest = (out / MANIFEST).read_bytes()
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith(MANIFEST):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(index_module.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        index_module.save_index(load_index(str(out)), str(out))
    assert (out / MANIFEST).read_bytes() == manifest
    assert len(os.listdir(out)) == 3 and not any(f.startswith(".tmp-") for f in os.listdir(out))
    monkeypatch.setattr(index_module.os, "replace", real_replace)
    assert len(load_index(str(out))) == len(tiny.files) and sorted(os.listdir(out)) >= files[:1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("runtime,suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_exported_model_equals_pytorch_and_describes_its_input(tiny, tmp_path, capsys, runtime, suffix):
    out = tmp_path / f"model{suffix}"
    status, stdout, _ = _run(cli.export_main, ["--ckpt", tiny.ckpt["a"], "--format", runtime, "--out", out], capsys)
    assert status == 0 and out.is_file()
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["input"]["shape"] == ["batch", 3, 32, 32] and sidecar["input"]["channel_order"] == "RGB"
    assert sidecar["input"]["mean"] == [0.5, 0.5, 0.5] and sidecar["input"]["std"] == [0.5, 0.5, 0.5]
    assert sidecar["input"]["value_range"] == [0.0, 1.0]
    assert sidecar["output"]["dim"] == 8 and sidecar["output"]["normalized"] is True
    if runtime == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

        def run(x):
            return session.run(None, {sidecar["input"]["name"]: x.numpy()})[0]
    else:
        module = torch.jit.load(str(out))

        def run(x):
            return module(x).detach().numpy()
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        with torch.no_grad():
            expected = tiny.model(x).numpy()
        got = run(x)
        assert got.shape == (batch, 8)
        assert np.abs(got - expected).max() <= 1e-4
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


_WITHOUT_TRAINING_CODE = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "torchvision", "yacs", "xbm.config", "xbm.data", "xbm.engine", "xbm.modeling",
               "xbm.losses", "xbm.memory")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, Blocker())
    sys.path.insert(0, {root!r})
    from xbm.serving import cli
    argv = sys.argv[2:]
    sys.exit(cli.index_main(argv) if sys.argv[1] == "index" else cli.search_main(argv))
""")


@pytest.mark.slow
def test_an_onnx_model_indexes_and_searches_without_torch_or_the_training_code(tiny, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    assert _run(cli.export_main, ["--ckpt", tiny.ckpt["a"], "--format", "onnx", "--out", model], capsys)[0] == 0
    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(tiny.files[:30]):
        shutil.copy(path, images / f"{i:02d}.png")
    script = _WITHOUT_TRAINING_CODE.format(root=ROOT)

    def run(*argv):
        done = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run("index", "--model", model, "--images", images, "--out", tmp_path / "idx", "--no-progress")
    run("search", "--index", tmp_path / "idx", "--query", images / "05.png", "--topk", "3",
        "--json", tmp_path / "r.json")
    document = json.loads((tmp_path / "r.json").read_text())
    (expected,) = _brute_force(tiny.reference[:30], [5], 3)
    matches = document["results"][0]["matches"]
    assert [os.path.basename(m["path"]) for m in matches] == [f"{j:02d}.png" for _, j in expected]
    assert [m["score"] for m in matches] == pytest.approx([s for s, _ in expected], abs=1e-4)
    # The same checkpoint's PyTorch model may search the ONNX-built index: one model, two runtimes.
    assert _run(cli.search_main, ["--index", tmp_path / "idx", "--query", images / "05.png", "--ckpt",
                                  tiny.ckpt["a"]], capsys)[0] == 0


def test_projector_files_read_back_through_tensorboards_projector_plugin(tiny, tmp_path, capsys):
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import Client

    from xbm.cli import eval_main
    from xbm.serving.projector import choose_items

    status, _, err = _run(eval_main, ["--ckpt", tiny.ckpt["a"], "--out", tmp_path, "--projector", 12], capsys)
    assert status == 0, err
    folder = tmp_path / "projector"
    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=str(folder), data_provider=None))
    apps = plugin.get_plugin_apps()

    def get(route, **query):
        response = Client(apps[route]).get(route, query_string=query)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response

    info = get("/info", run=".").get_json()
    (embedding,) = info["embeddings"]
    assert embedding["tensorName"] == "a:00007" and embedding["tensorShape"] == [12, 8]
    vectors = np.frombuffer(get("/tensor", run=".", name="a:00007").get_data(), dtype=np.float32).reshape(12, 8)
    rows = choose_items(len(tiny.files), 12)
    assert np.abs(vectors - tiny.reference[rows]).max() <= 1e-5
    metadata = get("/metadata", run=".", name="a:00007").get_data(as_text=True).strip().split("\n")
    assert metadata[0] == "label\tclass\tpath"
    assert [int(line.split("\t")[0]) for line in metadata[1:]] == tiny.labels[rows].tolist()
    assert [line.split("\t")[2] for line in metadata[1:]] == [tiny.files[i] for i in rows]
    sprite = Image.open(__import__("io").BytesIO(get("/sprite_image", run=".", name="a:00007").get_data()))
    side = embedding["sprite"]["singleImageDim"]
    assert side == [64, 64] and sprite.size == (4 * 64, 4 * 64)  # ceil(sqrt(12)) = 4 thumbnails a row
    status, _, err = _run(eval_main, ["--ckpt", tiny.ckpt["a"], "--out", tmp_path, "--projector", 0], capsys)
    assert status == 2 and "--projector needs a positive number" in err


def test_a_list_file_gives_labels_and_the_plot_marks_hits_and_misses(tiny, tmp_path, capsys):
    from xbm.utils.retrieval_grid import HIT_COLOR, MISS_COLOR, QUERY_COLOR

    folder = tmp_path / "catalogue"
    folder.mkdir()
    lines = []
    for i in range(24):
        shutil.copy(tiny.files[i], folder / f"{i:02d}.png")
        lines.append(f"catalogue/{i:02d}.png,{100 + int(tiny.labels[i])}")
    (tmp_path / "gallery.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "idx"
    assert _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--list", tmp_path / "gallery.txt", "--out", out,
                                 "--no-progress"], capsys)[0] == 0
    gallery = load_index(str(out))
    assert gallery.labels == [100 + int(v) for v in tiny.labels[:24]]
    assert gallery.paths == [str(folder / f"{i:02d}.png") for i in range(24)]
    status, _, _ = _run(cli.search_main, ["--index", out, "--query", folder / "00.png", "--topk", 6,
                                          "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png"], capsys)
    assert status == 0
    matches = json.loads((tmp_path / "r.json").read_text())["results"][0]["matches"]
    hits = [m["label"] == 100 + int(tiny.labels[0]) for m in matches]
    with Image.open(tmp_path / "r.png") as picture:
        colours = {tuple(p) for p in np.asarray(picture.convert("RGB")).reshape(-1, 3)}

    def rgb(hex_color):
        return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))

    assert rgb(QUERY_COLOR) in colours and hits[0]  # the query itself is its first match
    assert (rgb(MISS_COLOR) in colours) == (not all(hits)) and rgb(HIT_COLOR) in colours
    (tmp_path / "bad.txt").write_text("catalogue/00.png;3\n")
    status, _, err = _run(cli.index_main, ["--ckpt", tiny.ckpt["a"], "--list", tmp_path / "bad.txt", "--out",
                                           tmp_path / "idx2"], capsys)
    assert status == 2 and "bad.txt, line 1" in _one_sentence(err)
