"""Fixtures of the gateway tests: a tiny LLaVA saved for vLLM, a gateway running in a thread,
`vlmprune serve` running in a subprocess."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.fake_upstream import FakeUpstream, free_port

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 900
"""As long as `vlmprune serve` itself waits for vLLM (its --startup-timeout default)."""


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA-1.5 (84 px, 36 visual tokens) in the layout vLLM loads."""
    from vlmprune.testbed.vllm_layout import build_for_vllm

    path, _, _ = build_for_vllm("llava", tmp_path_factory.mktemp("tiny-llava"))
    return path


def image_data_url(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "PNG") -> str:
    from vlmprune.testbed.tiny import make_image

    buf = io.BytesIO()
    make_image(width, height, seed=seed).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str = "what colour is the box ?", url: str | None = None, n_images: int = 1) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url or image_data_url(seed=i)}} for i in range(n_images)]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


@contextlib.contextmanager
def running_gateway(settings):
    """The real app under uvicorn on a free port, in a thread; yields its base URL."""
    import uvicorn

    from server.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def vllm_engine(model_dir: Path, log_path: Path, max_images: int = 8, timeout_s: float = 600,
                trace_dir: Path | None = None) -> Iterator[str]:
    """A real ``vllm serve`` CPU engine with the plugin, started by the launcher's own functions
    (the command, flags and process-group stop that ``vlmprune serve`` uses); yields its URL.
    ``trace_dir``: the folder it writes traces and fallback reports to (None: tracing off)."""
    import argparse

    from server import launcher

    port = launcher.free_port()
    args = argparse.Namespace(max_model_len=512, max_images=max_images, vllm_arg=[])
    cmd = launcher.vllm_command(model_dir, str(model_dir), port, args, gpu=False)
    proc = launcher.start_vllm(cmd, log_path, gpu=False, trace_dir=trace_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        launcher.wait_ready(url, proc, log_path, timeout_s)
        yield url
    finally:
        launcher.stop_group(proc)


@pytest.fixture(scope="module")
def engine_gateway(tiny_llava_dir, tmp_path_factory):
    """One real vLLM CPU engine (tiny LLaVA) for the module, with the gateway in front of it;
    yields ``(gateway URL, vLLM URL, served model id)``."""
    from server.config import GatewaySettings

    log = tmp_path_factory.mktemp("engine") / "vllm.log"
    with vllm_engine(tiny_llava_dir, log) as vllm_url:
        settings = GatewaySettings(upstreams=[vllm_url], model_dir=str(tiny_llava_dir), health_interval_s=0.5)
        with running_gateway(settings) as url:
            yield url, vllm_url, str(tiny_llava_dir)


@contextlib.contextmanager
def serve_process(model: Path | str, log: Path, startup_timeout_s: float = STARTUP_TIMEOUT_S, *args: str):
    """``python -m vlmprune serve --model MODEL ARGS`` (MODEL: a folder or a shipped model's name; a
    real vLLM child + the gateway) in a subprocess; yields (gateway url, vLLM url, process, log path,
    start-up seconds); SIGTERM at the end."""
    port, vllm_port = free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vlmprune", "serve", "--model", str(model), "--port", str(port),
           "--vllm-port", str(vllm_port), "--max-model-len", "512", "--vllm-log", str(log.with_suffix(".vllm.log")), *args]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while "started in" not in log.read_text():
            if proc.poll() is not None or time.monotonic() - t0 > startup_timeout_s:
                pytest.fail(f"vlmprune serve did not start (rc={proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}", proc, log, seconds
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()


def metric_samples(url: str, client: httpx.Client | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of ``url/metrics`` by (name, sorted labels); ``client``: reuse its connection."""
    out = {}
    text = (client or httpx).get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(url: str, name: str) -> float:
    """A metric summed over all its label sets (vLLM labels its gauges by engine and model)."""
    return sum(v for (n, _), v in metric_samples(url).items() if n == name)


@pytest.fixture
def fake_upstream(tiny_llava_dir):
    up = FakeUpstream(model_root=str(tiny_llava_dir)).start()
    yield up
    up.stop()
