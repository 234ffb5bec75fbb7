import textwrap

import pytest

from mlx_med.core import config as config_lib


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent('''
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.name = "base"
        c.model = ml_collections.ConfigDict(dict(num_layers=4, dtype="float32", remat=False, lr=1e-3, axes=(1, 2)))
        c.optional = None
        if arg == "smoke":
          c.model.num_layers = 1
        elif arg not in (None, "smoke"):
          raise ValueError(f"unknown variant {arg}")
        return c
  '''))
  return str(path)


def test_variant_and_overrides(config_file):
  cfg = config_lib.get_config(config_file + ":smoke", ["model.lr=0.5", "model.remat=true", "model.axes=(3,4)",
                                                      "name=x", "optional=7"])
  assert cfg.model.num_layers == 1
  assert cfg.model.lr == 0.5 and cfg.model.remat is True and cfg.model.axes == (3, 4)
  assert cfg.name == "x" and cfg.optional == 7


@pytest.mark.parametrize("override, message", [
    ("model.num_layer=2", "unknown key 'num_layer'"),
    ("modle.num_layers=2", "unknown key 'modle'"),
    ("model.num_layers=two", "expected int"),
    ("model.num_layers=2.5", "expected int"),
    ("model.remat=maybe", "expected bool"),
    ("model=3", "is a section"),
    ("model.lr", "expected --config.key=value"),
])
def test_bad_overrides_are_clear_errors(config_file, override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.get_config(config_file, [override])


@pytest.mark.parametrize("override, expected", [
    ("model.num_layers=many", "--config.model.num_layers=many: expected int (a whole number) for model.num_layers "
                              "(the config holds 4; e.g. --config.model.num_layers=4)"),
    ("model.num_layers=1e3", "expected int (a whole number) for model.num_layers"),
    ("model.lr=fast", "--config.model.lr=fast: expected float (a number such as 0.001, 1e-3 or inf) for model.lr "
                      "(the config holds 0.001; e.g. --config.model.lr=0.001)"),
    ("model.axes=[1,", "expected tuple (a Python literal such as (1, 2)) for model.axes"),
    ("model.remat=maybe", "expected bool (true/false, yes/no, on/off, 1/0) for model.remat"),
])
def test_wrong_type_names_key_type_and_example(config_file, override, expected):
  # The message is ours: no Python parser internals (e.g. "malformed node or string <ast.Name ...>").
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.get_config(config_file, [override])
  message = str(info.value)
  assert expected in message and "\n" not in message
  assert "malformed" not in message and "ast." not in message and "object at 0x" not in message


def test_float_overrides_accept_ints_exponents_and_inf(config_file):
  for text, value in (("2", 2.0), ("1e-4", 1e-4), ("inf", float("inf")), (" 0.5 ", 0.5)):
    assert config_lib.get_config(config_file, [f"model.lr={text}"]).model.lr == value


def test_bad_files(tmp_path, config_file):
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.get_config(str(tmp_path / "missing.py"))
  with pytest.raises(config_lib.ConfigError, match="rejected variant"):
    config_lib.get_config(config_file + ":huge")
  (tmp_path / "noget.py").write_text("x = 1\n")
  with pytest.raises(config_lib.ConfigError, match="defines no get_config"):
    config_lib.get_config(str(tmp_path / "noget.py"))


def test_split_config_args():
  overrides, rest = config_lib.split_config_args(["--workdir", "w", "--config.a.b=1", "--config.c", "2"])
  assert overrides == ["a.b=1", "c=2"] and rest == ["--workdir", "w"]
