"""Real ComfyUI 0.3.64 with this pack installed, its HTTP API and its real page in Chromium.

Runs where PIXART_COMFYUI_DIR points at a ComfyUI folder; `.ci/comfyui_env.sh` builds one from the vendored tarball
(its own venv, PIXART_COMFYUI_PYTHON; the pack installed under its custom_nodes/ as README says). Elsewhere the tests
skip, except under CI=true, where a missing ComfyUI, browser or driver fails the run and says what is missing.

The test writes tiny models under the official file names and layouts, an extra-model-paths config pointing at them,
and starts `python main.py --cpu` on 127.0.0.1 with its own input, output, temp and user folders. If the pack is not
installed in that ComfyUI's custom_nodes/, this checkout is linked in through the config (an installed copy must
match this checkout, so the code under test is the working tree's). Then:
- the start-up log shows no import failure and no warning from the pack, and the pack imports in under 2 s;
- /object_info lists every PixArt-δ node with a description and a tooltip on every input, and the test stand-ins of
  ComfyUI's own nodes match the real ones;
- every API workflow (small sizes) is POSTed to /prompt and its images are read back through /history and /view;
- an out-of-range value and a missing model file get ComfyUI's HTTP 400 with our message; a failing run shows our
  message in /history;
- Cancel (POST /interrupt) during a long sampler run stops it within one model evaluation, and the next queued
  prompt still runs;
- ComfyUI's own custom-node loader imports the pack and the nano workflow runs through ComfyUI's model management,
  and no function or class of comfy.*, folder_paths, latent_preview, nodes, execution or node_helpers is replaced;
- with Debian's Chromium and the playwright Python driver, the page is opened, each UI workflow is loaded with
  app.loadGraphData as a file drop would: no missing-node dialog, no console errors from this pack, graphToPrompt
  gives exactly the API twin, Run (the queue button) produces the image. Screenshots of every loaded workflow and
  the server's log are kept in $PIXART_TEST_OUT (default out/ in the checkout, ignored by git): screenshots/ and
  comfyui.log, for a person to look at.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
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
CHROMIUM = os.environ.get("PIXART_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
OUR_NAMES = ("pixart", "PixArt")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
TEST_OUT = Path(os.environ.get("PIXART_TEST_OUT") or ROOT / "out")
PACK_DIR_NAME = "ComfyUI-PixArt-Delta"  # README's install section clones the pack under this name
IMPORT_SECONDS_MAX = 2.0


def require(condition: bool, missing: str) -> None:
    """Skip where a piece is missing; under CI=true fail instead, naming it (CI must run these tests)."""
    if condition:
        return
    message = f"{missing} (bash .ci/comfyui_env.sh sets up ComfyUI, Chromium and the driver)"
    if IN_CI:
        pytest.fail("CI=true and the real-ComfyUI test cannot run: " + message, pytrace=False)
    pytest.skip(message)


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
def _pack_files(folder: Path) -> dict[str, str]:
    """sha256 of the files that make the pack: what ComfyUI imports and what the workflows are."""
    out = {}
    for pattern in ("__init__.py", "requirements.txt", "pixart_nodes/*.py", "pixart_core/**/*.py",
                    "workflows/**/*.json"):
        for path in folder.glob(pattern):
            if path.is_file() and "__pycache__" not in path.parts:
                out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def installed_pack(comfy_dir: Path) -> Path | None:
    """This pack as installed under ComfyUI's custom_nodes/ (README's install section), if it is; an installed copy
    must be this checkout's code (the code under test is the working tree's)."""
    for candidate in sorted((comfy_dir / "custom_nodes").glob("*/pyproject.toml")):
        if 'name = "comfyui-pixart-delta"' in candidate.read_text(errors="replace"):
            pack = candidate.parent
            ours, theirs = _pack_files(ROOT), _pack_files(pack)
            stale = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            assert not stale, (f"{pack} is not this checkout ({len(stale)} files differ, e.g. {stale[:5]}); "
                               "reinstall it with: bash .ci/comfyui_env.sh")
            return pack
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(bool(COMFY_DIR), "PIXART_COMFYUI_DIR is not set (a ComfyUI folder)")
    comfy_dir = Path(COMFY_DIR)
    require((comfy_dir / "main.py").is_file(), f"no ComfyUI at PIXART_COMFYUI_DIR={COMFY_DIR} (main.py missing)")
    python = os.environ.get("PIXART_COMFYUI_PYTHON", sys.executable)
    require(Path(python).exists() or shutil.which(python) is not None,
            f"PIXART_COMFYUI_PYTHON={python} does not exist")
    from tests import comfy_harness as harness
    from workflows import build

    base = tmp_path_factory.mktemp("real_comfyui")
    models = harness.write_tiny_models(base / "models")
    pack = installed_pack(comfy_dir)
    if pack is not None:
        custom_nodes_line = ""
    else:  # a plain ComfyUI: link this checkout in through the config
        custom_nodes = base / "custom_nodes"
        custom_nodes.mkdir()
        (custom_nodes / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
        custom_nodes_line = f"  custom_nodes: {custom_nodes}\n"
    config = base / "extra_model_paths.yaml"
    config.write_text(
        "pixart_delta_test:\n"
        f"  base_path: {models}\n"
        "  diffusion_models: diffusion_models\n  checkpoints: checkpoints\n  text_encoders: text_encoders\n"
        "  vae: vae\n  controlnet: controlnet\n  loras: loras\n"
        + custom_nodes_line
    )
    for d in ("input", "output", "temp", "user"):
        (base / d).mkdir()
    harness.example_input(base / "input", build.EXAMPLE_IMAGE, 64)
    harness.example_input(base / "input", build.INPAINT_IMAGE, 64)
    port = free_port()
    log_path = base / "comfyui.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--extra-model-paths-config", str(config), "--input-directory", str(base / "input"),
         "--output-directory", str(base / "output"), "--temp-directory", str(base / "temp"),
         "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
         "--preview-method", "auto", "--disable-auto-launch"],
        cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "PYTHONUNBUFFERED": "1"},
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
                pytest.fail("ComfyUI did not start:\n" + log_path.read_text()[-4000:])
            time.sleep(1)
        startup_log = log_path.read_text(errors="replace")
        yield {"url": url, "base": base, "python": python, "pack": pack or ROOT, "startup_log": startup_log,
               "log_path": log_path}
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        TEST_OUT.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, TEST_OUT / "comfyui.log")


def queue(url: str, prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
    return http(url + "/prompt", {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})


def explain_rejection(prompt: dict, answer) -> str:
    """A rejected prompt in words, naming the nodes: for a type mismatch, also the node the link comes from."""
    if not isinstance(answer, dict):
        return repr(answer)
    lines = [str(answer.get("error", {}).get("message", answer))]
    for node_id, node in (answer.get("node_errors") or {}).items():
        for error in node["errors"]:
            line = f"node {node_id} {node['class_type']}: {error['message']}: {error['details']}"
            name = error.get("extra_info", {}).get("input_name")
            link = prompt.get(node_id, {}).get("inputs", {}).get(name)
            if isinstance(link, list) and len(link) == 2 and link[0] in prompt:
                line += f" (linked from node {link[0]} {prompt[link[0]]['class_type']}, output {link[1]})"
            lines.append(line)
    return "\n".join(lines)


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
    from pixart_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from tests import comfy_harness as harness

    status, info = http(server["url"] + "/object_info")
    assert status == 200
    no_tooltip = []
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} not registered (see comfyui.log)"
        assert info[name]["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert info[name]["category"] == cls.CATEGORY and info[name]["output"] == list(cls.RETURN_TYPES), name
        assert list(info[name]["input"]["required"]) == list(cls.INPUT_TYPES()["required"]), name
        assert len(info[name].get("description", "")) > 40, f"{name} has no DESCRIPTION in /object_info"
        assert len(info[name].get("output_tooltips") or []) == len(info[name]["output"]), name
        for category in ("required", "optional"):
            for input_name, spec in info[name]["input"].get(category, {}).items():
                if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip")):
                    no_tooltip.append(f"{name}.{input_name}")
    assert not no_tooltip, f"inputs without a tooltip in /object_info: {no_tooltip}"
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
        if status != 200:
            failures.append(f"{name}: POST /prompt refused it (HTTP {status}):\n{explain_rejection(prompt, answer)}")
            continue
        entry = wait_history(server["url"], answer["prompt_id"])
        if entry["status"]["status_str"] != "success":
            errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
            failures.append(f"{name}: run failed: " + "; ".join(
                f"node {e.get('node_id')} {e.get('node_type')}: {e.get('exception_message')}" for e in errors))
            continue
        sizes = image_sizes(server["url"], entry, prompt)
        if sizes != EXPECTED[name]:
            failures.append(f"{name}: images {sizes}, expected {EXPECTED[name]}")
    assert not failures, "\n".join(failures)


def test_bad_input_reaches_the_user_with_our_message(server):
    from tests.test_nodes import FILES, text_to_image

    # a missing model file: refused at Queue (HTTP 400), our message says where the file goes
    missing = text_to_image(model="PixArt-XL-2-1024-MS-not-here.pth")
    status, answer = queue(server["url"], missing)
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation", answer
    [error] = answer["node_errors"]["1"]["errors"]
    assert error["type"] == "custom_validation_failed" and "models/diffusion_models" in error["details"], error

    # out-of-range values: refused at Queue (HTTP 400) with our message
    for start, end, words in ((1.5, 1.0, "from 0 to 1"), (0.8, 0.2, "start must be at most end")):
        prompt = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m", control=True)
        prompt["11"]["inputs"].update(start=start, end=end)
        status, answer = queue(server["url"], prompt)
        assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation", answer
        errors = answer["node_errors"]["11"]["errors"]
        assert answer["node_errors"]["11"]["class_type"] == "PixArtDeltaControlNetApply"
        assert errors and all(e["type"] == "custom_validation_failed" and words in e["details"] for e in errors), errors
    # ... and ComfyUI's own range check still guards our other widgets
    status, answer = queue(server["url"], text_to_image(width=20000))
    assert status == 400, answer
    [error] = answer["node_errors"]["4"]["errors"]
    assert error["type"] == "value_bigger_than_max" and error["details"] == "width", error

    # failing runs: the error in /history carries our message
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


# ------------------------------------------------------------------------------------------------ start-up
def test_startup_log_is_clean_and_the_pack_imports_fast(server):
    log = server["startup_log"]
    pack = Path(server["pack"])

    def about_pack(line: str) -> bool:
        return str(pack) in line or pack.name in line or PACK_DIR_NAME in line

    # ComfyUI's own optional nodes may fail here (its audio nodes need torchaudio, which is not installed): only the
    # pack's lines count. "Cannot import <path> module for custom nodes: ..." is how a failed pack import shows.
    failed = [line for line in log.splitlines() if re.search(r"IMPORT FAILED|Cannot import", line) and about_pack(line)]
    assert failed == [], "\n".join(failed) + "\n" + log[-4000:]
    # ComfyUI lists each pack's import time: "   0.4 seconds: /path/custom_nodes/<pack>"
    times = re.findall(r"^\s*([0-9.]+) seconds(.*?): (.+)$", log, flags=re.M)
    ours = [(float(t), flag, path) for t, flag, path in times if about_pack(path)]
    assert len(ours) == 1, f"the pack is not in ComfyUI's import-time list:\n{log[-3000:]}"
    seconds, flag, path = ours[0]
    assert not flag.strip(), f"{path}{flag}"
    assert seconds < IMPORT_SECONDS_MAX, f"the pack took {seconds} s to import (limit {IMPORT_SECONDS_MAX} s)"
    # nothing the pack, or a library only it imports, printed at start-up: bitsandbytes' kernel warnings included
    # ("Failed to load CPU gemm_4bit_forward from kernels-community" is printed when bitsandbytes is imported)
    from_pack = re.compile(r"pixart|bitsandbytes|kernels-community|gemm_4bit|diffusers|sentencepiece|ftfy|bs4", re.I)
    env_root = str(Path(COMFY_DIR).resolve().parent)  # its path may hold any word: judge the rest of each line
    lines = [line for line in log.splitlines() if (from_pack.search(line.replace(env_root, "")) or about_pack(line))
             and not re.match(r"^\s*[0-9.]+ seconds: ", line)]
    assert lines == [], "start-up log lines from the pack:\n" + "\n".join(lines)
    # the pack folder is on sys.path (for pixart_core): none of its top-level modules may shadow one of ComfyUI's
    def top_level(folder: Path) -> set[str]:
        return {p.stem if p.suffix == ".py" else p.name for p in folder.iterdir()
                if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert top_level(pack) & top_level(Path(COMFY_DIR)) == set()
    assert "pixart_nodes" in top_level(pack) and "nodes" in top_level(Path(COMFY_DIR))


# ------------------------------------------------------------------------------------------------ Cancel
class WebSocket:
    """The smallest websocket client ComfyUI's /ws needs: handshake, then read server frames (JSON text, previews)."""

    def __init__(self, url: str, client_id: str):
        parsed = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def receive(self, timeout: float) -> dict | None:
        """The next JSON message, or None after `timeout` seconds without one (binary preview frames skipped)."""
        deadline = time.time() + timeout
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                first, second = self._read(2)
                length = second & 0x7F
                if length == 126:
                    length = int.from_bytes(self._read(2), "big")
                elif length == 127:
                    length = int.from_bytes(self._read(8), "big")
                mask = self._read(4) if second & 0x80 else None
                payload = self._read(length)
            except socket.timeout:
                return None
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = first & 0x0F
            if opcode == 8:
                raise ConnectionError("websocket closed by the server")
            if opcode == 1:
                return json.loads(payload)

    def close(self) -> None:
        self.sock.close()


def test_cancel_stops_a_long_run_within_one_model_evaluation(server):
    from tests.test_nodes import FILES, text_to_image

    url = server["url"]
    client_id = str(uuid.uuid4())
    # a long run: 1000 DPM-Solver++ steps with CFG (one batched model evaluation per step) at 1024 px
    long_run = text_to_image(model=FILES["alpha"], sampler="dpmpp_2m", width=1024, height=1024)
    long_run["4"]["inputs"]["steps"] = 1000
    long_run["4"]["inputs"]["seed"] = 4242  # not cached from another test
    after = text_to_image()  # queued behind it
    after["4"]["inputs"]["seed"] = 4243
    ws = WebSocket(url, client_id)
    try:
        status, first = queue(url, long_run, client_id)
        assert status == 200, first
        status, second = queue(url, after, client_id)
        assert status == 200, second
        steps: list[tuple[float, int]] = []  # (time, step) of the long run's sampler
        deadline = time.time() + 300
        while len(steps) < 4 and time.time() < deadline:
            message = ws.receive(5)
            if message and message["type"] == "progress" and message["data"].get("prompt_id") == first["prompt_id"] \
                    and message["data"].get("node") == "4":
                steps.append((time.time(), message["data"]["value"]))
        assert len(steps) >= 4, f"the long run did not start sampling: {http(url + '/queue')[1]}"
        step_seconds = (steps[-1][0] - steps[1][0]) / (steps[-1][1] - steps[1][1])
        at_cancel = steps[-1][1]
        cancelled_at = time.time()
        assert http(url + "/interrupt", {})[0] == 200
        later_steps, interrupted = [], None
        while interrupted is None and time.time() < cancelled_at + 120:
            message = ws.receive(5)
            if not message or message.get("data", {}).get("prompt_id") != first["prompt_id"]:
                continue
            if message["type"] == "progress" and message["data"].get("node") == "4":
                later_steps.append(message["data"]["value"])
            elif message["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                interrupted = message
        stopped_after = time.time() - cancelled_at
    finally:
        ws.close()
    print(f"Cancel at step {at_cancel} ({step_seconds:.2f} s a step): steps after it {later_steps}, stopped after "
          f"{stopped_after:.2f} s")
    assert interrupted is not None and interrupted["type"] == "execution_interrupted", interrupted
    assert interrupted["data"]["node_type"] == "PixArtDeltaSampler", interrupted
    # the evaluation running when Cancel came may finish; none after it starts
    assert all(step <= at_cancel + 1 for step in later_steps), (at_cancel, later_steps)
    assert stopped_after < 3 * step_seconds + 2.0, (stopped_after, step_seconds)
    entry = wait_history(url, first["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    entry = wait_history(url, second["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert image_sizes(url, entry, after) == {"SaveImage": (64, 64)}


# ------------------------------------------------------------------------------------------------ the page
def _python_with_playwright(server) -> str | None:
    for python in dict.fromkeys([sys.executable, server["python"]]):
        found = subprocess.run([python, "-c", "import playwright.sync_api"], capture_output=True)
        if found.returncode == 0:
            return python
    return None


def shrink_ui(workflow: dict) -> dict:
    """The UI twin of test_workflows.shrink: small sizes in the widgets, so Run finishes quickly."""
    from pixart_nodes import NODE_CLASS_MAPPINGS
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

    require(Path(CHROMIUM).exists(), f"Debian's chromium is not installed ({CHROMIUM} missing; apt-get install "
                                     "chromium)")
    python = _python_with_playwright(server)
    require(python is not None, "the playwright Python driver is not installed (pip install playwright; never "
                                "`playwright install`)")
    shots = Path(os.environ.get("PIXART_SCREENSHOT_DIR") or TEST_OUT / "screenshots")
    shutil.rmtree(shots, ignore_errors=True)
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
        assert result["prompt_matches"] and result["small_prompt_matches"], (
            f"{name}: the page's prompt differs from workflows/api/{name}.json:\n" + prompt_diff(result["diff"]))
        ours = [e for e in result["console_errors"] if any(n in e for n in OUR_NAMES)]
        assert ours == [], (name, ours)
        assert Path(result["screenshot"]).is_file()
        if result.get("run_failed"):  # ask the server why, with the same prompt the page built
            small = next(job["small_api"] for job in jobs if job["name"] == name)
            status, answer = queue(server["url"], small)
            pytest.fail(f"{name}: {result['run_failed']}\nPOST /prompt of the page's prompt: HTTP {status}\n"
                        + explain_rejection(small, answer) + f"\npage console: {result['console_errors'][:3]}")
        assert result["ran"] or ("int8" in name and not int8_available()), f"{name} was not run in the page"
        if result["ran"]:
            entry = wait_history(server["url"], result["prompt_id"])
            assert entry["status"]["status_str"] == "success", (name, entry["status"])
            assert image_sizes(server["url"], entry, result["queued_prompt"]) == EXPECTED[name], name


def prompt_diff(diff: dict) -> str:
    """The nodes whose inputs differ between the page's prompt and the API file, by id and class."""
    lines = []
    for page_key, file_key in (("page", "file"), ("small_page", "small_file")):
        page, file = diff.get(page_key) or {}, diff.get(file_key) or {}
        for node_id in sorted(set(page) | set(file), key=str):
            a, b = page.get(node_id), file.get(node_id)
            if a != b:
                kind = (a or b)["class_type"]
                lines.append(f"node {node_id} {kind}: page {a and a.get('inputs')} / file {b and b.get('inputs')}")
    return "\n".join(lines) or repr(diff)[:2000]


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
            if job["run"] and result["small_prompt_matches"]:  # else the failure above says why
                before = http(url + "/history")[1]
                run_button = page.locator("button:has-text('Run')").first
                if run_button.count():
                    run_button.click()
                else:
                    page.evaluate("async () => await window.comfyAPI.app.app.queuePrompt(0, 1)")
                deadline = time.time() + 30  # a queued prompt shows at once; a refused one never does
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
                    result["run_failed"] = "Run queued nothing (the server refused the page's prompt?)"
            result["console_errors"] = list(console)
            results.append(result)
        browser.close()
    Path(spec_path + ".result").write_text(json.dumps(results))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "browse":
    _browse(sys.argv[2])


# ------------------------------------------------------------------------------------------------ comfy.* untouched
UNTOUCHED_SCRIPT = r"""
import asyncio, importlib.util, json, sys
from pathlib import Path
pack, harness_file, prompt_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path.insert(0, ".")  # the ComfyUI folder (cwd), as main.py runs
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = ["main.py", "--cpu"]  # ComfyUI's own argument parser, as the server is started
import torch
torch.set_num_threads(1)
import folder_paths, latent_preview, nodes  # noqa: E401  (nodes imports comfy.* as the server does)
import comfy.model_management, comfy.model_patcher, comfy.utils, comfy.latent_formats  # noqa: E401

OWNED = ("comfy", "folder_paths", "latent_preview", "nodes", "execution", "node_helpers")

def snapshot():
    # id() of every function and class in ComfyUI's modules, and of every function on those classes
    out = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in OWNED:
            continue
        for attr, value in list(vars(module).items()):
            if callable(value):
                out[f"{name}.{attr}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                out.update({f"{name}.{attr}.{k}": id(v) for k, v in vars(value).items() if callable(v)})
    return out

before = snapshot()
loaded = asyncio.run(nodes.load_custom_node(str(pack)))  # how ComfyUI imports a custom node folder
assert loaded, "ComfyUI could not import the pack"
assert "PixArtDeltaLCMSampler" in nodes.NODE_CLASS_MAPPINGS
spec = importlib.util.spec_from_file_location("pixart_test_harness", harness_file)
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
harness.Directories.output = harness.Directories.temp = folder_paths.get_temp_directory()
prompt = json.loads(prompt_file.read_text())
executor = harness.Executor(nodes.NODE_CLASS_MAPPINGS)  # kept: its results hold the models ComfyUI manages
outputs = executor.run(prompt)
after = snapshot()
changed = sorted(k for k in before if after.get(k) != before[k])
print(json.dumps({"changed": changed, "images": sum(len(o.get("images", [])) for o in outputs.values()),
                  "loaded": len(comfy.model_management.current_loaded_models), "checked": len(before)}))
"""


def test_importing_and_running_the_pack_leaves_real_comfyui_untouched(tmp_path):
    """tests/test_comfy_untouched.py against the real ComfyUI modules: ComfyUI's own loader imports the pack, the nano
    workflow runs through ComfyUI's model management, and no function or class of comfy.*, folder_paths,
    latent_preview, nodes, execution or node_helpers has been replaced."""
    from tests.test_workflows import shrink

    require(bool(COMFY_DIR), "PIXART_COMFYUI_DIR is not set (a ComfyUI folder)")
    comfy_dir = Path(COMFY_DIR)
    require((comfy_dir / "main.py").is_file(), f"no ComfyUI at PIXART_COMFYUI_DIR={COMFY_DIR} (main.py missing)")
    python = os.environ.get("PIXART_COMFYUI_PYTHON", sys.executable)
    prompt_file = tmp_path / "prompt.json"
    api = json.loads((ROOT / "workflows" / "api" / "pixart_nano_lcm.json").read_text())
    prompt_file.write_text(json.dumps(shrink(api)))
    done = subprocess.run([python, "-c", UNTOUCHED_SCRIPT, str(installed_pack(comfy_dir) or ROOT),
                           str(ROOT / "tests" / "comfy_harness.py"), str(prompt_file)],
                          cwd=comfy_dir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["checked"] > 1000, result  # ComfyUI's modules were really there to compare
    assert result["changed"] == [], result["changed"]
    assert result["images"] > 0 and result["loaded"] > 0  # it ran, through ComfyUI's model management
