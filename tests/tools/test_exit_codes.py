"""The exit-code table of detection.cli, through the tools' main(): one line on stderr, no traceback."""

import errno
import json
import os
import re
from pathlib import Path

import pytest

import detection.io
from detection import cli

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/smoke/tiny_cpu.yaml")


def _one_line_error(capsys, *, after_log: bool = False) -> str:
    """The one ``error:`` line on stderr; with ``after_log`` the training log may come before it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 or after_log, err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def test_the_table_is_declared_once():
    assert (cli.EXIT_OK, cli.EXIT_DIVERGED, cli.EXIT_USER_ERROR, cli.EXIT_INTERRUPTED) == (0, 1, 2, 130)
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n{code}" in cli.__doc__


def test_run_main_codes(capsys):
    def raises(exc):
        def body():
            raise exc
        return body

    assert cli.run_main(lambda: 0) == 0
    assert cli.run_main(raises(FloatingPointError("loss is nan at iteration 3"))) == 1
    assert _one_line_error(capsys) == "error: loss is nan at iteration 3"
    assert cli.run_main(raises(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert cli.run_main(raises(PermissionError(errno.EACCES, "Permission denied", "/out/x"))) == 2
    assert _one_line_error(capsys).startswith("error: Permission denied: /out/x; choose a writable folder")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run_main(raises(ZeroDivisionError("bug")))
    with pytest.raises(OSError):
        cli.run_main(raises(OSError(errno.EIO, "I/O error")))


def test_print_config_error_is_one_line_and_debug_shows_the_traceback(load_tool, capsys, monkeypatch):
    tool = load_tool("print_config")
    assert tool.main(["--set", "train.lr=0.1"]) == 2
    assert "train.optimizer.lr" in _one_line_error(capsys)
    assert tool.main(["--set", "train.lr=0.1", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --set: unknown key")
    assert tool.main(["--set", "train.lr=0.1"]) == 2  # --debug does not stick to the next call
    _one_line_error(capsys)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert tool.main(["--set", "train.lr=0.1"]) == 2
    assert "Traceback" in capsys.readouterr().err


def _to_dev_full(monkeypatch, pattern=""):
    """Atomic writes of detection.io whose name contains ``pattern`` land on /dev/full (a full disk)."""
    real = os.fdopen

    def fdopen(fd, mode="r", **kwargs):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if not (name.endswith(detection.io.TMP_SUFFIX) and pattern in name):
            return real(fd, mode, **kwargs)
        os.close(fd)
        return open("/dev/full", mode, **kwargs)  # noqa: SIM115 - closed by the caller

    monkeypatch.setattr(detection.io.os, "fdopen", fdopen)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("pattern", ["", ".pth."])
def test_full_disk_names_the_path_and_the_bytes(load_tool, capsys, monkeypatch, tmp_path, pattern):
    _to_dev_full(monkeypatch, pattern)  # every output file, or only the checkpoint (after one iteration)
    out = tmp_path / "run"
    code = load_tool("train_det").main([
        "--config", TINY, "--output-dir", str(out), "--set", f"data.shapes.cache_dir={tmp_path / 'shapes'}",
        "train.max_iters=1", "eval.num_vis_images=0", "data.shapes.num_val=0",
    ])
    line = _one_line_error(capsys, after_log=True)
    assert code == 2
    assert f"no space left on the disk of '{out}' while writing" in line
    assert re.search(r"it needed at least [\d,]+ bytes", line)
    if pattern:
        assert "while writing 'model_" in line
    assert not [p for p in out.iterdir() if p.name.endswith(detection.io.TMP_SUFFIX)]


def test_read_only_output_folder_is_named(load_tool, capsys, monkeypatch, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()

    def refusing(real):  # what a read-only mount answers (chmod does not stop root)
        def call(path, *args, **kwargs):
            if str(path).startswith(str(locked)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "mkdir", refusing(os.mkdir))
    monkeypatch.setattr(os, "open", refusing(os.open))
    code = load_tool("train_det").main([
        "--config", TINY, "--output-dir", str(locked / "run"),
        "--set", f"data.shapes.cache_dir={tmp_path / 'shapes'}", "train.max_iters=1",
    ])
    line = _one_line_error(capsys)
    assert code == 2
    assert str(locked / "run") in line and "writable" in line


def _coco(tmp_path, coco128, edit) -> Path:
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    edit(data)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path




def test_dataset_and_checkpoint_errors_are_exit_2(capsys):
    from detection.checkpoint import CheckpointError
    from detection.data import DatasetError

    for exc in (DatasetError("ann.json: image 9: height must be an int"), CheckpointError("x.pth: not a checkpoint")):
        def body(exc=exc):
            raise exc
        assert cli.run_main(body) == 2
        assert _one_line_error(capsys) == f"error: {exc}"


@pytest.mark.parametrize("case", [
    "height_abc",
    "no_annotations",
])
def test_bad_dataset_is_exit_2(load_tool, coco128, capsys, tmp_path, case):
    def edit(data):
        if case == "height_abc":
            data["images"][0]["height"] = "abc"
        else:
            data["annotations"] = []

    ann = _coco(tmp_path, coco128, edit)
    code = load_tool("train_det").main([
        "--config", TINY, "--output-dir", str(tmp_path / "run"),
        "--set", "data.source=coco", f"data.train.ann_file={ann}", f"data.train.img_dir={coco128 / 'images'}",
        f"data.val.ann_file={ann}", f"data.val.img_dir={coco128 / 'images'}", "train.max_iters=1",
    ])
    line = _one_line_error(capsys)
    assert code == 2
    assert "ann.json" in line


@pytest.mark.parametrize("text", [b"hello world", b"epoch: 3", b"\x80\x04K\x65."])
def test_resume_from_a_file_that_is_no_checkpoint(load_tool, capsys, tmp_path, text):
    bogus = tmp_path / "model.pth"
    bogus.write_bytes(text)
    code = load_tool("train_det").main([
        "--config", TINY, "--output-dir", str(tmp_path / "run"), "--resume", str(bogus),
        "--set", f"data.shapes.cache_dir={tmp_path / 'shapes'}", "train.max_iters=1",
    ])
    line = _one_line_error(capsys)
    assert code == 2
    assert str(bogus) in line


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A state dict of the tiny_cpu detector (untrained, 3 classes + background), for eval_det and infer_det."""
    import torch

    from detection.config import load_config
    from detection.trainer import build_model

    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save(build_model(load_config(TINY, []), num_classes=4).state_dict(), path)
    return path


def _tool_argv(tool, out, tmp_path, coco128, weights):
    """Arguments that get ``tool`` as far as creating its output folder ``out``."""
    ann = coco128 / "annotations" / "instances.json"
    image = sorted((coco128 / "images").iterdir())[0]
    if tool == "train_det":
        return ["--config", TINY, "--set", f"data.shapes.cache_dir={tmp_path / 'shapes'}", "train.max_iters=1",
                "--output-dir", str(out)]
    if tool == "eval_det":
        return ["--config", TINY, "--weights", str(weights), "--output-dir", str(out)]
    if tool == "eval_det --results":
        results = tmp_path / "results.json"
        results.write_text(json.dumps([{"image_id": int(image.stem), "category_id": 1, "bbox": [1, 2, 3, 4],
                                        "score": 0.9}]))
        return ["--results", str(results), "--ann", str(ann), "--only-result-images", "--output-dir", str(out)]
    return ["--config", TINY, "--weights", str(weights), "--input", str(image), "--output-dir", str(out)]


TOOLS = ["train_det", "eval_det", "eval_det --results", "infer_det"]
WHAT_TO_CHANGE = "; choose a writable --output-dir (or output_dir in the config)"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("tool", TOOLS)
def test_output_folder_that_cannot_be_created_says_why_and_what_to_change(load_tool, coco128, tiny_weights, capsys,
                                                                          tmp_path, tool):
    argv = _tool_argv(tool, "/proc/run/x", tmp_path, coco128, tiny_weights)
    assert load_tool(tool.split()[0]).main(argv) == 2
    assert _one_line_error(capsys, after_log=True) == (
        "error: cannot create output folder /proc/run/x: /proc does not accept new folders (No such file or "
        "directory)" + WHAT_TO_CHANGE
    )


@pytest.mark.parametrize("tool", TOOLS)
def test_a_file_in_the_way_of_the_output_folder(load_tool, coco128, tiny_weights, capsys, tmp_path, tool):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" / "run"
    assert load_tool(tool.split()[0]).main(_tool_argv(tool, out, tmp_path, coco128, tiny_weights)) == 2
    line = _one_line_error(capsys, after_log=True)
    assert line == f"error: cannot create output folder {out}: {tmp_path / 'taken'} is a file, not a folder" + WHAT_TO_CHANGE


@pytest.mark.parametrize("tool", TOOLS)
def test_read_only_folders(load_tool, coco128, tiny_weights, capsys, tmp_path, tool):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("chmod does not deny this user (root with CAP_DAC_OVERRIDE)")
    main = load_tool(tool.split()[0]).main
    out = locked / "run"  # to be created in a read-only folder
    assert main(_tool_argv(tool, out, tmp_path, coco128, tiny_weights)) == 2
    assert _one_line_error(capsys, after_log=True) == (
        f"error: cannot create output folder {out}: Permission denied" + WHAT_TO_CHANGE
    )
    assert main(_tool_argv(tool, locked, tmp_path, coco128, tiny_weights)) == 2  # a read-only output folder
    line = _one_line_error(capsys, after_log=True)
    assert f"{locked}/" in line and "Permission denied" in line and "choose a writable" in line, line


def test_print_config_creates_no_output_folder(load_tool, capsys):
    assert load_tool("print_config").main(["--config", TINY, "--set", "output_dir=/proc/run/x"]) == 0
    assert "output_dir: /proc/run/x" in capsys.readouterr().out
