"""The command line's one rule: an error the user can act on is one line (which file, what is wrong, what to do) and
exit 2; anything else is a bug, said in one line, its traceback written to a file the line names. Every verb is
driven with broken inputs (missing and damaged files, wrong types, a full disk, a port in use) and no traceback
reaches the terminal."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from sdtrain.cli import main
from tests.conftest import tiny_overrides, write_image_folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, clip_dir, vae_dir) -> dict[str, Path]:
    """A finished tiny run (checkpoints at steps 2 and 4, ``final/``), its data, and broken files of every kind."""
    root = tmp_path_factory.mktemp("errors")
    data = write_image_folder(root / "data")
    run = root / "run"
    assert main(["train", *tiny_overrides(run, data, vae_dir, str(clip_dir), "text_encoder")]) == 0
    garbage = root / "garbage"
    garbage.mkdir()
    for i in range(12):
        (garbage / f"{i:03d}.png").write_bytes(b"not a png at all " * (i + 1))
        (garbage / f"{i:03d}.txt").write_text("a caption")
    (root / "empty").mkdir()
    (root / "not-an-image.png").write_bytes(b"hello")
    (root / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    no_checkpoint = root / "no-checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.yaml").write_text((run / "config.yaml").read_text())
    vpred = root / "v-prediction"  # the export, as a v-prediction pipeline (SD 2.x 768, the demo)
    shutil.copytree(run / "final", vpred)
    scheduler = vpred / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    return {"root": root, "data": data, "run": run, "clip": clip_dir, "vae": vae_dir, "garbage": garbage}


def _cases(w: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """Broken invocations of every verb: ``{name: (argv, what the one line must say)}``."""
    root, run, final = w["root"], w["run"], str(w["run"] / "final")
    tiny = tiny_overrides(w["new"], w["data"], w["vae"], str(w["clip"]), "text_encoder")

    def train(*overrides: str) -> list[str]:
        return ["train", *tiny, *overrides]

    return {
        "train: no such config": (["train", "--config", str(root / "nope.yaml")], "nope.yaml"),
        "train: a config that is not YAML": (["train", "--config", str(root / "bad.yaml")], "bad.yaml"),
        "train: a wrong type": (train("train.num_steps=many"), "train.num_steps"),
        "train: an unknown key": (train("train.num_stepz=3"), "num_stepz"),
        "train: no data folder": (train(f"data.path={root / 'nowhere'}"), "nowhere"),
        "train: a data folder without images": (train(f"data.path={root / 'empty'}"), "no images"),
        "train: no image decodes": (train(f"data.path={w['garbage']}"), "garbage"),
        "train: no such autoencoder": (train(f"model.vae.path={root / 'no-vae'}"), "no-vae"),
        "train: no such text encoder": (train(f"model.text_encoder.path={root / 'no-clip'}"), "no-clip"),
        "train: no such pretrained model": (train(f"model.pretrained={root / 'no-model'}"), "no-model"),
        "train: a v-prediction model trained as epsilon": (
            train(f"model.pretrained={root / 'v-prediction'}"),
            "set train.objective.prediction_type=v_prediction",
        ),
        "cache: no cache_dir": (["cache", *tiny], "data.cache_dir"),
        "train: no cache there": (train(f"data.cache_dir={root / 'no-cache'}"), "no-cache"),
        "export: no such run": (["export", "--run", str(root / "no-run")], "no-run"),
        "export: a run without checkpoints": (["export", "--run", str(root / "no-checkpoint")], "no checkpoint"),
        "export: no such step": (["export", "--run", str(run), "--step", "3"], "step-00000003"),
        "train-vae: no data folder": (
            ["train-vae", f"data.path={root / 'nowhere'}", f"train.output_dir={w['new']}"],
            "nowhere",
        ),
        "generate: no such model": (["generate", "--model", str(root / "no-model"), "a cat"], "no-model"),
        "generate: a folder that is no model": (["generate", "--model", str(w["garbage"]), "a cat"], "garbage"),
        "generate: a wrong type": (["generate", "--model", final, "--steps", "many", "a cat"], "--steps"),
        "reconstruct: no such image": (
            ["reconstruct", "--model", final, "--image", str(root / "no.png"), "a"],
            "no.png",
        ),
        "reconstruct: not an image": (
            ["reconstruct", "--model", final, "--image", str(root / "not-an-image.png"), "a"],
            "not-an-image.png",
        ),
        "evaluate: no such model": (
            ["evaluate", "--model", str(root / "no-model"), "--data", str(w["data"])],
            "no-model",
        ),
        "evaluate: no such data": (["evaluate", "--model", final, "--data", str(root / "nowhere")], "nowhere"),
        "convert: no such file": (["convert", str(root / "no.safetensors"), str(root / "out")], "no.safetensors"),
        "convert: a damaged file": (
            ["convert", str(root / "bad.safetensors"), str(root / "out"), "--config", final],
            "bad.safetensors",
        ),
        "convert: a single file without its config": (
            ["convert", str(root / "bad.safetensors"), str(root / "out")],
            "--config",
        ),
        "demo: no such config": (["demo", "--config", str(root / "nope.yaml"), "--out", str(w["new"])], "nope.yaml"),
    }


CASES = [
    "train: no such config",
    "train: a config that is not YAML",
    "train: a wrong type",
    "train: an unknown key",
    "train: no data folder",
    "train: a data folder without images",
    "train: no image decodes",
    "train: no such autoencoder",
    "train: no such text encoder",
    "train: no such pretrained model",
    "cache: no cache_dir",
    "train: no cache there",
    "export: no such run",
    "export: a run without checkpoints",
    "export: no such step",
    "train-vae: no data folder",
    "generate: no such model",
    "generate: a folder that is no model",
    "generate: a wrong type",
    "reconstruct: no such image",
    "reconstruct: not an image",
    "evaluate: no such model",
    "evaluate: no such data",
    "convert: no such file",
    "convert: a damaged file",
    "convert: a single file without its config",
    "demo: no such config",
]


@pytest.mark.parametrize("case", CASES)
def test_every_verb_with_broken_input_says_one_line_and_exits_2(case, world, tmp_path, capfd):
    """No traceback, one line that names the culprit, exit 2, and (every case here fails before any work) no run
    folder made."""
    world = {**world, "new": tmp_path / "new-run"}
    argv, named = _cases(world)[case]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal of a wrong type: usage and one error line, exit 2
        code = e.code
    err = capfd.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("sdtrain: ") or last.startswith("sdtrain ") and ": error: " in last, err[-3000:]
    assert named in last, last
    assert not (tmp_path / "new-run").exists(), "a run folder was made"


def test_serve_on_a_taken_port_names_it_and_the_flag(tmp_path, capfd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--runs", str(tmp_path), "--port", str(port)]) == 2
    err = capfd.readouterr().err
    assert (
        err.strip() == f"sdtrain: port {port} on 127.0.0.1 is in use (another server?): choose another with "
        f"--port, say --port {port + 1}"
    )


def test_a_bug_is_one_line_and_its_traceback_goes_to_the_run_folder(world, tmp_path, capfd, monkeypatch):
    """Anything not the user's to mend is said to be a bug in one line naming the file that holds the traceback: the
    run folder's errors.log where there is a run folder, else a temporary file."""
    from sdtrain.train import loop

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(loop, "_train", broken)
    run = tmp_path / "run"
    argv = ["train", *tiny_overrides(run, world["data"], world["vae"], str(world["clip"]), "text_encoder")]
    assert main(argv) == 1
    err = capfd.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line == (
        "sdtrain: internal error, a bug in sdtrain (ZeroDivisionError: division by zero); please report it with "
        f"{run / 'errors.log'}"
    ), err
    logged = (run / "errors.log").read_text()
    assert "Traceback (most recent call last)" in logged and "in broken" in logged and "ZeroDivisionError" in logged

    monkeypatch.setattr("sdtrain.sample.pipeline.Pipeline.from_pretrained", broken)  # no run folder: a temporary file
    assert main(["generate", "--model", str(world["run"] / "final"), "a cat"]) == 1
    line = capfd.readouterr().err.strip().splitlines()[-1]
    where = Path(line.rsplit(" with ", 1)[1])
    assert where.name.startswith("sdtrain-error-") and "ZeroDivisionError" in where.read_text()
    where.unlink()
