"""The `w2v2` command: one flag style (absl) for every subcommand, packaged configs by name, clear errors."""
import os
import subprocess
import sys

import pytest

from w2v2_jax import cli, configs


def test_console_script_returns_none_so_its_exit_status_is_zero(tmp_path, capsys):
  """setuptools' script does sys.exit(main()): a returned report would become exit status 1."""
  (tmp_path / "a.txt").write_text("HELLO WORLD\nA CAT\n")
  assert cli.main(["build-lm", f"--text={tmp_path / 'a.txt'}", f"--out={tmp_path / 'lm.arpa'}", "--order=2"]) is None
  assert cli.run(["build-lm", f"--text={tmp_path / 'a.txt'}", f"--out={tmp_path / 'lm.arpa'}", "--order=2"])[
      "sentences"] == 2


def test_help_lists_every_subcommand_with_its_purpose(capsys):
  cli.main(["--help"])
  out = capsys.readouterr().out
  for name, cmd in cli.COMMANDS.items():
    assert f"  {name} " in out and cmd.purpose in out and f"w2v2 {name} {cmd.usage}" in out
  assert set(cli.COMMANDS) == {"pretrain", "finetune", "evaluate", "transcribe", "manifest", "pack", "convert",
                               "make-corpus", "build-lm", "demo", "compile-check"}


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_absl_help(name, capsys):
  assert cli.main([name, "--help"]) is None
  out = capsys.readouterr().out
  assert out.startswith(f"usage: w2v2 {name} ")
  if name not in ("convert",):
    assert "--" in out.split("flags:", 1)[1]      # its flags, with their help


def test_packaged_configs_by_name_and_own_files_by_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  resolved = configs.resolve("finetune:base_10m")
  path, arg = resolved.rsplit(":", 1)
  assert arg == "base_10m" and os.path.isfile(path)
  assert path == os.path.join(os.path.dirname(configs.__file__), "finetune.py")
  assert configs.resolve("pretrain") == configs.path("pretrain")
  assert configs.resolve("my/own.py:x") == "my/own.py:x"
  (tmp_path / "model").write_text("")          # a file of that name in the working directory wins
  assert configs.resolve("model:base") == "model:base"
  assert configs.get("finetune", "small_1h").train.best_metric == "cer"
  assert configs.get("finetune", "small_10m").train.best_metric == "cer"     # as the demo compares its arms
  assert configs.get("finetune", "base_10m").train.best_metric == "wer"      # the paper's recipes: WER
  with pytest.raises(ValueError, match="unknown packaged config 'pretrian'"):
    configs.get("pretrian", "base")


def test_flag_spelling_is_normalised():
  assert cli._normalized(["--batch-seconds", "2", "--valid-percent=0.1", "--config", "pretrain:tiny",
                          "--config.train.steps=3", "a-file.wav", "--alpha=-0.5"]) == [
      "--batch_seconds", "2", "--valid_percent=0.1", "--config", configs.path("pretrain") + ":tiny",
      "--config.train.steps=3", "a-file.wav", "--alpha=-0.5"]
  assert cli._normalized(["--config=finetune:tiny"]) == ["--config=" + configs.path("finetune") + ":tiny"]


def test_bad_invocations_exit_with_a_message_naming_the_problem(capsys):
  with pytest.raises(SystemExit, match="unknown subcommand 'pretrian'"):
    cli.main(["pretrian"])
  with pytest.raises(SystemExit, match="Unknown command line flag 'nosuch'"):
    cli.main(["manifest", "--root=x", "--out=y", "--nosuch=1"])
  with pytest.raises(SystemExit, match="--out"):
    cli.main(["manifest", "--root=x"])
  with pytest.raises(SystemExit, match="unexpected argument.*stray"):
    cli.main(["manifest", "--root=x", "--out=y", "stray"])
  with pytest.raises(SystemExit, match="expected SRC OUT_DIR"):
    cli.main(["convert", "only_one"])
  with pytest.raises(SystemExit, match="no input files"):
    cli.main(["transcribe", "--checkpoint=x"])
  with pytest.raises(SystemExit, match="config"):
    cli.main(["pretrain", "--workdir=x"])


def test_config_overrides_reach_the_config(tmp_path, monkeypatch):
  """--config=NAME:ARG plus --config.FIELD overrides, as the training commands receive them."""
  seen = {}
  monkeypatch.setitem(cli.COMMANDS, "pretrain", cli.COMMANDS["pretrain"].__class__(
      *[getattr(cli.COMMANDS["pretrain"], f) for f in ("usage", "purpose", "define")],
      run=lambda fv, args: seen.update(config=fv.config, workdir=fv.workdir)))
  cli.main(["pretrain", "--config=pretrain:tiny", "--config.train.steps=7", f"--workdir={tmp_path}",
            "--config.data.train_manifest=x.tsv"])
  assert seen["config"].train.steps == 7 and seen["config"].data.train_manifest == "x.tsv"
  assert seen["workdir"] == str(tmp_path)
  assert seen["config"].model.encoder_layers == configs.get("pretrain", "tiny").model.encoder_layers


def test_console_script_runs_outside_the_checkout(tmp_path):
  """`python -m w2v2_jax.cli` from another directory: the packaged configs need no checkout."""
  proc = subprocess.run([sys.executable, "-m", "w2v2_jax.cli", "compile-check", "--help"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0 and "--topology" in proc.stdout, proc.stderr
