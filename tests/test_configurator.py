"""configurator.py: config files and --key=value overrides, strictly checked."""

import pytest

from configurator import configure


def settings():
    return dict(__file__="x.py", __doc__="Doc.", out_dir="out", n_layer=12, learning_rate=6e-4,
                compile=False, n_kv_head=None, prompt="", betas=(0.9, 0.95), MAX=3)


def fails(capsys, argv, scope=None):
    with pytest.raises(SystemExit) as e:
        configure(scope or settings(), argv)
    assert e.value.code not in (0, None)
    return str(e.value.code)


def test_overrides_parse_and_keep_types():
    """Values are literals where they parse, an int is fine for a float, and a None default takes anything."""
    scope = settings()
    config, explicit = configure(scope, ["--n_layer=4", "--learning_rate=1", "--n_kv_head=2", "--compile"])
    assert scope["n_layer"] == 4 and scope["learning_rate"] == 1.0 and isinstance(scope["learning_rate"], float)
    assert scope["n_kv_head"] == 2 and scope["compile"] is True
    assert explicit == {"n_layer", "learning_rate", "n_kv_head", "compile"}
    assert config["out_dir"] == "out" and "MAX" not in config and "__file__" not in config


def test_equals_sign_inside_a_value_and_strings_stay_strings():
    scope = settings()
    configure(scope, ["--prompt=a=b==c", "--out_dir=123", "--n_kv_head=none-ish"])
    assert scope["prompt"] == "a=b==c"
    assert scope["out_dir"] == "123"  # a str setting keeps the text, not the int
    assert scope["n_kv_head"] == "none-ish"


def test_unknown_key_on_command_line_names_close_matches(capsys):
    msg = fails(capsys, ["--n_layers=4"])
    assert "n_layers" in msg and "n_layer" in msg


def test_unknown_key_in_config_file(tmp_path, capsys):
    """nanoGPT silently accepts a typo inside a config file; we stop."""
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 4\nlearning_rat = 1e-3\n_helper = 5\nimport math\n")
    msg = fails(capsys, [str(cfg)])
    assert "learning_rat" in msg and "learning_rate" in msg


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\n_tokens = 2 ** 10\nn_layer = 4\nlearning_rate = 1e-3 * math.sqrt(4)\n")
    scope = settings()
    _, explicit = configure(scope, [str(cfg), "--n_layer=6"])
    assert scope["n_layer"] == 6 and scope["learning_rate"] == pytest.approx(2e-3)
    assert explicit == {"n_layer", "learning_rate"}


@pytest.mark.parametrize("argv", [["--n_layer=abc"], ["--n_layer=1.5"], ["--compile=maybe"], ["--betas=3"],
                                  ["--learning_rate=True"], ["--n_layer"], ["notaconfig"], ["missing.py"]])
def test_bad_values_fail_with_one_line(argv, capsys):
    msg = fails(capsys, argv)
    assert "\n" not in msg and msg.startswith("error:")


def test_bad_type_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 'four'\n")
    assert "n_layer" in fails(capsys, [str(cfg)])


def test_help_lists_settings_with_defaults_and_comments(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("n_layer = 12  # transformer blocks\n")
    scope = dict(__file__=str(script), __doc__="The script.", n_layer=12)
    with pytest.raises(SystemExit) as e:
        configure(scope, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "The script." in out and "--n_layer=12" in out and "# transformer blocks" in out


def test_help_shows_the_values_in_effect_and_nanogpt_names_get_ours(capsys, tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 3\n")
    with pytest.raises(SystemExit) as e:
        configure(settings(), [str(cfg), "--help", "--learning_rate=0.1"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--n_layer=3" in out and "--learning_rate=0.1" in out and "--n_layer=12" not in out
    assert "should be an integer" in fails(capsys, ["--n_layer=abc"])
    assert "use --prompt" in fails(capsys, ["--start=hello"])
    assert "save_strategy" in fails(capsys, ["--always_save_checkpoint=False"],
                                    dict(settings(), save_strategy="latest"))
