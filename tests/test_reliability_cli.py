"""Every CLI (train, evaluate, demo_build, precompute, report, import): an expected failure ends with one
paragraph ``error: ...`` naming the file and the fix, exit status 2, no traceback, nothing written.

Most faults are driven through each CLI's ``main`` in this process (fast); one subprocess per CLI proves
the ``python -m`` entry point exits 2 without a traceback. Unit tier: no demo build.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reliability_helpers import ENV, REPO, expected_failure, rewrite_config, small_mmoe_checkpoint

SMALL_OPTS = [
    "--steps",
    "1",
    "--batch-size",
    "4",
    "--no-progress",
    "--opt",
    "encoder=tiny-32",
    "--opt",
    "image_dim=8",
    "--opt",
    "text_hidden=8",
    "--opt",
    "image_hidden=8",
    "--opt",
    "cross_hidden=8",
    "--opt",
    "expert_mult=1",
]


def call(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a CLI main run in this process (argparse's own errors exit through SystemExit)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as stop:
        rc = stop.code
    return rc, capsys.readouterr().err


def leftovers(folder) -> list[str]:
    """Hidden staging / temporary entries a failed writer would have left in ``folder``."""
    return (
        sorted(p.name for p in folder.iterdir() if ".staging" in p.name or p.name.endswith(".tmp"))
        if folder.is_dir()
        else []
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmoe_core.data.generate import generate_entity_world

    return generate_entity_world(tmp_path_factory.mktemp("world") / "entity", scale="tiny", progress=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return small_mmoe_checkpoint(tmp_path_factory.mktemp("ckpt") / "good")


def broken_world(world, tmp_path):
    """A copy of the world whose KB file is cut in the middle (pictures linked, not copied)."""
    copy = tmp_path / "broken"
    copy.mkdir()
    for p in world.iterdir():
        (copy / p.name).symlink_to(p, target_is_directory=p.is_dir()) if p.is_dir() else shutil.copy(p, copy / p.name)
    text = (copy / "kb_entity.json").read_text()
    (copy / "kb_entity.json").write_text(text[: len(text) // 2])
    return copy


# ------------------------------------------------------------------------------ faulty checkpoints


def _copy(good, tmp_path, name="bad"):
    return shutil.copytree(good, tmp_path / name)


def truncated(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ckpt


def pickled(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    state = {k: v.clone() for k, v in load_file(str(ckpt / "model.safetensors")).items()}  # not the mmap
    torch.save(state, ckpt / "model.safetensors")
    return ckpt


def with_value(value):
    def make(good, tmp_path):
        ckpt = _copy(good, tmp_path)
        state = {k: v.clone() for k, v in load_file(str(ckpt / "model.safetensors")).items()}  # not the mmap
        name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
        state[name].view(-1)[0] = value
        save_file(state, str(ckpt / "model.safetensors"))
        return ckpt

    return make


def disagreeing(good, tmp_path):
    return rewrite_config(_copy(good, tmp_path), lambda c: c["model"].update(text_hidden=16))


def absurd(good, tmp_path):
    return rewrite_config(_copy(good, tmp_path), lambda c: c["model"].update(cross_hidden=1_000_000_000))


def huge_extra(good, tmp_path):
    return rewrite_config(_copy(good, tmp_path), lambda c: c["model"]["encoder"]["extra"].update(text_width=10**6))


def no_config(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    (ckpt / "config.json").unlink()
    return ckpt


def not_json(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    (ckpt / "config.json").write_text('{"family": "mmoe", "model": ')
    return ckpt


def unknown_family(good, tmp_path):
    return rewrite_config(_copy(good, tmp_path), lambda c: c.update(family="nope"))


FAULTY = {  # fault -> (make the checkpoint, words the message must hold)
    "missing folder": (lambda good, tmp_path: tmp_path / "nowhere", ["no such checkpoint folder"]),
    "empty folder": (lambda good, tmp_path: (tmp_path / "empty").mkdir() or tmp_path / "empty", ["not a checkpoint"]),
    "no config.json": (no_config, ["not a checkpoint"]),
    "config not JSON": (not_json, ["invalid JSON", "config.json"]),
    "unknown family": (unknown_family, ["'nope'", "config.json"]),
    "truncated weights": (truncated, ["truncated", "model.safetensors"]),
    "pickle as weights": (pickled, ["not a safetensors file", "model.safetensors", "convert"]),
    "NaN weights": (with_value(math.nan), ["NaN or Inf", "model.safetensors"]),
    "Inf weights": (with_value(math.inf), ["NaN or Inf"]),
    "config and weights disagree": (disagreeing, ["do not fit", "text_module"]),
    "absurd size": (absurd, ["cross_hidden = 1000000000", "16,384", "config.json"]),
    "huge encoder extra": (huge_extra, ["text_width = 1000000", "config.json"]),
}


@pytest.mark.parametrize("fault", sorted(FAULTY))
def test_evaluate_refuses_a_faulty_checkpoint(fault, good, world, tmp_path, capsys):
    from mmoe_core import evaluate

    make, words = FAULTY[fault]
    ckpt = make(good, tmp_path)
    message = expected_failure(call(evaluate.main, [ckpt, "--data", world, "--no-progress"], capsys), *words)
    if fault != "missing folder":
        assert str(ckpt) in message


def test_evaluate_refuses_bad_data_and_options(good, world, tmp_path, capsys):
    from mmoe_core import evaluate

    expected_failure(
        call(evaluate.main, [good, "--data", broken_world(world, tmp_path), "--no-progress"], capsys),
        "kb_entity.json",
        "invalid JSON",
    )
    expected_failure(call(evaluate.main, [good, "--data", world, "--modalities", "smell"], capsys), "--modalities")
    expected_failure(call(evaluate.main, [good, "--data", world, "--batch-size", "0"], capsys), "--batch-size")
    expected_failure(call(evaluate.main, [good, "--data", world, "--split", "nope"], capsys), "DEMO_nope.json")


TRAIN_FAULTS = {  # fault -> (extra argv, words)
    "no steps": (["--steps", "0"], ["steps = 0"]),
    "opt without =": (["--opt", "oops"], ["--opt expects key=value"]),
    "absurd size": (["--opt", "cross_hidden=1000000000"], ["cross_hidden = 1000000000"]),
    "huge within range": (["--opt", "cross_hidden=16384", "--opt", "expert_mult=64"], ["parameters", "to train"]),
    "unknown encoder": (["--opt", "encoder=tiny-9"], ["unknown tiny encoder"]),
    "unknown option": (["--opt", "colour=red"], ["unknown MMoE model options"]),
    "bad device": (["--device", "toaster"], ["device 'toaster'"]),
    "top-k above experts": (["--top-k", "9"], ["top_k = 9"]),
}


@pytest.mark.parametrize("fault", sorted(TRAIN_FAULTS))
def test_train_refuses_bad_options_and_writes_nothing(fault, world, tmp_path, capsys):
    from mmoe_core import train

    extra, words = TRAIN_FAULTS[fault]
    out = tmp_path / "out" / "ckpt"
    expected_failure(
        call(train.main, ["--family", "mmoe", "--data", world, "--out", out, *SMALL_OPTS, *extra], capsys), *words
    )
    assert not out.exists() and leftovers(out.parent) == []


def test_train_refuses_bad_data_and_a_folder_that_is_not_a_checkpoint(world, tmp_path, capsys):
    from mmoe_core import train

    out = tmp_path / "ckpt"
    for data, words in ((tmp_path / "nowhere", ["nowhere"]), (broken_world(world, tmp_path), ["kb_entity.json"])):
        expected_failure(
            call(train.main, ["--family", "mmoe", "--data", data, "--out", out, *SMALL_OPTS], capsys), *words
        )
        assert not out.exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    expected_failure(
        call(train.main, ["--family", "mmoe", "--data", world, "--out", notes, *SMALL_OPTS], capsys),
        str(notes),
        "not a checkpoint",
    )
    assert (notes / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("fault", ["missing folder", "truncated weights", "NaN weights", "absurd size"])
def test_precompute_refuses_a_faulty_checkpoint_and_writes_nothing(fault, good, world, tmp_path, capsys):
    from analysis import precompute

    make, words = FAULTY[fault]
    ckpt, root = make(good, tmp_path), tmp_path / "root"
    words = ["no checkpoint at"] if fault == "missing folder" else words
    expected_failure(
        call(
            precompute.main,
            ["--run", "r", "--checkpoint", ckpt, "--data", world, "--root", root, "--device", "cpu"],
            capsys,
        ),
        *words,
    )
    assert not root.exists()


def test_precompute_refuses_bad_data_and_options(good, world, tmp_path, capsys):
    from analysis import precompute

    root = tmp_path / "root"
    base = ["--checkpoint", good, "--root", root, "--device", "cpu"]
    expected_failure(call(precompute.main, ["--run", "r", *base, "--data", tmp_path / "nowhere"], capsys), "nowhere")
    expected_failure(
        call(precompute.main, ["--run", "r", *base, "--data", broken_world(world, tmp_path)], capsys), "kb_entity.json"
    )
    expected_failure(call(precompute.main, ["--run", "../escape", *base, "--data", world], capsys), "--run")
    expected_failure(
        call(precompute.main, ["--run", "r", *base, "--data", world, "--batch-size", "0"], capsys), "--batch-size"
    )
    expected_failure(
        call(precompute.main, ["--run", "r", *base, "--data", world, "--device", "toaster"], capsys), "--device"
    )
    assert not root.exists()


def test_import_refuses_bad_files_and_writes_nothing(tmp_path, capsys):
    from mmoe_core.families.mmoe import import_mmoe

    out = tmp_path / "imported"
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    cut = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:300])
    nan = tmp_path / "nan.safetensors"
    save_file({"matcher.w": torch.tensor([1.0, math.nan])}, str(nan))
    for path, words in (
        (tmp_path / "nowhere.ckpt", ["no such file"]),
        (text, ["notes.pt"]),
        (cut, ["cut.pt"]),
        (nan, ["NaN or Inf", "nan.safetensors"]),
    ):
        expected_failure(call(import_mmoe.main, [path, "--out", out, "--top-k", "3"], capsys), *words)
        assert not out.exists() and leftovers(tmp_path) == []
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    expected_failure(call(import_mmoe.main, [nan, "--out", notes, "--top-k", "3"], capsys), "not a checkpoint")
    assert (notes / "a.txt").read_text() == "keep"


def test_report_refuses_missing_partial_runs_and_bad_out(tmp_path, capsys):
    import pandas as pd

    from analysis import report
    from analysis.store import RunWriter

    root = tmp_path / "root"
    expected_failure(
        call(report.main, ["--run", "nope", "--root", root, "--out", tmp_path / "r.html"], capsys),
        "nope",
        "python -m analysis.precompute",
    )
    expected_failure(call(report.main, ["--run", "../x", "--root", root], capsys), "not a run name")
    with RunWriter("r", root=root) as w:
        w.write_table("examples", pd.DataFrame({"example_index": [0, 1]}))
    expected_failure(
        call(report.main, ["--run", "r", "--root", root, "--out", tmp_path / "no" / "r.html"], capsys),
        str(tmp_path / "no"),
    )
    (root / "runs" / "r" / "examples.parquet").unlink()
    expected_failure(
        call(report.main, ["--run", "r", "--root", root, "--out", tmp_path / "r.html"], capsys),
        "partial",
        "examples.parquet",
    )
    assert not (tmp_path / "r.html").exists() and leftovers(tmp_path) == []


def test_demo_build_refuses_unknown_runs_and_bad_options(tmp_path, capsys, monkeypatch):
    import demo_build

    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path / "artifacts"))
    expected_failure(call(demo_build.main, ["--only", "nope", "--scale", "tiny"], capsys), "unknown run 'nope'")
    expected_failure(call(demo_build.main, ["--jobs", "0"], capsys), "--jobs")
    expected_failure(call(demo_build.main, ["--scale", "huge"], capsys), "huge")
    assert not (tmp_path / "artifacts").exists()


def test_a_real_bug_keeps_its_traceback(good, world, monkeypatch):
    """Only expected failures are turned into 'error:' lines: anything else propagates with its traceback."""
    from mmoe_core import evaluate

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(evaluate, "load_adapter", broken)
    with pytest.raises(ZeroDivisionError):
        evaluate.main([str(good), "--data", str(world)])


def test_every_cli_exits_2_without_a_traceback(good, world, tmp_path):
    """The ``python -m`` entry points, one expected failure each, run side by side."""
    bad = pickled(good, tmp_path)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    runs = {
        "mmoe_core.train": (
            ["--family", "mmoe", "--data", tmp_path / "nowhere", "--out", tmp_path / "o", *SMALL_OPTS],
            ["nowhere"],
        ),
        "mmoe_core.evaluate": ([bad, "--data", world], ["not a safetensors file"]),
        "analysis.precompute": (
            ["--run", "r", "--checkpoint", bad, "--data", world, "--root", tmp_path / "root"],
            ["not a safetensors file"],
        ),
        "analysis.report": (["--run", "nope", "--root", tmp_path / "root"], ["nope"]),
        "mmoe_core.families.mmoe.import_mmoe": ([text, "--out", tmp_path / "imp", "--top-k", "3"], ["notes.pt"]),
        "demo_build": (["--only", "nope", "--scale", "tiny"], ["unknown run 'nope'"]),
    }
    env = {**ENV, "MOESCOPE_ARTIFACTS": str(tmp_path / "artifacts")}
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-m", m, *map(str, argv)],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for m, (argv, _) in runs.items()
    }
    for module, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        expected_failure((proc.returncode, err), *runs[module][1])
    assert not (tmp_path / "o").exists() and not (tmp_path / "imp").exists() and not (tmp_path / "root").exists()
    assert json.loads((good / "config.json").read_text())["family"] == "mmoe"
