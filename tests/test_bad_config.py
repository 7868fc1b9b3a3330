"""Bad configurations end in one clear error line from ``r1v3``, never a library traceback."""

import pytest

from r1v3.cli import main
from test_cli import r1v3, write_config


def run(capsys, argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # jsonargparse reports parse errors by exiting
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    (["--model.init_args.bogus_option", "1"], "bogus_option"),
    (["--trainer.max_steps", "many"], "max_steps"),
])
def test_unknown_keys_and_wrong_types_are_parse_errors(tmp_path, tiny_dirs, synth_dir, capsys, override, message):
    config = write_config(tmp_path, tiny_dirs, synth_dir)
    code, err = run(capsys, ["fit", "--config", config, *override])
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    (["--model.init_args.trainable", "[vision, projector]"], "projector"),
    (["--data.init_args.max_prompt_length", "12"], "max_prompt_length"),
])
def test_config_mistakes_are_one_line(tmp_path, tiny_dirs, synth_dir, override, message):
    config = write_config(tmp_path, tiny_dirs, synth_dir)
    out = r1v3("fit", "--config", config, "--trainer.max_steps", 1, *override)
    errors = [line for line in out.stderr.splitlines() if line.startswith("r1v3: error:")]
    assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_grpo_group_of_one_is_one_line(tmp_path, tiny_dirs, synth_dir):
    config = write_config(tmp_path, tiny_dirs, synth_dir)
    out = r1v3("fit", "--config", config, "--model", "r1v3.stages.grpo.GRPOStage",
               "--model.init_args.model_path", tiny_dirs["internvl"], "--model.init_args.sampling.n", 1)
    errors = [line for line in out.stderr.splitlines() if line.startswith("r1v3: error:")]
    assert out.returncode == 2 and len(errors) == 1 and "at least 2" in errors[0], out.stderr[-2000:]


@pytest.mark.parametrize("where, key, closest", [
    ("override", "model.init_args.max_new_tokenz", "model.init_args.max_new_tokens"),
    ("override", "trainer.max_stepz", "trainer.max_steps"),
    ("yaml", "trainer.log_every_n_stepz", "trainer.log_every_n_steps"),
    ("override", "model.init_args.dtype", "model.init_args.load.dtype"),  # moved into the load block
])
def test_a_misspelled_key_is_one_line_naming_the_closest(tmp_path, tiny_dirs, synth_dir, capsys, where, key, closest):
    config = write_config(tmp_path, tiny_dirs, synth_dir)
    argv = ["fit", "--config", config]
    if where == "yaml":
        section, _, name = key.partition(".")
        config.write_text(config.read_text().replace(f"{section}:\n", f"{section}:\n  {name}: 1\n", 1))
    else:
        argv += [f"--{key}", "3"]
    code, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("r1v3: error:") and f"'{key}'" in lines[0] and f"'{closest}'" in lines[0]


def test_a_wrong_type_is_one_line(tmp_path, tiny_dirs, synth_dir, capsys):
    config = write_config(tmp_path, tiny_dirs, synth_dir)
    code, err = run(capsys, ["fit", "--config", config, "--model.init_args.optimizer.lr", "fast"])
    assert code == 2 and err.strip().splitlines() == [
        "r1v3: error: 'model.init_args.optimizer.lr' expects float, got 'fast'"]


def test_a_stage_that_fails_to_build_shows_the_underlying_error(tmp_path, tiny_dirs, synth_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "internvl"}')  # no processor, no weights
    config = write_config(tmp_path, tiny_dirs, synth_dir)
    out = r1v3("fit", "--config", config, "--model.init_args.model_path", broken)
    errors = [line for line in out.stderr.splitlines() if line.startswith("r1v3: error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert "OSError" in errors[0] and "broken" in errors[0]
    assert "Union subtypes" not in out.stderr and "Traceback" not in out.stderr
