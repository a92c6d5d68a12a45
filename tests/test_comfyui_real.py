"""Real ComfyUI: runs only when PIXART_COMFYUI_DIR points at a ComfyUI checkout (skipped otherwise, so CI stays green).

The test writes tiny models under the official file names, an extra-model-paths config pointing at them and at a
custom-nodes folder that links this repository, and starts `python main.py --cpu` on 127.0.0.1 with its own input,
output, temp and user folders (the checkout is not touched). PIXART_COMFYUI_PYTHON names the interpreter of
ComfyUI's environment (default: this one). Then:
- /object_info lists every PixArt-δ node, and the test stand-ins of ComfyUI's own nodes match the real ones;
- every API workflow (small sizes) is POSTed to /prompt and its images are read back through /history and /view;
- bad input gets ComfyUI's HTTP 400 with our message, or an execution error in /history with our message;
- where Debian's Chromium and the playwright Python driver exist (in either interpreter), the page is opened, each UI
  workflow is loaded with app.loadGraphData as a file drop would: no missing-node dialog, no console errors from this
  pack, graphToPrompt gives exactly the API twin, Run (the queue button) produces the image; a screenshot of each
  loaded graph goes to PIXART_SCREENSHOT_DIR (default: the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMFY_DIR = os.environ.get("PIXART_COMFYUI_DIR")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
OUR_NAMES = ("pixart", "PixArt")

pytestmark = pytest.mark.skipif(not COMFY_DIR, reason="set PIXART_COMFYUI_DIR to a ComfyUI checkout to run this test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: dict | None = None, timeout: float = 30):
    """(status, parsed JSON or bytes) of a GET, or of a POST with a JSON body."""
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw, status, kind = response.read(), response.status, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, kind = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in kind else raw)


# ------------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests import comfy_harness as harness
    from workflows import build

    base = tmp_path_factory.mktemp("real_comfyui")
    models = harness.write_tiny_models(base / "models")
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-PixArt-Delta").symlink_to(ROOT, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(
        "pixart_delta_test:\n"
        f"  base_path: {models}\n"
        "  diffusion_models: diffusion_models\n  checkpoints: checkpoints\n  text_encoders: text_encoders\n"
        "  vae: vae\n  controlnet: controlnet\n"
        f"  custom_nodes: {custom_nodes}\n"
    )
    for d in ("input", "output", "temp", "user"):
        (base / d).mkdir()
    harness.example_input(base / "input", build.EXAMPLE_IMAGE, 64)
    port = free_port()
    python = os.environ.get("PIXART_COMFYUI_PYTHON", sys.executable)
    log = open(base / "comfyui.log", "w")
    process = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--extra-model-paths-config", str(config), "--input-directory", str(base / "input"),
         "--output-directory", str(base / "output"), "--temp-directory", str(base / "temp"),
         "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
         "--preview-method", "auto", "--disable-auto-launch"],
        cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if http(url + "/system_stats", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail("ComfyUI did not start:\n" + (base / "comfyui.log").read_text()[-4000:])
            time.sleep(1)
        yield {"url": url, "base": base, "python": python}
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def queue(url: str, prompt: dict) -> tuple[int, dict]:
    return http(url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})


def wait_history(url: str, prompt_id: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, history = http(f"{url}/history/{prompt_id}")
        if status == 200 and prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def image_sizes(url: str, entry: dict, prompt: dict) -> dict[str, tuple]:
    from io import BytesIO

    from PIL import Image

    sizes = {}
    for node_id, output in entry["outputs"].items():
        for image in output.get("images", []):
            query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            status, raw = http(f"{url}/view?{query}")
            assert status == 200
            with Image.open(BytesIO(raw)) as img:
                sizes[prompt[node_id]["class_type"]] = img.size
    return sizes


def int8_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pixart_core.quantize") is not None


# ------------------------------------------------------------------------------------------------ the API
def test_object_info_lists_our_nodes_and_the_stand_ins_match_comfyui(server):
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from tests import comfy_harness as harness

    status, info = http(server["url"] + "/object_info")
    assert status == 200
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} not registered (see comfyui.log)"
        assert info[name]["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert info[name]["category"] == cls.CATEGORY and info[name]["output"] == list(cls.RETURN_TYPES)
        assert list(info[name]["input"]["required"]) == list(cls.INPUT_TYPES()["required"])
    for name, cls in harness.NATIVE_NODES.items():
        real, ours = info[name], cls.INPUT_TYPES()
        assert real["display_name"] == harness.NATIVE_DISPLAY_NAMES[name]
        assert real["output"] == list(cls.RETURN_TYPES) and real.get("output_node", False) == getattr(
            cls, "OUTPUT_NODE", False)
        for category in ("required", "optional"):
            assert list(real["input"].get(category, {})) == list(ours.get(category, {})), name
            for input_name, spec in ours.get(category, {}).items():
                real_spec = real["input"][category][input_name]
                if isinstance(spec[0], list):  # combos: the same choices (file lists aside)
                    if spec[0] or input_name != "image":
                        assert real_spec[0] == spec[0], (name, input_name)
                else:
                    assert real_spec[0] == spec[0], (name, input_name)
                for key in ("default", "min", "max", "image_upload"):
                    if len(spec) > 1 and key in spec[1]:
                        assert real_spec[1][key] == spec[1][key], (name, input_name, key)


def test_every_api_workflow_runs_in_comfyui(server):
    from tests.test_workflows import EXPECTED, NAMES, shrink

    failures = []
    for name in NAMES:
        if "int8" in name and not int8_available():
            continue
        prompt = shrink(json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text()))
        status, answer = queue(server["url"], prompt)
        assert status == 200, (name, answer)
        entry = wait_history(server["url"], answer["prompt_id"])
        if entry["status"]["status_str"] != "success":
            failures.append((name, [m for m in entry["status"]["messages"] if m[0] == "execution_error"]))
            continue
        assert image_sizes(server["url"], entry, prompt) == EXPECTED[name], name
    assert not failures, failures


def test_bad_input_reaches_the_user_with_our_message(server):
    from tests.test_nodes import FILES, text_to_image

    missing = text_to_image(model="PixArt-XL-2-1024-MS-not-here.pth")
    status, answer = queue(server["url"], missing)
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation"
    [error] = answer["node_errors"]["1"]["errors"]
    assert error["type"] == "custom_validation_failed" and "models/diffusion_models" in error["details"]

    status, answer = queue(server["url"], text_to_image(width=1000))
    assert status == 200
    entry = wait_history(server["url"], answer["prompt_id"])
    [error] = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["exception_type"] == "pixart_core.errors.PixArtError"
    assert "multiples of 16" in error["exception_message"] and error["node_type"] == "PixArtDeltaLCMSampler"

    status, answer = queue(server["url"], text_to_image(model=FILES["sigma"], sampler="dpmpp_2m",
                                                        vae=FILES["sdxl_vae"], control=True))
    entry = wait_history(server["url"], answer["prompt_id"])
    [error] = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert "PixArt-α" in error["exception_message"] and "PixArt-Σ" in error["exception_message"]


# ------------------------------------------------------------------------------------------------ the page
def _python_with_playwright(server) -> str | None:
    for python in dict.fromkeys([sys.executable, server["python"]]):
        found = subprocess.run([python, "-c", "import playwright.sync_api"], capture_output=True)
        if found.returncode == 0:
            return python
    return None


def shrink_ui(workflow: dict) -> dict:
    """The UI twin of test_workflows.shrink: small sizes in the widgets, so Run finishes quickly."""
    from nodes import NODE_CLASS_MAPPINGS
    from tests import comfy_harness as harness
    from tests.test_workflows import TEST_SIZE, TEST_STEPS, TEST_TILE
    from tests.ui_to_api import widget_slots

    classes = {**NODE_CLASS_MAPPINGS, **harness.NATIVE_NODES}
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] not in classes:
            continue
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for index, (name, sent) in enumerate(widget_slots(classes[node["type"]].INPUT_TYPES())):
            if not sent or name in linked:
                continue
            if name in ("width", "height"):
                node["widgets_values"][index] = TEST_SIZE
            elif name == "tile_size":
                node["widgets_values"][index] = TEST_TILE
            elif name == "steps" and node["type"] == "PixArtDeltaSampler":
                node["widgets_values"][index] = min(node["widgets_values"][index], TEST_STEPS)
    return workflow


def test_ui_workflows_load_and_run_in_the_page(server, tmp_path):
    from tests.test_workflows import EXPECTED, NAMES, shrink

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    python = _python_with_playwright(server)
    if python is None:
        pytest.skip("the playwright Python driver is not installed")
    shots = Path(os.environ.get("PIXART_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name in NAMES:
        ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
        run = not ("int8" in name and not int8_available())
        jobs.append({"name": name, "ui": ui, "api": api, "small_ui": shrink_ui(ui), "small_api": shrink(api),
                     "run": run})
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps({"url": server["url"], "shots": str(shots), "jobs": jobs}))
    done = subprocess.run([python, __file__, "browse", str(spec)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "jobs.json.result").read_text())
    print(f"screenshots in {shots}")
    for result in results:
        name = result["name"]
        assert result["missing_types"] == [] and not result["missing_dialog"], (name, result)
        assert result["prompt_matches"] and result["small_prompt_matches"], (name, result["diff"])
        ours = [e for e in result["console_errors"] if any(n in e for n in OUR_NAMES)]
        assert ours == [], (name, ours)
        assert Path(result["screenshot"]).is_file()
        if result["ran"]:
            entry = wait_history(server["url"], result["prompt_id"])
            assert entry["status"]["status_str"] == "success", (name, entry["status"])
            assert image_sizes(server["url"], entry, result["queued_prompt"]) == EXPECTED[name], name


# ------------------------------------------------------------------------------------------------ browser driver
def _browse(spec_path: str) -> None:
    """Runs in an interpreter that has playwright: load, compare, screenshot and Run each UI workflow."""
    from playwright.sync_api import sync_playwright

    spec = json.loads(Path(spec_path).read_text())
    url = spec["url"]
    http(url + "/settings", {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": True})
    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 2200, "height": 1250})
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph", timeout=120_000)
        page.wait_for_timeout(2000)
        for job in spec["jobs"]:
            console.clear()
            result = {"name": job["name"]}
            page.keyboard.press("Escape")
            page.evaluate("async (wf) => await window.comfyAPI.app.app.loadGraphData(wf)", job["ui"])
            page.wait_for_timeout(1500)
            result["missing_dialog"] = page.get_by_text("Missing", exact=False).count() > 0 and \
                page.locator(".p-dialog").count() > 0
            result["missing_types"] = page.evaluate(
                "() => window.comfyAPI.app.app.graph.nodes.map(n => n.type)"
                ".filter(t => !LiteGraph.registered_node_types[t])")
            output = page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
            result["prompt_matches"] = output == job["api"]
            result["diff"] = {} if result["prompt_matches"] else {"page": output, "file": job["api"]}
            result["screenshot"] = str(Path(spec["shots"]) / f"{job['name']}.png")
            page.screenshot(path=result["screenshot"])
            # the small version, then Run: the page queues what graphToPrompt gives
            page.evaluate("async (wf) => await window.comfyAPI.app.app.loadGraphData(wf)", job["small_ui"])
            page.wait_for_timeout(500)
            small = page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
            result["small_prompt_matches"] = small == job["small_api"]
            if not result["small_prompt_matches"]:
                result["diff"]["small_page"], result["diff"]["small_file"] = small, job["small_api"]
            result["ran"] = False
            if job["run"]:
                before = http(url + "/history")[1]
                run_button = page.locator("button:has-text('Run')").first
                if run_button.count():
                    run_button.click()
                else:
                    page.evaluate("async () => await window.comfyAPI.app.app.queuePrompt(0, 1)")
                deadline = time.time() + 120
                new = []
                while time.time() < deadline and not new:
                    time.sleep(0.5)
                    new = [k for k in http(url + "/history")[1] if k not in before]
                    if not new:
                        queue_state = http(url + "/queue")[1]
                        new = [item[1] for item in queue_state["queue_running"] + queue_state["queue_pending"]]
                if new:
                    result["ran"], result["prompt_id"] = True, new[0]
                    result["queued_prompt"] = small
                    wait_history(url, new[0])
                    page.wait_for_timeout(1000)
                    page.screenshot(path=str(Path(spec["shots"]) / f"{job['name']}_after_run.png"))
                else:
                    result["ran"], result["run_failed"] = True, "nothing was queued"
                    result["prompt_id"] = ""
            result["console_errors"] = list(console)
            results.append(result)
        browser.close()
    Path(spec_path + ".result").write_text(json.dumps(results))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "browse":
    _browse(sys.argv[2])
