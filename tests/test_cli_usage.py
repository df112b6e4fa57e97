"""The command line as a new user meets it: help, --version, --print-config, YAML configs,
suggestions for misspelt names, one-line errors, Ctrl-C, the model preset line, generate."""

from __future__ import annotations

import json
import os

import pytest
import torch

import deqkit as dk
from deqkit.app import config, names
from deqkit.app.main import build_parser, main
from deqkit.data import available_datasets

pytest.importorskip("sklearn")

LM = ["--model", "deq_transformer", "--data", "text", "--subset", "32", "--epochs", "1",
      "--batch-size", "32", "--model-arg", "d_model=16", "--model-arg", "n_heads=2",
      "--model-arg", "d_ff=32", "--data-arg", "block_size=16", "--no-progress", "--no-plots"]


def _run(argv: list[str]) -> int:
    """``main(argv)``, with argparse's exits turned into the status."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def _one_error(capsys, argv: list[str], code: int = 2, command: str = "train") -> str:
    """Run ``argv``; assert the exit status and one stderr line ``deqkit CMD: error: ...``."""
    assert _run(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"deqkit {command}: error: "), err
    return err


def _train_help() -> dict[str, str]:
    """Each ``deqkit train`` flag and its help text."""
    parser = build_parser().subcommands["train"]
    return {s: a.help or "" for a in parser._actions for s in a.option_strings}


def test_version(capsys):
    assert _run(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"deqkit {dk.__version__} (torch ")


def test_every_train_flag_has_help_from_its_field():
    helps = _train_help()
    for flag, text in helps.items():
        if flag != "--stop-after":  # hidden testing hook
            assert text.strip(), flag
    for name, field in config.FIELDS.items():
        flag = field.metadata["flag"] or "--" + name.replace("_", "-")
        assert helps[flag].startswith(field.metadata["help"].replace("%", "%%")), flag
    assert helps["--epochs"].count("default") == 1 and "(default: 10)" in helps["--epochs"]
    assert "deq_transformer: picard" in helps["--solver"]
    for flag in ("--batch-size", "--model-arg", "--no-progress", "--no-plots", "--resume",
                 "--out", "--config", "--print-config", "--tensorboard", "--warm-start"):
        assert flag in helps, flag


def test_help_lists_models_data_forms_and_warm_start_file():
    helps = _train_help()
    for model in names.MODELS:
        assert model in helps["--model"]
    for form in available_datasets():  # digits, mnist1d, text, npz:PATH, folder:PATH
        assert form in helps["--data"], form
    assert set(config.DATA_FORMS) == set(available_datasets())
    assert "last.pt" in helps["--warm-start"] and "warm_start.pt" not in helps["--warm-start"]
    assert "RUN/tensorboard/" in helps["--tensorboard"]
    sub = build_parser().subcommands
    assert "CHECKPOINT_OR_RUN_FOLDER" in sub["eval"].format_help()
    assert "RUN_FOLDER" in sub["plot"].format_help()


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_print_config_round_trips_through_config(tmp_path, capsys, fmt):
    argv = ["train", "--model", "deq_mlp", "--lr", "0.005", "--model-arg", "width=8",
            "--grad-clip", "none" if fmt != "toml" else "2.5", "--no-plots", "--out", "runs/x"]
    assert _run([*argv, "--print-config", fmt]) == 0
    text = capsys.readouterr().out
    path = tmp_path / f"c.{fmt}"
    path.write_text(text)
    assert _run(["train", "--config", str(path), "--print-config", "json"]) == 0
    back = json.loads(capsys.readouterr().out)
    assert back["model_args"] == {"width": 8} and back["lr"] == 0.005
    assert back["plots"] is False and back["out"] == "runs/x"
    assert back["grad_clip"] == (None if fmt != "toml" else 2.5)
    assert config.from_mapping(back).to_dict() == back


def test_yaml_config_with_flag_override(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: deq_mlp\nepochs: 3\nmodel_args:\n  width: 16\n")
    assert _run(["train", "--config", str(path), "--epochs", "5", "--model-arg", "act=1",
                 "--print-config", "json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["model"], cfg["epochs"], cfg["model_args"]) == ("deq_mlp", 5,
                                                              {"width": 16, "act": 1})
    path.write_text("- not\n- a table\n")
    assert "must contain a table" in _one_error(capsys, ["train", "--config", str(path)])
    path.write_text("model: [unclosed\n")
    assert "could not be parsed" in _one_error(capsys, ["train", "--config", str(path)])


def test_misspelt_names_get_the_closest_valid_one(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "deq_mlp"\nbatch_sise = 8\n')
    err = _one_error(capsys, ["train", "--config", str(bad)])
    assert "'modle' (did you mean 'model'?)" in err
    assert "'batch_sise' (did you mean 'batch_size'?)" in err
    for argv, words in [
            (["--model", "deq_mpl"], "(did you mean 'deq_mlp'?)"),
            (["--solver", "andersen"], "(did you mean 'anderson'?)"),
            (["--adjoint", "implict"], "(did you mean 'implicit'?)"),
            (["--backward-solver", "gmers"], "(did you mean 'gmres'?)"),
            (["--batch_size", "8"], "(did you mean '--batch-size'?)"),
            (["--epcohs", "3"], "(did you mean '--epochs'?)")]:
        assert words in _one_error(capsys, ["train", *argv, "--print-config"]), argv


def test_misspelt_subcommand(capsys):
    assert _run(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deqkit: error:")
    assert "(did you mean 'train'?)" in err


def test_user_mistakes_are_one_line(tmp_path, capsys):
    out = tmp_path / "m"
    err = _one_error(capsys, ["train", "--model", "deq_mlp", "--model-arg", "widht=8",
                              "--subset", "64", "--no-progress", "--out", str(out)])
    assert "(did you mean 'width'?)" in err
    assert not out.exists()  # nothing was written for a bad config
    assert "--resume needs --out" in _one_error(capsys, ["train", "--resume"])
    assert "no run to resume" in _one_error(capsys, ["train", "--resume", "--out",
                                                     str(tmp_path / "none")])
    run = tmp_path / "empty"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.TrainConfig(model="deq_mlp").to_dict()))
    (run / "last.pt").write_bytes(b"")
    assert "empty (0 bytes)" in _one_error(capsys, ["train", "--resume", "--out", str(run)])
    assert "empty (0 bytes)" in _one_error(capsys, ["eval", str(run / "last.pt")],
                                           command="eval")
    assert "KEY=VALUE" in _one_error(capsys, ["train", "--model-arg", "width"])
    assert "invalid int value" in _one_error(capsys, ["train", "--epochs", "x"])
    assert "does not exist" in _one_error(capsys, ["train", "--config", "nope.toml"])
    wrong = tmp_path / "c.ini"
    wrong.write_text("x")
    assert "unknown extension" in _one_error(capsys, ["train", "--config", str(wrong)])
    assert "not a run folder" in _one_error(capsys, ["plot", str(tmp_path / "x")],
                                            command="plot")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def started(cfg, **kwargs):
        os.makedirs(cfg.run_dir(), exist_ok=True)
        with open(os.path.join(cfg.run_dir(), "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh)
        raise KeyboardInterrupt

    monkeypatch.setattr("deqkit.app.train.train", started)
    assert main(["train", "--model", "deq_mlp", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.err == ("deqkit train: interrupted; resume with: deqkit train --resume "
                            f"--out {out}\n")
    monkeypatch.setattr("deqkit.app.train.train", _interrupt)
    assert main(["train", "--model", "deq_mlp", "--out", str(tmp_path / "new")]) == 130
    assert capsys.readouterr().err == "deqkit train: interrupted; nothing was saved\n"
    monkeypatch.setattr("deqkit.app.train.eval_checkpoint", _interrupt)
    assert main(["eval", str(out)]) == 130
    assert capsys.readouterr().err == "deqkit eval: interrupted\n"


def test_preset_line_names_only_what_it_set(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("deqkit.app.train.train", lambda cfg, **kw: seen.append(cfg))
    assert main(["train", "--model", "deq_transformer", "--data", "text", "--solver",
                 "anderson", "--lr", "0.003"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("preset")]
    assert lines == ["preset for deq_transformer: rtol=0.0001 atol=1e-06 max_steps=1 "
                     "eval_max_steps=50 adjoint=onestep (override any with its flag)"]
    assert (seen[-1].solver, seen[-1].lr, seen[-1].adjoint) == ("anderson", 0.003, "onestep")
    assert main(["train", "--model", "conv_deq"]) == 0
    assert "preset" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> str:
    """A tiny character-level DEQ language model: one epoch on 32 blocks (a few seconds)."""
    out = str(tmp_path_factory.mktemp("lm") / "run")
    assert main(["train", *LM, "--out", out]) == 0
    return out


def _generate(capsys, run: str, *extra: str) -> str:
    assert main(["generate", run, "--prompt", "MACBETH", *extra]) == 0
    return capsys.readouterr().out


def test_generate_is_reproducible_and_of_the_right_length(lm_run, capsys):
    capsys.readouterr()
    a = _generate(capsys, lm_run, "--tokens", "12", "--seed", "3")
    b = _generate(capsys, lm_run, "--tokens", "12", "--seed", "3")
    assert a == b and a.startswith("MACBETH") and len(a) == len("MACBETH") + 12 + 1
    greedy = [_generate(capsys, lm_run, "--tokens", "20", "--temperature", "0", "--seed", s)
              for s in ("1", "2")]
    assert greedy[0] == greedy[1] and len(greedy[0]) == len("MACBETH") + 20 + 1
    top1 = _generate(capsys, lm_run, "--tokens", "20", "--top-k", "1", "--seed", "5")
    assert top1 == greedy[0]  # top-k 1 is greedy
    last = os.path.join(lm_run, "last.pt")
    assert _generate(capsys, last, "--tokens", "20", "--temperature", "0") == greedy[0]


def test_generate_errors(lm_run, tmp_path, capsys):
    base = ["generate", lm_run, "--prompt", "MACBETH"]
    for extra, words in [(["--temperature", "-1"], "--temperature"),
                         (["--temperature", "nan"], "--temperature"),
                         (["--top-k", "0"], "--top-k"), (["--tokens", "0"], "--tokens")]:
        assert words in _one_error(capsys, [*base, *extra], command="generate")
    err = _one_error(capsys, ["generate", lm_run, "--prompt", "héllo~"], command="generate")
    assert "['~', 'é']" in err
    ckpt = torch.load(os.path.join(lm_run, "last.pt"), weights_only=True)
    ckpt["config"] = {**ckpt["config"], "model": "deq_mlp", "data": "digits"}
    torch.save(ckpt, tmp_path / "mlp.pt")
    err = _one_error(capsys, ["generate", str(tmp_path / "mlp.pt"), "--prompt", "a"],
                     command="generate")
    assert "not a character-level language model" in err


def test_eval_and_plot_a_run_folder(lm_run, capsys):
    assert main(["eval", lm_run]) == 0
    assert "best.pt" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert main(["plot", lm_run]) == 0
    assert os.path.isfile(os.path.join(lm_run, "curves.png"))
