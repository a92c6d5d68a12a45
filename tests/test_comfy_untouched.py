"""The pack replaces or wraps no ComfyUI function: after importing it the way ComfyUI does and running a workflow in
its "inside ComfyUI" mode (on the stand-in modules of tests/comfy_standin.py), every attribute of comfy.*,
folder_paths and latent_preview is the object it was before. Runs in a fresh interpreter, so the stand-ins never leak
into the other tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path
root, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root))
import torch
torch.set_num_threads(1)
from tests import comfy_standin
from tests import comfy_harness as harness
harness.write_tiny_models(work / "models")
modules = comfy_standin.install(work / "models", work / "comfy", root / "tests" / "data" / "t5-v1_1-xxl")
before = comfy_standin.snapshot()
spec = importlib.util.spec_from_file_location("pixart_pack", root / "__init__.py",
                                              submodule_search_locations=[str(root)])
pack = importlib.util.module_from_spec(spec)
sys.modules["pixart_pack"] = pack
spec.loader.exec_module(pack)
from pixart_nodes import comfy_bridge
assert comfy_bridge.IN_COMFYUI, "the pack did not take the stand-ins for ComfyUI"
harness.Directories.output = harness.Directories.temp = str(work / "out")
prompt = json.loads((root / "workflows" / "api" / "pixart_delta_lcm_1024.json").read_text())
for node in prompt.values():
    for name in ("width", "height"):
        if name in node["inputs"]:
            node["inputs"][name] = 32
outputs = harness.Executor({**pack.NODE_CLASS_MAPPINGS, **harness.NATIVE_NODES}).run(prompt)
after = comfy_standin.snapshot()
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print(json.dumps({"changed": changed, "images": sum(len(o["images"]) for o in outputs.values()),
                  "loaded": len(modules["comfy.model_management"].loaded)}))
"""


def test_importing_and_running_the_pack_leaves_comfyui_untouched(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["changed"] == []
    assert result["images"] == 1 and result["loaded"] > 0  # it really ran, through ComfyUI's model management
