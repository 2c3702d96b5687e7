"""The playground page in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
in front of `vlmprune serve --model demo`: a real vLLM CPU engine with the plugin + the gateway.

What is checked is what a person would read off the page: the answer, the counters, the overlay's
kept cells (read back from the canvas pixels: a kept cell's outline is yellow, the dimmed image
never is), and the API's error messages. The kept cells must be the engine's own selection (the
trace the plugin wrote in ``embed_multimodal``) and equal the reference backend's for the same image
and policy. Screenshots of every state go to ``bench/results/playground/`` (one is in the README).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from server.chat.protocol import AppliedPolicy
from server.config import GatewaySettings
from server.model_info import ServedModel
from tests.server.conftest import REPO, running_gateway, serve_process
from tests.server.fake_upstream import free_port
from vlmprune.policy import kept_count, parse_policy
from vlmprune.testbed import scenes
from vlmprune.testbed.registry import resolve_model

pytestmark = pytest.mark.slow
SHOTS = REPO / "bench" / "results" / "playground"
DEMO = resolve_model("demo")
N_VISUAL = 256
SCENE = 11
"""A test-split scene ("how many cyan objects are there ?", one) the demo model answers right at
ratio 0; at fastervlm 0.9 the cyan cross loses every token and the answer changes: the trade the
page is for (the README's screenshot)."""
TIMEOUT_MS = 120_000


def chromium_path() -> str:
    """Debian's chromium (``make browser`` installs it); never skipped when missing."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium found: run `make browser` (apt-get install chromium) or set CHROMIUM=/path")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve_process("demo", tmp_path_factory.mktemp("playground") / "serve.log") as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1060, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def reference():
    from vlmprune.backends.hf import ReferenceBackend

    return ReferenceBackend.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> tuple[Path, scenes.Sample]:
    """The demo scene as a PNG file to upload, as the testbed draws it for the demo model (224 px)."""
    sample = scenes.sample("test", SCENE)
    path = tmp_path_factory.mktemp("images") / f"scene-{SCENE}.png"
    scenes.render(sample.scene, 224).save(path)
    return path, sample


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_playground(page, url: str) -> None:
    page.goto(url + "/playground")
    page.wait_for_function("document.querySelector('#a-method').options.length > 1")


def set_policy(page, panel: str, method: str, ratio: float) -> None:
    """Choose the method, then move the slider with the keyboard (Home = 0, End = 0.95, one
    arrow press = one 0.005 step), as a person would."""
    page.select_option(f"#{panel}-method", method)
    slider = page.locator(f"#{panel}-ratio")
    slider.focus()
    steps_down = round((0.95 - ratio) / 0.005)
    if ratio == 0.0:
        page.keyboard.press("Home")
    else:
        page.keyboard.press("End")
        for _ in range(steps_down):
            page.keyboard.press("ArrowLeft")
    assert float(slider.input_value()) == pytest.approx(ratio)
    assert page.locator(f"#{panel}-ratio-value").inner_text() == f"{ratio:.3f}"


def run_and_wait(page, panels: str = "a") -> None:
    page.click("#run")
    for panel in panels:
        page.wait_for_selector(f"#panel-{panel}[data-state=done], #panel-{panel}[data-state=error]")


def marked_cells(page, panel: str) -> list[list[int]]:
    """Per overlay canvas of ``panel``: the tokens whose cell is drawn kept, read from the pixels
    (the middle of the cell's top edge carries the yellow outline only when the cell is kept)."""
    return page.evaluate(
        """(panel) => Array.from(document.querySelectorAll(`#${panel}-overlay canvas`), (canvas) => {
            const ctx = canvas.getContext("2d");
            return JSON.parse(canvas.dataset.cells).filter(([token, x, y, w, h]) => {
                const [r, g, b] = ctx.getImageData(x + Math.floor(w / 2), y + 1, 1, 1).data;
                return r > 240 && g > 190 && g < 230 && b < 40;
            }).map(([token]) => token);
        })""",
        panel,
    )


def text(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def chat_direct(url: str, image_url: str, question: str, headers: dict[str, str]) -> httpx.Response:
    body = {"model": "demo", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]}]}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_upload_slider_run_shows_answer_counters_and_the_engines_kept_cells(served, page, scene_png, reference):
    """Upload + slider to fastervlm 0.9 + Run: the streamed answer equals the API's; kept 26 of 256;
    the canvas marks exactly 26 cells, and they are the reference backend's selection."""
    from vlmprune.visualize import visualize

    url = served[0]
    path, sample = scene_png
    open_playground(page, url)
    methods = page.eval_on_selector_all("#a-method option", "os => os.map(o => o.value).filter(Boolean)")
    assert "globalcom2" not in methods and {"fastervlm", "aim", "transprune", "random", "pool"} <= set(methods)
    page.set_input_files("#image-file", str(path))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#question", sample.question)
    set_policy(page, "a", "fastervlm", 0.9)
    run_and_wait(page)
    assert not page.locator("#a-error").is_visible(), text(page, "#a-error")
    shot(page, "1-run-fastervlm-0.9")

    image_url = page.evaluate("document.querySelector('#preview').src")
    direct = chat_direct(url, image_url, sample.question, {"X-VLMPrune-Method": "fastervlm", "X-VLMPrune-Ratio": "0.9"})
    assert direct.status_code == 200, direct.text
    assert text(page, "#a-answer") == direct.json()["choices"][0]["message"]["content"].strip()
    assert text(page, "#a-prompt-tokens") == str(direct.json()["usage"]["prompt_tokens"])
    kept = kept_count(N_VISUAL, 0.9)
    assert text(page, "#a-kept") == f"{kept} of {N_VISUAL}"
    assert text(page, "#a-stages") == f"LLM input: {kept}/{N_VISUAL}"
    applied = AppliedPolicy.parse(text(page, "#a-applied"))
    assert (applied.method, applied.ratio, applied.kept, applied.source) == ("fastervlm", 0.9, kept, "header")
    ttft, total = (float(text(page, s).removesuffix(" ms")) for s in ("#a-ttft", "#a-latency"))
    assert 0 < ttft <= total
    saved = float(page.locator("#a-flops").get_attribute("data-saved"))
    model = ServedModel(DEMO)
    prompt = direct.json()["usage"]["prompt_tokens"]
    cost = model.cost([model.image_tokens(224, 224)], parse_policy({"method": "fastervlm", "ratio": 0.9}), prompt - kept)
    assert saved == pytest.approx(1 - cost.actual_flops / cost.baseline_flops) and saved > 0.3

    (cells,) = marked_cells(page, "a")
    assert len(cells) == kept
    _, ref = visualize(reference, _image(path), parse_policy({"method": "fastervlm", "ratio": 0.9}), sample.question)
    assert sorted(cells) == ref["kept_indices"]


def _image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_demo_scene_button_shows_its_question_and_expected_answer(served, page):
    """"New demo scene" loads a testbed scene, fills the question and shows the expected answer."""
    open_playground(page, served[0])
    page.click("#demo-scene")
    page.wait_for_selector("#scene-info:not([hidden])")
    page.wait_for_selector("#preview:not([hidden])")
    sample = scenes.sample("test", int(text(page, "#scene-index")))
    assert text(page, "#scene-question") == sample.question
    assert text(page, "#scene-answer") == sample.answer
    assert page.input_value("#question") == sample.question


def test_compare_ratio_0_against_fastervlm_09(served, page):
    """Compare on a demo scene (/playground?scene=N): ratio 0 answers right, keeps and draws all 256
    cells and saves nothing; fastervlm 0.9 draws 26, its answer is the API's, its prompt 230 shorter."""
    page.goto(served[0] + f"/playground?scene={SCENE}")
    page.wait_for_function("document.querySelector('#a-method').options.length > 1")
    page.wait_for_selector("#scene-info:not([hidden])")
    page.wait_for_selector("#preview:not([hidden])")
    page.check("#compare")
    set_policy(page, "a", "fastervlm", 0.0)
    set_policy(page, "b", "fastervlm", 0.9)
    run_and_wait(page, "ab")
    for panel in "ab":
        assert not page.locator(f"#{panel}-error").is_visible(), text(page, f"#{panel}-error")
    shot(page, "2-compare-ratio-0-vs-fastervlm-0.9")
    sample = scenes.sample("test", SCENE)
    assert text(page, "#scene-answer") == sample.answer and text(page, "#a-answer") == sample.answer
    image_url = page.evaluate("document.querySelector('#preview').src")
    direct = chat_direct(served[0], image_url, sample.question, {"X-VLMPrune-Method": "fastervlm", "X-VLMPrune-Ratio": "0.9"})
    assert text(page, "#b-answer") == direct.json()["choices"][0]["message"]["content"].strip()
    assert text(page, "#a-kept") == f"{N_VISUAL} of {N_VISUAL}"
    assert text(page, "#b-kept") == f"{kept_count(N_VISUAL, 0.9)} of {N_VISUAL}"
    assert float(page.locator("#a-flops").get_attribute("data-saved")) == 0.0
    assert float(page.locator("#b-flops").get_attribute("data-saved")) > 0.3  # the vision tower is not pruned
    assert [len(c) for c in marked_cells(page, "a")] == [N_VISUAL]
    assert [len(c) for c in marked_cells(page, "b")] == [kept_count(N_VISUAL, 0.9)]
    assert int(text(page, "#a-prompt-tokens")) - int(text(page, "#b-prompt-tokens")) == N_VISUAL - kept_count(N_VISUAL, 0.9)


def test_bad_image_and_unsupported_method_show_the_apis_message(served, page, tmp_path):
    """A corrupt upload and a method the model does not support (a stale page) show the gateway's
    own error message on the page; the next good run still works."""
    url = served[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    open_playground(page, url)
    page.set_input_files("#image-file", str(broken))
    page.wait_for_function("document.querySelector('#image-note').textContent.includes('cannot display')")
    run_and_wait(page)
    import base64

    expected = chat_direct(url, "data:image/png;base64," + base64.b64encode(broken.read_bytes()).decode(),
                           "what colour is the circle ?", {})
    assert expected.status_code == 400
    assert text(page, "#a-error") == f"400: {expected.json()['error']['message']}"
    shot(page, "3-error-bad-image")

    page.click("#demo-scene")
    page.wait_for_selector("#preview:not([hidden])")
    # A page loaded before the model changed could still offer globalcom2 (LLaVA-NeXT only).
    page.evaluate("document.querySelector('#a-method').add(new Option('globalcom2', 'globalcom2'))")
    page.select_option("#a-method", "globalcom2")
    run_and_wait(page)
    message = text(page, "#a-error")
    assert message.startswith("400: ") and "'globalcom2' does not apply to model family 'llava'" in message
    shot(page, "4-error-unsupported-method")

    page.select_option("#a-method", "random")
    run_and_wait(page)
    assert not page.locator("#a-error").is_visible()
    assert text(page, "#a-answer")


def test_upstream_down_and_api_key_errors_show_on_the_page(page, tmp_path):
    """A gateway with keys on whose only upstream is down: the page shows 401 until the key is
    typed, then the methods load and Run shows the gateway's 503 message."""
    dead = f"http://127.0.0.1:{free_port()}"
    settings = GatewaySettings(upstreams=[dead], model_dir=str(DEMO), api_keys=["pg-key"], health_interval_s=0.5)
    with running_gateway(settings) as url:
        page.goto(url + "/playground")
        page.wait_for_selector("#page-error:not([hidden])")
        assert text(page, "#page-error") == "401: missing API key: send Authorization: Bearer <key>"
        page.fill("#api-key", "pg-key")
        page.press("#api-key", "Tab")  # leaving the field commits it (a change event)
        page.wait_for_function("document.querySelector('#page-error').textContent.includes('503')")
        assert "no upstream answered /v1/models" in text(page, "#page-error")
        page.wait_for_function("document.querySelector('#a-method').options.length > 1")  # methods still load
        page.click("#demo-scene")
        page.wait_for_selector("#preview:not([hidden])")
        run_and_wait(page)
        resp = httpx.get(url + "/health")
        message = text(page, "#a-error")
        assert message.startswith("503: no upstream could be reached"), message
        assert dead in message and resp.status_code == 503
        shot(page, "5-error-upstream-down")
