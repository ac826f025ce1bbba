"""One convention across the commands: help on every option, the output flags everywhere, one list
syntax, one --mode default, --json to stdout, progress bars only on a terminal, OS errors and late
checks as one `Error:` line naming the flag to change, the CR -> L mapping said where it rounds."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from prism_trt.cli import main
from prism_trt.cli.common import cr_mapping
from prism_trt.cli.output import Output, _onnxruntime_severity
from prism_trt.cli.runtime_cmds import check_before_join
from prism_trt.core.chain_key import ChainKey

CLI = [sys.executable, "-m", "prism_trt.cli"]
TINY_TEXT = ["--model", "gpt2", "--layers", "2", "--hidden-size", "32", "--heads", "4", "--vocab-size", "97",
             "--seq-len", "16", "--exporter", "torchscript", "--opt-batch", "2", "--max-batch", "4", "--threads", "1"]
# Commands whose result is printed: each takes --json and prints JSON alone on stdout with it.
RESULT_COMMANDS = [["build"], ["inspect"], ["info"], ["flops"], ["accuracy"], ["run"], ["profile"], ["select"],
                   ["model", "fit"], ["plot"], ["demo"], ["testbed", "up"], ["testbed", "status"]]


def commands() -> list[tuple[list[str], click.Command]]:
    found = []

    def walk(command: click.Command, path: list[str]) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                walk(sub, [*path, name])

    walk(main, [])
    return found


COMMANDS = commands()


def options(command: click.Command) -> dict[str, click.Option]:
    return {opt: param for param in command.params if isinstance(param, click.Option) for opt in param.opts}


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"build", "run", "serve", "profile", "sweep-rank0", "model fit", "testbed up", "testbed exec"} <= names


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "prism-trt" for p, _ in COMMANDS])
def test_every_option_has_help_text(path, command):
    missing = [param.opts[0] for param in command.params if isinstance(param, click.Option) and not param.help]
    assert not missing, f"`prism-trt {' '.join(path)}`: options without help: {missing}"


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "prism-trt" for p, _ in COMMANDS])
def test_every_command_takes_the_output_flags(path, command):
    assert {"-v", "--verbose", "-q", "--quiet", "--log-level"} <= set(options(command)), path


@pytest.mark.parametrize("path", RESULT_COMMANDS, ids=[" ".join(p) for p in RESULT_COMMANDS])
def test_commands_that_print_a_result_take_json(path):
    command = main
    for name in path:
        command = command.commands[name]
    flag = options(command).get("--json")
    assert flag is not None and flag.is_flag, f"`prism-trt {' '.join(path)}` has no --json flag"


def test_a_list_option_takes_repeats_and_commas_alike():
    base = ["flops", "--model", "vit_tiny_patch16_224", "--ranks", "2", "--json"]
    outputs = [CliRunner().invoke(main, base + extra, catch_exceptions=False).output
               for extra in (["--cr", "9.9", "--cr", "4.95", "-L", "3"], ["--cr", "9.9,4.95", "-L", "3"],
                             ["--cr", "9.9", "--cr", "4.95,", "--segments", "3"])]
    assert outputs[0] == outputs[1] == outputs[2]
    assert [entry["segments"] for entry in json.loads(outputs[0])["prism"]] == [10, 20, 3]


def test_run_and_serve_share_the_mode_option():
    run, serve = (options(main.commands[name])["--mode"] for name in ("run", "serve"))
    assert run.default is None and serve.default is None
    default = "[default: prism with --cr, else local]"
    assert run.help.endswith(default + ".") and serve.help.endswith(default + ".")
    assert serve.help.startswith(run.help[:run.help.index(default)].rstrip())
    assert set(serve.type.choices) - set(run.type.choices) == {"auto"}


def test_the_cr_mapping_line_says_what_a_rounded_cr_became():
    assert cr_mapping(9.9, ChainKey.for_cr(9.9, 50, 2)) == "--cr 9.9 -> L=3, prism-cr8.33"
    assert cr_mapping(5, ChainKey.for_cr(5, 50, 2)) is None  # built as typed
    seen: dict = {}
    assert cr_mapping(5, ChainKey.for_cr(5, 50, 2), seen) is None
    assert cr_mapping(4.95, ChainKey.for_cr(4.95, 50, 2), seen) == "--cr 4.95 -> L=5, prism-cr5 (the chain of --cr 5)"


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A two-rank tiny GPT-2 build (N = 16, 8 tokens a rank) with --cr 3 (L = 3, CR 2.67), built
    by the CLI without a terminal and without -q: the result alone on stdout."""
    out = tmp_path_factory.mktemp("conventions") / "engines"
    result = subprocess.run([*CLI, "build", *TINY_TEXT, "--ranks", "2", "--cr", "3", "--out", str(out), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out, result


def test_build_says_the_mapping_and_draws_no_progress_bar_off_a_terminal(tiny_build):
    out, result = tiny_build
    assert "--cr 3 -> L=3, prism-cr2.67" in result.stderr
    assert "stage/s" not in result.stderr and "it/s" not in result.stderr  # tqdm's frames
    report = json.loads(result.stdout)  # stdout is the JSON alone
    assert {stage["config"] for stage in report["stages"]} == {"local", "voltage", "prism-cr2.67"}


@pytest.mark.parametrize("argv, says", [
    (["--cr", "3", "--batch", "64"], ["--batch 64", "max batch 4"]),
    (["--cr", "7"], ["--cr 7 -> L=1, prism-cr8", "no prism-cr8 engines", "prism-cr2.67"]),
    (["--mode", "local", "--cr", "3"], ["--cr applies to prism mode only"]),
])
@pytest.mark.parametrize("rank", [0, 1])
def test_run_checks_chain_cr_and_batch_before_joining_on_every_rank(tiny_build, argv, says, rank):
    out, _ = tiny_build
    started = time.monotonic()
    result = subprocess.run([*CLI, "run", "--engines", str(out), "--rank", str(rank), "--world-size", "2",
                             "--master-port", "1", "--timeout", "60", *argv], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 50  # no join was tried (its timeout is 60 s)
    for text in says:
        assert text in result.stderr


def test_the_chain_is_mapped_once_and_said_on_rank_0(tiny_build, capsys):
    out, _ = tiny_build
    key = check_before_join(out, 0, "prism", 3.0, batch=4)
    assert key == ChainKey.prism(3, 16, 2) and key.label == "prism-cr2.67"
    assert capsys.readouterr().err.strip() == "--cr 3 -> L=3, prism-cr2.67"
    assert check_before_join(out, 1, "local", None) == ChainKey.local()  # workers hold no local chain


def test_a_port_in_use_is_an_error_naming_the_flag(tiny_build):
    out, _ = tiny_build
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([*CLI, "serve", "--engines", str(out), "--port", str(port), "--threads", "1"],
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"Error: --port {port}" in result.stderr and "in use" in result.stderr


def test_a_path_the_os_refuses_is_an_error_naming_the_flag(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run([*CLI, "build", *TINY_TEXT, "--ranks", "1", "--out", str(blocker / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Error: --out" in result.stderr and str(blocker) in result.stderr


def test_shell_completion_is_click_s():
    result = subprocess.run(CLI, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "_PRISM_TRT_COMPLETE": "bash_source"})
    assert result.returncode == 0 and "_prism_trt_completion" in result.stdout, result.stderr


@pytest.mark.parametrize("argv, ours, others", [
    ([], logging.INFO, logging.WARNING),
    (["-q"], logging.WARNING, logging.ERROR),
    (["-v"], logging.INFO, logging.INFO),
    (["-vv"], logging.DEBUG, logging.DEBUG),
    (["--log-level", "error"], logging.ERROR, logging.ERROR),
])
@pytest.mark.parametrize("where", ["group", "command"])
def test_the_output_flags_set_the_log_levels_before_or_after_the_command(argv, ours, others, where):
    command = ["info", "--model", "vit_tiny_patch16_224"]
    line = [*argv, *command] if where == "group" else [*command, *argv]
    result = CliRunner().invoke(main, line, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (logging.getLogger("prism_trt").level, logging.getLogger().level) == (ours, others)


def test_onnxruntime_logs_errors_only_unless_asked():
    assert _onnxruntime_severity(Output(0), logging.WARNING) == 3  # its per-session warnings stay off
    assert _onnxruntime_severity(Output(1), logging.INFO) == 2
    assert _onnxruntime_severity(Output(2), logging.DEBUG) == 0
    assert _onnxruntime_severity(Output(0, "warning"), logging.WARNING) == 2


def test_a_rendezvous_port_in_use_is_an_error_naming_the_flag(tiny_build):
    out, _ = tiny_build
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([*CLI, "run", "--engines", str(out), "--rank", "0", "--world-size", "2",
                                 "--master-port", str(port), "--timeout", "60", "--cr", "3", "--batch", "2"],
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"Error: --master-port {port}" in result.stderr and "in use" in result.stderr
    assert time.monotonic() - started < 50  # said at once, not after the join timeout
