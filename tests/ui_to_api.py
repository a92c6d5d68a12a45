"""The ComfyUI frontend's UI-format -> API-format conversion (graphToPrompt, frontend 1.27), re-stated for tests.

Rules (read from the frontend: utils/executionUtil.ts graphToPrompt, litegraph ExecutableNodeDTO, widgets):
- A node's widgets are its widget inputs in INPUT_TYPES order, required then optional: INT, FLOAT, STRING, BOOLEAN
  and combos (a list, or "COMBO"), except inputs with forceInput. `widgets_values` is positional over them.
- An INT widget gets a companion "control after generate" widget right after it when its options say
  control_after_generate, or, when they do not say, when it is named seed or noise_seed. A combo with image_upload gets
  an upload button widget right after it. Both take a slot in widgets_values and are never sent to the API.
- Every serialised widget goes into inputs by name; then every connected input socket overrides it with
  [origin node id as a string, origin slot].
- A link from a bypassed node (mode 4) is followed through it: to its input at the same slot index when that input's
  type fits both the output's type and the target's, else its first input of exactly the target's type, else its first
  input whose type fits both. A link from a muted node (mode 2) is dropped, as is a link that resolves to nothing.
- Muted and bypassed nodes are not in the output; neither are virtual nodes (Note, MarkdownNote, Reroute; a Reroute
  passes its input through).
- Each API node is {"inputs", "class_type", "_meta": {"title"}} with the node's title (its display name by default).
"""

from __future__ import annotations

MODE_MUTED = 2
MODE_BYPASS = 4
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute")


class ConversionError(ValueError):
    pass


def widget_slots(input_types: dict) -> list[tuple[str, bool]]:
    """[(input name, sent to the API?)] in widgets_values order for a node class's INPUT_TYPES()."""
    slots = []
    for category in ("required", "optional"):
        for name, spec in input_types.get(category, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            is_combo = isinstance(kind, list) or kind == "COMBO"
            if not (is_combo or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            slots.append((name, True))
            if kind == "INT":
                control = options.get("control_after_generate")
                if control is None:
                    control = name in ("seed", "noise_seed")
                if control:
                    slots.append(("control_after_generate", False))
            if is_combo and options.get("image_upload"):
                slots.append(("upload", False))
    return slots


def _fits(a, b) -> bool:
    """litegraph's isValidConnection: same type (case-insensitive), a wildcard, or overlapping comma lists."""
    if a in ("*", "", 0) or b in ("*", "", 0) or a == b:
        return True
    a_set = {t.strip().lower() for t in str(a).split(",")}
    b_set = {t.strip().lower() for t in str(b).split(",")}
    return bool(a_set & b_set)


class _Graph:
    def __init__(self, workflow: dict):
        self.nodes = {n["id"]: n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # the newer object form
                self.links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"],
                                          link["target_slot"], link["type"])
            else:
                link_id, origin, origin_slot, target, target_slot, kind = link
                self.links[link_id] = (origin, origin_slot, target, target_slot, kind)

    def resolve_input(self, node: dict, slot: int, target_type=None, seen=frozenset()):
        """(origin node id, origin slot) feeding input `slot` of `node`, or None."""
        key = (node["id"], "in", slot)
        if key in seen:
            raise ConversionError(f"circular links through node {node['id']}")
        inputs = node.get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        link_id = inputs[slot]["link"]
        if link_id not in self.links:
            raise ConversionError(f"node {node['id']} input {inputs[slot]['name']} uses unknown link {link_id}")
        origin_id, origin_slot, *_ = self.links[link_id]
        return self.resolve_output(self.nodes[origin_id], origin_slot, target_type or inputs[slot].get("type"),
                                   seen | {key})

    def resolve_output(self, node: dict, slot: int, target_type, seen):
        if node.get("mode") == MODE_BYPASS:
            index = self._bypass_slot(node, slot, target_type)
            return None if index < 0 else self.resolve_input(node, index, None, seen)
        if node["type"] == "Reroute":
            return self.resolve_input(node, 0, target_type, seen)
        if node.get("mode") == MODE_MUTED:
            return None  # "inputs connected to removed nodes" are deleted
        return (str(node["id"]), slot)

    @staticmethod
    def _bypass_slot(node: dict, slot: int, target_type) -> int:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        output_type = outputs[slot]["type"] if slot < len(outputs) else target_type
        if target_type in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs) and _fits(inputs[slot]["type"], output_type) and _fits(inputs[slot]["type"], target_type):
            return slot
        for i, inp in enumerate(inputs):
            if inp["type"] == target_type:
                return i
        for i, inp in enumerate(inputs):
            if _fits(inp["type"], output_type) and _fits(inp["type"], target_type):
                return i
        return -1


def ui_to_api(workflow: dict, node_classes: dict[str, type], display_names: dict[str, str]) -> dict:
    """Convert a UI-format workflow to the API prompt the frontend would queue."""
    graph = _Graph(workflow)
    output: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        if kind not in node_classes:
            raise ConversionError(f"unknown node type {kind!r} (node {node['id']}): the page would show it as missing")
        slots = widget_slots(node_classes[kind].INPUT_TYPES())
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            raise ConversionError(f"node {node['id']}: widgets_values as a dict is not a core widget layout")
        if len(values) != len(slots):
            raise ConversionError(f"node {node['id']} ({kind}) has {len(values)} widget values for {len(slots)} "
                                  f"widgets {[s[0] for s in slots]}")
        inputs: dict = {}
        for (name, sent), value in zip(slots, values):
            if sent:
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for i, socket in enumerate(node.get("inputs") or []):
            resolved = graph.resolve_input(node, i)
            if resolved is not None:
                inputs[socket["name"]] = [resolved[0], resolved[1]]
        output[str(node["id"])] = {"inputs": inputs, "class_type": kind,
                                   "_meta": {"title": node.get("title") or display_names.get(kind, kind)}}
    for entry in output.values():  # links to nodes that are not in the output are removed
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                del entry["inputs"][name]
    return output
