"""Runs that never lose work and never end in a traceback: signals, the lock, no clobbering,
unreadable checkpoints, missing images, one-sentence errors (issue: runs that survive)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from xbm.cli import _parse, _parser, eval_main, train_main
from xbm.config import ConfigError, load_cfg
from xbm.engine import run_guard
from xbm.checkpoint.io import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from xbm.engine.run_guard import (EXIT_STOPPED, LOCK_NAME, RunGuardError, RunLock, StopSignals, claim_output_dir,
                                  resume_command)

from conftest import checkpoint_memory

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same sums in every process


def _opts(root, out, *extra):
    return [
        "OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
        "XBM.SIZE", "36", "XBM.START_ITERATION", "5", "SOLVER.BASE_LR", "0.001", "TEST.EVAL_PERIOD", "0",
        "SOLVER.LOG_PERIOD", "5", *extra,
    ]


def _command(root, out, *extra, config="configs/glyphs_axbn.yaml"):
    return [sys.executable, "tools/train_net.py", "--cfg", config, *_opts(root, out, *extra)]


def _wait_for(path, proc, seconds=180):
    deadline = time.time() + seconds
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(path), f"{path} never appeared"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "earlier",
                                                "command": "x", **fields}))

from conftest import checkpoint_memory


# ------------------------------------------------------------------ the command line
def _train_parser():
    parser = _parser("t")
    parser.add_argument("--resume", nargs="?", const="auto")
    parser.add_argument("--overwrite", action="store_true")
    return parser


@pytest.mark.parametrize("argv, resume, opts", [
    (["--cfg", "c.yaml", "--resume"], "auto", []),
    (["--cfg", "c.yaml", "XBM.SIZE", "10", "--resume"], "auto", ["XBM.SIZE", "10"]),
    (["--resume", "XBM.SIZE", "10"], "auto", ["XBM.SIZE", "10"]),  # the key is an override, not a checkpoint
    (["--resume", "out/last.pth", "XBM.SIZE", "10"], "out/last.pth", ["XBM.SIZE", "10"]),
    (["XBM.SIZE", "10", "--resume", "a/b.pth", "OUTPUT_DIR", "o"], "a/b.pth", ["XBM.SIZE", "10", "OUTPUT_DIR", "o"]),
    (["--cfg", "c.yaml"], None, []),
])
def test_resume_without_a_value_means_auto(argv, resume, opts):
    args = _parse(_train_parser(), argv)
    assert (args.resume, args.opts) == (resume, opts)


def test_options_after_the_overrides_are_options():
    args = _parse(_train_parser(), ["XBM.SIZE", "10", "--cfg", "c.yaml", "--overwrite", "--debug"])
    assert (args.cfg, args.overwrite, args.debug, args.opts) == ("c.yaml", True, True, ["XBM.SIZE", "10"])
    parser = _parser("e")
    parser.add_argument("--ckpt")
    parser.add_argument("--out")
    parser.add_argument("--export", nargs="*")
    args = _parse(parser, ["--ckpt", "a.pth", "TEST.BATCH_SIZE", "4", "--out", "o", "--export", "train", "test"])
    assert (args.ckpt, args.out, args.export, args.opts) == ("a.pth", "o", ["train", "test"], ["TEST.BATCH_SIZE", "4"])
    args = _parse(parser, ["--export", "test", "TEST.BATCH_SIZE", "4", "--ckpt", "a.pth"])
    assert (args.ckpt, args.export, args.opts) == ("a.pth", ["test"], ["TEST.BATCH_SIZE", "4"])


def test_resume_command_repeats_the_command_with_resume(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/train_net.py"])
    argv = ["--cfg", "c.yaml", "--overwrite", "XBM.SIZE", "10", "--resume", "old/last.pth", "OUTPUT_DIR", "my dir"]
    command = resume_command(argv)
    assert command.endswith("tools/train_net.py --cfg c.yaml XBM.SIZE 10 OUTPUT_DIR 'my dir' --resume")


def test_train_without_cfg_prints_usage_and_the_configs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    assert train_main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "configs/glyphs_xbm.yaml" in err and "configs/sop_xbm.yaml" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_out_help_names_the_files(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "eval_metrics.json and eval_metrics.csv" in help_text and "<checkpoint>_<split>_{embeddings,labels}.npy" in help_text


# ------------------------------------------------------------------ config mistakes
def test_int_for_a_float_key_and_true_false_for_booleans(tmp_path):
    cfg = load_cfg(None, ["XBM.WEIGHT", "1", "XBM.ENABLE", "true", "MODEL.BACKBONE.FROZEN_BN", "FALSE",
                          "SOLVER.MAX_ITERS", "2e3"])
    assert type(cfg.XBM.WEIGHT) is float and cfg.XBM.WEIGHT == 1.0
    assert cfg.XBM.ENABLE is True and cfg.MODEL.BACKBONE.FROZEN_BN is False and cfg.SOLVER.MAX_ITERS == 2000
    path = tmp_path / "exp.yaml"
    path.write_text("XBM:\n  WEIGHT: 2\n  ENABLE: true\nSOLVER:\n  BASE_LR: 1\n")
    cfg = load_cfg(str(path))
    assert (type(cfg.XBM.WEIGHT), cfg.XBM.WEIGHT, type(cfg.SOLVER.BASE_LR)) == (float, 2.0, float)
    with pytest.raises(ConfigError, match="XBM.SIZE"):  # a real mismatch is still refused
        load_cfg(None, ["XBM.SIZE", "1.5"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("XBM:\n  SIZE: 64\n  WEIGHT: [1.0\nSOLVER:\n  BASE_LR: 0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 4, column 7: YAML syntax error .*starts on line 3"):
        load_cfg(str(path))


def test_expected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("XBM:\n\tSIZE: 64\n")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--cfg", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert re.match(rf"error: {re.escape(str(path))}, line 2, column 1: YAML syntax error", err)
    with pytest.raises(ConfigError):
        train_main(["--cfg", str(path), "--debug"])


def test_output_dir_that_is_a_file_or_not_writable(glyph_root, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "run", "cannot create OUTPUT_DIR")):
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--cfg", "configs/glyphs_xbm.yaml", *_opts(glyph_root, out)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # A folder this user may not write to. (root ignores permission bits, so the refusal the file
    # system would give is simulated at os.open.)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(read_only)) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--cfg", "configs/glyphs_xbm.yaml", *_opts(glyph_root, read_only)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"cannot write into OUTPUT_DIR {read_only} (Permission denied)" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_by_permission(glyph_root, tmp_path, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    with pytest.raises(SystemExit):
        train_main(["--cfg", "configs/glyphs_xbm.yaml", *_opts(glyph_root, read_only)])
    assert "Permission denied" in capsys.readouterr().err


# ------------------------------------------------------------------ the lock file
def test_lock_of_a_live_run_refuses_and_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(folder, pid=sleeper.pid, started="2026-01-01 10:00:00")
        with pytest.raises(RunGuardError, match=rf"in use by another run \(pid {sleeper.pid} on this host, "
                                                r"started 2026-01-01 10:00:00"):
            claim_output_dir(str(folder), resuming=True, overwrite=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    _write_lock(folder, pid=sleeper.pid)  # now dead
    with caplog.at_level("WARNING", logger="xbm"):
        lock = claim_output_dir(str(folder), resuming=True, overwrite=False)
    assert f"took over the lock {folder / LOCK_NAME} of run pid {sleeper.pid}" in caplog.text
    holder = json.loads((folder / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    lock.release()
    assert not (folder / LOCK_NAME).exists()


def test_lock_of_another_host_or_not_a_lock_is_never_taken(tmp_path):
    folder = tmp_path / "run"
    _write_lock(folder, pid=_dead_pid(), host="node-17")
    with pytest.raises(RunGuardError, match="in use by another run .* on host node-17.*delete the lock file"):
        RunLock(str(folder)).acquire()
    (folder / LOCK_NAME).write_text("{not json")
    with pytest.raises(RunGuardError, match="is not a lock file of xbm"):
        RunLock(str(folder)).acquire()


def test_release_leaves_another_runs_lock(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    _write_lock(tmp_path, pid=os.getpid() + 1)  # replaced by someone else
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_stops_with_one_sentence(glyph_root, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_command(glyph_root, out, "SOLVER.MAX_ITERS", "100000"), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / LOCK_NAME, first)
        second = subprocess.run(_command(glyph_root, out, "SOLVER.MAX_ITERS", "10", "--resume"), env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: OUTPUT_DIR {out} is in use by another run (pid {first.pid} on this host, started "
            f"{json.loads((out / LOCK_NAME).read_text())['started']}; lock file {out / LOCK_NAME}): wait for it to "
            "end, choose another OUTPUT_DIR, or delete the lock file if that run is dead"]
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------ no clobbering
@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_without_overwrite(glyph_root, tmp_path):
    out = tmp_path / "run"
    subprocess.run(_command(glyph_root, out, "SOLVER.MAX_ITERS", "4"), env=ENV, check=True, capture_output=True)
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "log.txt", "checkpoints/last.pth")}

    again = subprocess.run(_command(glyph_root, out, "SOLVER.MAX_ITERS", "2"), env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"error: OUTPUT_DIR {out} holds the checkpoints of an earlier run ({out}/checkpoints/last.pth" in again.stderr
    assert "continue it with --resume, start over with --overwrite" in again.stderr
    assert {name: (out / name).read_bytes() for name in before} == before  # untouched
    assert not (out / LOCK_NAME).exists()

    fresh = subprocess.run([*_command(glyph_root, out, "SOLVER.MAX_ITERS", "2"), "--overwrite"], env=ENV,
                           capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and f"moved the earlier run's files from {out} to {moved[0]}" in fresh.stdout
    assert {name: (moved[0] / name).read_bytes() for name in before} == before  # kept, aside
    assert load_checkpoint(str(out / "checkpoints" / "last.pth"))["iteration"] == 2
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunGuardError, match="give one of them"):
        claim_output_dir(str(tmp_path / "run"), resuming=True, overwrite=True)


# ------------------------------------------------------------------ signals
def test_first_signal_asks_to_stop_a_repeat_is_the_same_request_a_later_one_exits(monkeypatch):
    with StopSignals():
        assert StopSignals.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert StopSignals.requested() == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # within REPEAT_WINDOW_S: forwarded by a launcher, ignored
        assert StopSignals.requested() == "SIGTERM"
        monkeypatch.setattr(run_guard, "REPEAT_WINDOW_S", 0.0)
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGINT)
        assert exit_info.value.code == 128 + signal.SIGINT == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's own handler is back
    assert StopSignals.requested() is None


# The conv net with AXBN; a timm ViT with XBN (heavy: the kill -9 test of test_resume.py runs it in make test).
@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/glyphs_axbn.yaml",
                                    pytest.param("tests/fixtures/tiny_vit_xbn.yaml", marks=pytest.mark.heavy)])
def test_sigterm_saves_stops_with_75_and_the_resumed_run_equals_an_uninterrupted_one(glyph_root, tmp_path, config):
    common = ("SOLVER.MAX_ITERS", "40", "SOLVER.CHECKPOINT_PERIOD", "10", "TEST.EVAL_PERIOD", "20")
    reference = tmp_path / "reference"
    subprocess.run(_command(glyph_root, reference, *common, config=config), env=ENV, check=True, capture_output=True)

    out = tmp_path / "stopped"
    # Its own session, signalled as a whole, as SLURM signals every process of a job (here the
    # DataLoader worker too, which must not take the run down).
    proc = subprocess.Popen(_command(glyph_root, out, *common, "DATA.NUM_WORKERS", "1", config=config), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(out / "checkpoints" / "last.pth", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped_at = load_checkpoint(str(out / "checkpoints" / "last.pth"))["iteration"]
    assert 10 <= stopped_at < 40
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"stopped at iteration {stopped_at}; continue with: ")
    assert f" --cfg {config} OUTPUT_DIR {out} DATA.ROOT " in line
    assert line.endswith("SOLVER.MAX_ITERS 40 SOLVER.CHECKPOINT_PERIOD 10 TEST.EVAL_PERIOD 20 DATA.NUM_WORKERS 1 --resume")
    assert not (out / LOCK_NAME).exists()

    command = line.split("continue with: ", 1)[1]
    resumed = subprocess.run(command, shell=True, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(str(reference / "checkpoints" / "last.pth"))
    b = load_checkpoint(str(out / "checkpoints" / "last.pth"))
    assert b["iteration"] == 40
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in checkpoint_memory(a).items():
        torch.testing.assert_close(checkpoint_memory(b)[name], tensor, rtol=0, atol=1e-6, msg=name)
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (reference, out)]
    assert [r["iteration"] for r in records[1]] == [r["iteration"] for r in records[0]] == [20, 40]
    for key in ("R@1", "R@10", "MAP@R"):
        assert records[1][-1][key] == pytest.approx(records[0][-1][key], abs=1e-6)


# ------------------------------------------------------------------ checkpoints that are not checkpoints
def _damaged_checkpoints(folder):
    folder.mkdir(exist_ok=True)
    good = folder / "good.pth"
    save_checkpoint({"iteration": 3, "config": "", "model": {"w": torch.zeros(500)}}, str(good))
    data = good.read_bytes()
    files = {
        "truncated.pth": (data[: len(data) // 2], r"the file is truncated or corrupted \(\d+ bytes"),
        "corrupted.pth": (data[:100] + b"\0" * 200 + data[300:], "the file is truncated or corrupted"),
        "notes.pth": (b"remember to try XBM.SIZE 8192\n", r"it is not a file written by torch.save \(it starts with "
                                                         r"'remember to try XBM.SIZE 8192'\)"),
        "empty.pth": (b"", "the file is empty"),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {folder / name: message for name, (_, message) in files.items()}


def test_unreadable_checkpoints_are_named_with_what_is_wrong(tmp_path):
    for path, message in _damaged_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} is not a readable checkpoint: {message}"):
            load_checkpoint(str(path))
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match=r"backbone\.pth is a PyTorch file but not an xbm training checkpoint: "
                                              r"it has no 'iteration', 'config', 'model' \(its keys: conv.weight\)"):
        load_checkpoint(str(tmp_path / "backbone.pth"), required=("iteration", "config", "model"))


def test_train_and_eval_name_a_bad_checkpoint_in_one_sentence(glyph_root, tmp_path, capsys):
    damaged = _damaged_checkpoints(tmp_path / "files")
    text_file = next(p for p in damaged if p.name == "notes.pth")
    truncated = next(p for p in damaged if p.name == "truncated.pth")
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--ckpt", str(text_file)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {text_file} is not a readable checkpoint: it is not")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--cfg", "configs/glyphs_xbm.yaml", *_opts(glyph_root, tmp_path / "run"), "--resume",
                    str(truncated)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines() == [
        f"error: {truncated} is not a readable checkpoint: the file is truncated or corrupted "
        f"({truncated.stat().st_size} bytes; PytorchStreamReader failed reading zip archive: "
        "failed finding central directory)"]


def test_eval_with_a_config_of_another_dataset_says_so(glyph_root, tmp_path, capsys):
    from xbm.checkpoint.config import config_of_checkpoint

    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1, "model": {}, "config": load_cfg("configs/glyphs_xbm.yaml").dump()}, str(path))
    with pytest.raises(ValueError, match=r"trained on DATA.NAME 'glyphs' but --cfg configs/sop_xbm.yaml evaluates on "
                                         r"'sop': leave out --cfg .* or add DATA.NAME sop"):
        config_of_checkpoint(str(path), [], "configs/sop_xbm.yaml")
    assert config_of_checkpoint(str(path), ["DATA.NAME", "sop"], "configs/sop_xbm.yaml").DATA.NAME == "sop"
    assert config_of_checkpoint(str(path), [], "configs/glyphs_xbn.yaml").XBM.ADAPT.NAME == "xbn"


def test_eval_of_a_checkpoint_that_does_not_fit_the_config(glyph_root, tmp_path, capsys):
    from xbm.modeling import build_model

    trained = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "run"))
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1, "model": build_model(trained).state_dict(), "config": trained.dump()}, str(path))
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--ckpt", str(path), "--cfg", "configs/glyphs_xbm.yaml", *_opts(glyph_root, tmp_path / "run"),
                   "MODEL.HEAD.DIM", "16"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 2
    assert err.startswith(f"error: {path} does not fit the model of this config (size mismatch for head.")
    assert err.endswith("evaluate it without --cfg to use its own config")


def test_export_checks_split_names_before_any_work(tmp_path, capsys):
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1, "model": {}, "config": load_cfg("configs/glyphs_xbm.yaml").dump()}, str(path))
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--ckpt", str(path), "--export", "test", "val", "DATA.ROOT", str(tmp_path / "no_data")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --export val: DATA.NAME glyphs has the splits train, test\n"
    assert not (tmp_path / "no_data").exists()  # nothing was generated or evaluated


# ------------------------------------------------------------------ writing checkpoints
def test_a_failed_checkpoint_write_keeps_the_previous_one(glyph_root, tmp_path, capsys, monkeypatch):
    import xbm.checkpoint.io as checkpoint

    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f):
        calls.append(obj["iteration"])
        if len(calls) == 1:
            return real_save(obj, f)
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--cfg", "configs/glyphs_xbm.yaml",
                    *_opts(glyph_root, out, "SOLVER.MAX_ITERS", "6", "SOLVER.CHECKPOINT_PERIOD", "2")])
    err = capsys.readouterr().err
    last = out / "checkpoints" / "last.pth"
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (  # after the progress bar
        f"error: could not write checkpoint {last} (No space left on device); the previous last.pth is intact")
    monkeypatch.undo()
    assert calls == [2, 4] and load_checkpoint(str(last))["iteration"] == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.pth"]  # no temporary file left
    assert not (out / LOCK_NAME).exists()


def test_save_checkpoint_turns_a_failed_write_into_a_sentence(tmp_path, monkeypatch):
    def failing(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*new\.pth \(\[enforce fail.*\); "
                                                   "no earlier file is affected"):
        save_checkpoint({"iteration": 1}, str(tmp_path / "new.pth"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ images
def _list_dataset(glyph_root, folder):
    """The Glyphs files read as DATA.NAME list (its list files have the list format)."""
    shutil.copytree(glyph_root, folder)
    return folder


def test_missing_images_stop_the_run_at_start_with_count_and_paths(glyph_root, tmp_path, capsys):
    root = _list_dataset(glyph_root, tmp_path / "data")
    listed = [line.rsplit(",", 1)[0] for line in (root / "test.txt").read_text().splitlines()]
    for path in (listed[5], listed[40], listed[41], listed[-1]):
        (root / path).unlink()
    opts = ["--cfg", "configs/glyphs_xbm.yaml", *_opts(root, tmp_path / "run"), "DATA.NAME", "list",
            "INPUT.RESIZE", "32"]
    with pytest.raises(SystemExit) as exit_info:
        train_main(opts)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == (
        f"error: list: 4 of {len(listed)} images listed for split 'test' do not exist, e.g. {root / listed[5]}, "
        f"{root / listed[40]}, {root / listed[41]}; check that the images were unpacked under {root} (write one "
        "'relative/path,label' line per image, paths relative to the list file), or set DATA.BAD_IMAGES skip to "
        "train without them\n")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_images_with_skip_are_reported_and_replaced(glyph_root, tmp_path, caplog):
    from xbm.data.datasets import ListDataset

    root = _list_dataset(glyph_root, tmp_path / "data")
    listed = [line.rsplit(",", 1) for line in (root / "train.txt").read_text().splitlines()]
    (root / listed[0][0]).unlink()
    with caplog.at_level("WARNING"):
        ds = ListDataset(root, "train", bad_images="skip")
    assert f"1 of {len(listed)} images listed for split 'train' do not exist" in caplog.text
    image, label = ds[0]
    same_class = next(i for i in range(1, len(ds)) if ds.labels[i] == ds.labels[0])
    assert label == ds.labels[0] and np.array_equal(np.asarray(image), np.asarray(ds[same_class][0]))


@pytest.mark.parametrize("workers", ["0", "1"])  # with a worker, torch re-raises the error with its traceback
def test_an_image_that_fails_to_decode_mid_run_names_it_and_the_checkpoint(glyph_root, tmp_path, capsys, workers):
    root = _list_dataset(glyph_root, tmp_path / "data")
    listed = [line.rsplit(",", 1)[0] for line in (root / "train.txt").read_text().splitlines()]
    (root / listed[100]).write_bytes(b"not a png")
    out = tmp_path / "run"
    opts = ["--cfg", "configs/glyphs_baseline.yaml", *_opts(root, out, "SOLVER.MAX_ITERS", "60", "SOLVER.CHECKPOINT_PERIOD",
                                                          "2"), "DATA.NAME", "list", "INPUT.RESIZE", "32", "DATA.NUM_WORKERS", workers]
    with pytest.raises(SystemExit) as exit_info:
        train_main(opts)
    err = capsys.readouterr().err
    saved = load_checkpoint(str(out / "checkpoints" / "last.pth"))["iteration"]
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert re.fullmatch(
        rf"error: training stopped at iteration {saved}: cannot decode image {re.escape(str(root / listed[100]))}: "
        rf".* \(fix or remove the file, or set DATA.BAD_IMAGES skip\); the last checkpoint is "
        rf"{re.escape(str(out / 'checkpoints' / 'last.pth'))} \(iteration {saved}\); continue with --resume",
        err.splitlines()[-1])


# ------------------------------------------------------------------ what the log says
def test_log_starts_with_the_config_and_reports_queries_without_positives_once(glyph_root, tmp_path):
    from xbm.engine.defaults import DefaultTrainer

    out = tmp_path / "run"
    trainer = DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "XBM.WEIGHT", "1")))
    metrics = {"R@1": 0.5, "num_queries": 30, "num_queries_without_positive": 7}
    trainer.evaluator = lambda model: {"test": dict(metrics)}
    trainer.evaluate()
    trainer.evaluate()
    lines = (out / "log.txt").read_text().splitlines()
    assert lines[0].endswith("config (defaults <- config file <- command line):") and lines[1] == "DATA:"
    assert "  WEIGHT: 1.0" in lines
    warnings = [line for line in lines if "no image of their class" in line]
    assert len(warnings) == 1 and "evaluation task 'test': 7 of 30 queries have no image" in warnings[0]


# ------------------------------------------------------------------ two ranks (gloo on CPU)
def _ddp_opts(root, out, max_iters, *extra):
    return ["--cfg", "configs/glyphs_xbm.yaml", *_opts(root, out, "SOLVER.MAX_ITERS", str(max_iters),
                                                        "SOLVER.CHECKPOINT_PERIOD", "5", "XBM.SIZE", "40"), *extra]


def _ddp_worker(rank: int, port: int, root: str, folder: str) -> None:
    """Both ranks: a refused OUTPUT_DIR; a run signalled on rank 1 alone, resumed; the same run whole."""
    import torch.distributed as dist

    from xbm.engine.defaults import DefaultTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    codes = {}
    try:
        try:  # only rank 0 looks at the folder; rank 1 must stop with it, not wait in a collective
            codes["held"] = train_main(_ddp_opts(root, os.path.join(folder, "held"), 4))
        except SystemExit as exit_info:
            codes["held"] = exit_info.code
        original_step = DefaultTrainer.train_step

        def step_then_signal(self, images, labels, *item_ids):
            parts = original_step(self, images, labels, *item_ids)
            if rank == 1 and self.iteration == 6:  # becomes 7 after this step
                os.kill(os.getpid(), signal.SIGTERM)
            return parts

        DefaultTrainer.train_step = step_then_signal
        codes["stopped"] = train_main(_ddp_opts(root, os.path.join(folder, "stopped"), 20))
        DefaultTrainer.train_step = original_step
        dist.barrier()  # rank 0 has written its checkpoint
        codes["stopped_at"] = load_checkpoint(os.path.join(folder, "stopped", "checkpoints", "last.pth"))["iteration"]
        codes["resumed"] = train_main(_ddp_opts(root, os.path.join(folder, "stopped"), 20, "--resume"))
        codes["whole"] = train_main(_ddp_opts(root, os.path.join(folder, "whole"), 20))
    finally:
        with open(os.path.join(folder, f"codes.rank{rank}.json"), "w") as f:
            json.dump(codes, f)
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_refusal_and_stop_at_the_same_iteration(glyph_root, tmp_path):
    import torch.multiprocessing as mp

    held = tmp_path / "held" / "checkpoints"
    held.mkdir(parents=True)
    (held / "last.pth").write_bytes(b"an earlier run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(glyph_root), str(tmp_path)), nprocs=2)
    codes = [json.loads((tmp_path / f"codes.rank{r}.json").read_text()) for r in range(2)]
    # the refusal reached both ranks. The signal came to rank 1 during the step at iteration 6, after that
    # step's all-reduce: the next step's (iteration 7) carries it to rank 0, and both stop after it, at 8
    assert codes[0] == codes[1] == {"held": 2, "stopped": EXIT_STOPPED, "stopped_at": 8, "resumed": 0, "whole": 0}
    assert not (tmp_path / "held" / "log.txt").exists()
    whole = load_checkpoint(str(tmp_path / "whole" / "checkpoints" / "last.pth"))
    resumed = load_checkpoint(str(tmp_path / "stopped" / "checkpoints" / "last.pth"))
    assert resumed["iteration"] == whole["iteration"] == 20
    for name, tensor in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in checkpoint_memory(whole).items():
        torch.testing.assert_close(checkpoint_memory(resumed)[name], tensor, rtol=0, atol=1e-6, msg=name)
    log = (tmp_path / "stopped" / "log.txt").read_text()
    assert log.count("SIGTERM: stopped at iteration 8") == 0  # rank 0 was not signalled itself
    assert log.count("a signal on another rank: stopped at iteration 8") == 1


# ------------------------------------------------------------------ the SLURM example
def test_slurm_script_passes_sigterm_on_and_requeues_on_75(tmp_path):
    """scripts/slurm_train.sbatch run by bash with stand-ins for python (a training that saves and
    exits 75 on SIGTERM, or ends with 1) and scontrol (records its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        "#!/bin/bash\necho \"$@\" > \"$STUB_DIR/args\"\n"
        "trap 'echo saved > \"$STUB_DIR/saved\"; exit 75' TERM\n"
        "[ -n \"$STUB_STATUS\" ] && exit \"$STUB_STATUS\"\n"
        "touch \"$STUB_DIR/started\"\nfor i in $(seq 100); do sleep 0.1; done\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho \"$@\" > \"$STUB_DIR/scontrol\"\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "4242"}
    script = os.path.abspath("scripts/slurm_train.sbatch")

    job = subprocess.Popen(["bash", script, "--cfg", "configs/sop_xbm.yaml", "OUTPUT_DIR", "out"], env=env,
                           stdout=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "started", job, seconds=20)
    job.send_signal(signal.SIGTERM)  # --signal=B:TERM: the batch shell alone gets it
    stdout, _ = job.communicate(timeout=30)
    assert job.returncode == 75 and (tmp_path / "saved").exists()
    assert (tmp_path / "args").read_text().split() == [
        "tools/train_net.py", "--cfg", "configs/sop_xbm.yaml", "OUTPUT_DIR", "out", "--resume"]
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in stdout

    (tmp_path / "scontrol").unlink()
    failed = subprocess.run(["bash", script], env={**env, "STUB_STATUS": "1"}, capture_output=True, timeout=60)
    assert failed.returncode == 1 and not (tmp_path / "scontrol").exists()  # a failure is not requeued


def _sleeping_worker(ready):
    from xbm.utils.signals import ignore_stop_signals

    ignore_stop_signals(0)
    ready.set()
    time.sleep(30)


def test_a_data_worker_outlives_a_jobwide_sigterm_but_not_its_main_processes():
    import multiprocessing

    context = multiprocessing.get_context("fork")  # the DataLoader's on Linux
    ready = context.Event()
    worker = context.Process(target=_sleeping_worker, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(60)
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # SLURM's SIGTERM to every process
    subprocess.run(["kill", "-INT", str(worker.pid)], check=True)  # the terminal's Ctrl-C
    worker.join(1.0)
    assert worker.is_alive()
    worker.terminate()  # what multiprocessing does to leftover workers at exit, and DataLoader's shutdown
    worker.join(10)
    assert worker.exitcode == 128 + signal.SIGTERM


def test_ctrl_c_before_training_starts_is_one_line(monkeypatch, capsys):
    import xbm.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xbm.cli, "load_cfg", interrupted)
    assert train_main(["--cfg", "configs/glyphs_xbm.yaml"]) == 130
    assert capsys.readouterr().err == "interrupted before training started; nothing was written\n"
    with pytest.raises(KeyboardInterrupt):
        train_main(["--cfg", "configs/glyphs_xbm.yaml", "--debug"])
