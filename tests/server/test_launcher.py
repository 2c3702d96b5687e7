"""`vlmprune serve` pieces that need no vLLM: arguments, model resolution, the vLLM command line,
and the whole launcher fronting an existing upstream (`--upstream`), stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import launcher
from tests.server.conftest import image_message
from tests.server.fake_upstream import free_port

REPO = Path(__file__).resolve().parents[2]


def test_vllm_command_has_cpu_flags_and_accepts_request_policies(tmp_path):
    """No GPU: float32 + eager; always --trust-request-mm-kwargs, the image limit, the port."""
    args = launcher.parse_args(["--max-images", "3", "--vllm-arg=--max-num-seqs=4"])
    cmd = launcher.vllm_command(tmp_path, "demo", 9999, args, gpu=False)
    joined = " ".join(cmd)
    for part in ("--dtype float32", "--enforce-eager", "--trust-request-mm-kwargs", "--port 9999",
                 '--limit-mm-per-prompt {"image": 3}', "--served-model-name demo", "--max-num-seqs=4"):
        assert part in joined
    gpu = " ".join(launcher.vllm_command(tmp_path, "demo", 9999, args, gpu=True))
    assert "float32" not in gpu and "--trust-request-mm-kwargs" in gpu


def test_context_length_is_capped_at_the_models_positions(tmp_path):
    """vLLM exits on --max-model-len above the model's max_position_embeddings (the demo has 1024)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 1024}}))
    args = launcher.parse_args([])
    cmd = launcher.vllm_command(tmp_path, "demo", 9999, args, gpu=False)
    assert cmd[cmd.index("--max-model-len") + 1] == "1024"
    assert launcher.context_length(tmp_path, 512) == 512
    assert launcher.context_length(tmp_path / "missing", 2048) == 2048


def test_resolve_model_directory_and_errors(tiny_llava_dir, tmp_path):
    """A model directory is used as is; a directory without config.json or an unknown name is an error."""
    path, served, note = launcher.resolve_model(str(tiny_llava_dir))
    assert path == tiny_llava_dir.resolve() and note is None
    with pytest.raises(launcher.LaunchError, match="config.json"):
        launcher.resolve_model(str(tmp_path))
    with pytest.raises(launcher.LaunchError, match="no-such-model"):
        launcher.resolve_model("no-such-model")


def test_demo_resolves_to_the_shipped_model_or_says_it_falls_back(monkeypatch, tmp_path):
    """`demo`: the registry's model when shipped; otherwise a note naming the random fallback."""
    monkeypatch.setattr(launcher, "FALLBACK_DIR", tmp_path / "fallback")
    path, served, note = launcher.resolve_model("demo")
    assert (path / "config.json").is_file() and served == "demo"
    if note is not None:
        assert "RANDOMLY INITIALISED" in note and path == tmp_path / "fallback" / "model"


def test_busy_port_and_bad_arguments_exit_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert launcher.main(["--port", str(port), "--upstream", "http://127.0.0.1:1"]) == 2
    assert "in use" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        launcher.parse_args(["--port", "0"])
    assert exc.value.code == 2


def test_gateway_port_is_held_from_the_start_and_not_inherited():
    """The gateway binds its port before vLLM starts (a full-suite run once lost it to another
    socket during vLLM's 55 s start, then uvicorn failed with EADDRINUSE): while held, nobody
    else binds it, and the vLLM child does not inherit it."""
    listener = launcher.bind_gateway("127.0.0.1", 0)
    try:
        port = listener.getsockname()[1]
        assert not listener.get_inheritable()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with pytest.raises(launcher.LaunchError, match="in use"):
            launcher.bind_gateway("127.0.0.1", port)
    finally:
        listener.close()


def test_serve_fronting_an_upstream_starts_answers_and_stops(fake_upstream, tiny_llava_dir, tmp_path):
    """`vlmprune serve --upstream URL`: banner with the URL, requests answered, SIGTERM -> exit 0."""
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "vlmprune", "serve", "--upstream", fake_upstream.url, "--model", str(tiny_llava_dir),
           "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 60
        while "started in" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert f"ready: http://127.0.0.1:{port}" in text and "curl" in text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": "fake", "messages": image_message()}, headers={"X-VLMPrune-Ratio": "0.5"})
        assert r.status_code == 200 and "kept=18" in r.headers["x-vlmprune-applied"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()


def test_cli_serve_without_server_extras_is_a_clear_error(monkeypatch, capsys):
    """If the gateway's dependencies are missing, `vlmprune serve` says which extra to install."""
    import importlib.util

    from vlmprune.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve"]) == 2
    assert "vlmprune[server]" in capsys.readouterr().err


def test_in_llm_route_keeps_vllm_defaults_and_sizes_the_step_budget(tmp_path, monkeypatch, capsys):
    """The in-LLM route is the default on CPU: vLLM's chunked prefill and prefix caching stay on (no
    flag), and the step budget holds the context length (passed only above vLLM's CPU default 2048,
    never over the user's own); GPU engines default to the probe route; --in-llm is a no-op that says so."""
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)
    monkeypatch.delenv("VLMPRUNE_IN_LLM", raising=False)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    args = launcher.parse_args([])
    assert launcher.serving_route(args, gpu=False) == "in_llm" and launcher.serving_route(args, gpu=True) == "probe"
    cmd = launcher.vllm_command(tmp_path, "demo", 9999, args, gpu=False)
    assert "prefix-caching" not in " ".join(cmd) and "chunked-prefill" not in " ".join(cmd)
    assert "--max-num-batched-tokens" not in cmd  # vLLM's default 2048 = --max-model-len's default
    long = launcher.parse_args(["--max-model-len", "4096"])
    cmd = launcher.vllm_command(tmp_path, "demo", 9999, long, gpu=False)
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "4096"
    own = launcher.parse_args(["--max-model-len", "4096", "--vllm-arg=--max-num-batched-tokens=512"])
    assert " ".join(launcher.vllm_command(tmp_path, "demo", 9999, own, gpu=False)).count("--max-num-batched-tokens") == 1
    probe = launcher.parse_args(["--route", "probe", "--max-model-len", "4096"])
    assert "--max-num-batched-tokens" not in launcher.vllm_command(tmp_path, "demo", 9999, probe, gpu=False)

    capsys.readouterr()
    launcher.parse_args(["--in-llm"])
    assert "change nothing" in capsys.readouterr().err
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")  # the environment's route is the default
    assert launcher.parse_args([]).route == "probe"
