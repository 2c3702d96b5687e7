"""The README's example runs as pasted, and questions typed as people type them answer like the
task's canonical ones, against `vlmprune serve --model demo` (a real vLLM CPU engine + the gateway).

The README's bash blocks run unchanged in a scratch folder holding links to the venv (``.venv``) and
to ``deploy/``; only the gateway's address is the test's (``localhost:8000`` -> its port).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import serve_process
from vlmprune.testbed import scenes
from vlmprune.testbed.example import EXAMPLE_QUESTION, example_sample
from vlmprune.testbed.registry import MODELS_DIR
from vlmprune.testbed.tiny import SPECIAL_TOKENS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODELS_DIR / "demo" / "config.json").is_file(), reason="NOT SHIPPED: no demo weights"),
]
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 600
APPLIED_AT_09 = "method=fastervlm; ratio=0.9; visual_tokens=256; kept=26"  # kept_count(256, 0.9) = 26


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m vlmprune serve --model demo`; yields (gateway URL, vLLM URL, its log)."""
    log = tmp_path_factory.mktemp("serve-demo") / "serve.log"
    with serve_process("demo", log, STARTUP_TIMEOUT_S) as (url, vllm_url, _, log_path, _):
        yield url, vllm_url, log_path


def readme_block(containing: str) -> str:
    """The README's fenced bash block that contains ``containing``."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def run_as_pasted(block: str, gateway: str, cwd: Path) -> subprocess.CompletedProcess:
    """The block in bash, from a folder that looks like the repository root to it."""
    for name, target in ((".venv", Path(sys.prefix)), ("deploy", REPO / "deploy")):
        if not (cwd / name).exists():
            (cwd / name).symlink_to(target)
    script = block.replace("localhost:8000", gateway.removeprefix("http://"))
    env = {**os.environ, "VLMPRUNE_BASE_URL": gateway + "/v1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_readme_curl_example_runs_as_pasted(served, scene_dir):
    """`vlmprune scene` + the README's curl: 200, fastervlm at 0.9 keeps 26 of 256, answers the scene's answer."""
    proc = run_as_pasted(readme_block("curl -s localhost:8000"), served[0], scene_dir)
    assert proc.returncode == 0, proc.stderr
    assert f"question: {EXAMPLE_QUESTION}" in proc.stdout
    answer = re.search(r"^answer:\s+(\S+)$", proc.stdout, re.M).group(1)
    assert re.search(r"^HTTP/1.1 200", proc.stdout, re.M)
    assert re.search(rf"^x-vlmprune-applied: {re.escape(APPLIED_AT_09)};", proc.stdout, re.M | re.I)
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    assert body["choices"][0]["message"]["content"].strip() == answer


def test_readme_client_script_runs_as_pasted(served, scene_dir):
    """deploy/client.py (OpenAI SDK) as in the README: the answer and the applied policy; a bad ratio exits 1."""
    if not (scene_dir / "scene.png").exists():
        subprocess.run([sys.executable, "-m", "vlmprune", "scene", "--out", str(scene_dir / "scene.png")], check=True)
    proc = run_as_pasted(readme_block("deploy/client.py"), served[0], scene_dir)
    assert proc.returncode == 0, proc.stderr
    answer = example_sample().answer
    assert re.search(rf"^answer:\s+{answer}$", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^applied: {re.escape(APPLIED_AT_09)};", proc.stdout, re.M), proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "deploy" / "client.py"), str(scene_dir / "scene.png"),
                          "What color is the circle?", "--ratio", "1.5", "--base-url", served[0] + "/v1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error 400:") and "ratio" in bad.stderr, bad.stderr


def test_the_ready_banner_commands_run_as_pasted(served, tmp_path):
    """The commands `vlmprune serve` prints when ready (scene, curl, SDK client) run as printed and
    answer the scene's answer with fastervlm at 0.9."""
    log = served[2].read_text()
    banner = log[log.index("try ("):log.index("Ctrl-C stops")].splitlines()[1:]
    commands = [line.strip() for line in banner if not line.startswith("or with")]
    script = "\n".join(commands).replace("\\\n", " ")
    script = script.replace("vlmprune scene", ".venv/bin/vlmprune scene").replace("python deploy/", ".venv/bin/python deploy/")
    proc = run_as_pasted(script, served[0], tmp_path)
    assert proc.returncode == 0, proc.stderr
    answer = re.search(r"^answer:\s+(\S+)$", proc.stdout, re.M).group(1)
    assert re.search(rf"^x-vlmprune-applied: {re.escape(APPLIED_AT_09)};", proc.stdout, re.M | re.I), proc.stdout
    assert f'"content":"{answer}"' in proc.stdout.replace(" ", ""), proc.stdout
    assert len(re.findall(rf"answer:\s+{answer}\b", proc.stdout)) == 2, proc.stdout  # the scene's, the client's


def typed(question: str) -> str:
    """The canonical question as a person types it: capital first letter, US spelling, `?` attached."""
    text = question.replace(" ?", "?").replace("colour", "color")
    return text[0].upper() + text[1:]


SAMPLES = 8  # test samples 0..7 cover every question family
UNK_ID = SPECIAL_TOKENS.index("<unk>")


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_typed_questions_get_the_same_ids_and_answers_through_vllm(served):
    """vLLM's own tokenizer (its /tokenize) gives identical ids, and the engine identical answers."""
    gateway, vllm_url, _ = served
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    checked = set()
    for i in range(SAMPLES):
        s = scenes.sample("test", i)
        url = png_data_url(scenes.render(s.scene, 224))  # demo's canvas (registry.scene_layout)
        answers, ids = [], []
        for question in (s.question, typed(s.question)):
            tokens = httpx.post(vllm_url + "/tokenize", json={
                "model": "demo", "add_generation_prompt": True,
                "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}],
            }, timeout=60).json()["tokens"]
            ids.append(tokens)
            out = client.chat.completions.create(
                model="demo", max_tokens=3, temperature=0.0, extra_headers={"X-VLMPrune-Ratio": "0"},
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}],
            )
            answers.append((out.choices[0].message.content.strip(), out.usage.prompt_tokens))
        assert ids[0] == ids[1] and UNK_ID not in ids[0], (s.question, ids)
        assert answers[0] == answers[1], (s.question, answers)
        checked.add(s.family)
    assert checked == set(scenes.FAMILIES), checked
