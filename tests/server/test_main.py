"""Flags and their MAGISTREAM_* environment fallbacks."""

from __future__ import annotations

from server.__main__ import _configure, build_parser, env_name, main


def test_env_fills_in_flags_and_the_command_line_wins():
    env = {"MAGISTREAM_MAX_SESSIONS": "3", "MAGISTREAM_GRACE_PERIOD_S": "2.5"}
    args = build_parser(env).parse_args([])
    assert (args.max_sessions, args.grace_period_s, args.port) == (3, 2.5, 50051)
    assert build_parser(env).parse_args(["--max-sessions", "5"]).max_sessions == 5
    assert env_name("--memory-budget-mb") == "MAGISTREAM_MEMORY_BUDGET_MB"


def test_flags_become_the_configs(tiny_folder, tmp_path):
    args = build_parser({}).parse_args(
        [
            "--model",
            str(tiny_folder),
            "--max-width",
            "128",
            "--max-height",
            "128",
            "--memory-budget-mb",
            "64",
            "--cache",
            str(tmp_path),
        ]
    )
    config, model, encoding = _configure(args)
    assert model.name == "tiny" and model.preset == "tiny"
    assert config.worker.memory_budget_bytes == 64 << 20 and config.worker.write_preset is None
    assert config.limits.max_width_px == 128 and encoding.preset == "veryfast"
    args = build_parser({}).parse_args(["--model", "tiny_distill", "--cache", str(tmp_path)])
    config, model, _ = _configure(args)
    assert config.worker.model_folder == tmp_path / "models" / "tiny_distill"
    assert config.worker.write_preset == "tiny_distill" and model.distill


def test_bad_settings_exit_2_with_a_message(tmp_path, capsys):
    assert main(["--max-sessions", "0", "--cache", str(tmp_path)], env={}) == 2
    assert main(["--model", "24B_base", "--cache", str(tmp_path)], env={}) == 2
    assert "no embedded weights" in capsys.readouterr().err
