"""ComfyUI workflow formats: the UI (LiteGraph) format the frontend saves and the template browser opens, and
the API format /prompt runs; conversion both ways from node definitions in /object_info form.

The frontend's rules (frontend 1.32): a node's widgets are its inputs of a widget type (INT, FLOAT, STRING,
BOOLEAN, a combo list or COMBO) without `forceInput`, in input order (required, then optional); an INT (or
combo) input gets one extra "control after generate" value when its spec sets `control_after_generate`, and an
INT named seed/noise_seed gets one unless the spec sets `control_after_generate` to false.  `widgets_values`
lists the widget values in that order; `inputs` lists the link sockets; `links` rows are
[id, origin node, origin slot, target node, target slot, type].
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Optional

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
FRONTEND_ONLY = ("Note", "MarkdownNote")  # virtual nodes of the frontend: never sent to /prompt
NODE_WIDTH = 340
COLUMN_GAP = 60
ROW_GAP = 40


def ordered_inputs(info: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of every input of a node definition (an /object_info entry), in frontend order."""
    spec = info["input"]
    order = info.get("input_order") or {k: list(spec.get(k, {})) for k in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = spec[section][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}))
    return out


def is_widget(kind: Any, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def has_control(name: str, kind: Any, options: dict) -> bool:
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return kind == "INT" and name in SEED_NAMES


def widgets(info: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """(widget name, followed by a control value) in widgets_values order."""
    return [(name, has_control(name, kind, opts)) for name, kind, opts in ordered_inputs(info)
            if is_widget(kind, opts)]


def ui_to_api(ui: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """The /prompt form of a UI-format workflow (muted/bypassed and frontend-only nodes left out)."""
    links = {row[0]: row for row in ui.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']!r}")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        for name, control in widgets(object_info[node["type"]]):
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
            inputs[name] = values.pop(0)
            if control:
                values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                row = links[socket["link"]]
                inputs[socket["name"]] = [str(row[1]), row[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _columns(prompt: Mapping[str, dict]) -> dict[str, int]:
    """Layout column of each node: its longest distance from a node without link inputs."""
    column: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in column:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            column[node_id] = 1 + max((depth(s) for s in sources), default=-1)
        return column[node_id]

    for node_id in prompt:
        depth(node_id)
    return column


def api_to_ui(prompt: Mapping[str, dict], object_info: Mapping[str, Any],
              notes: Optional[list[tuple[str, tuple[int, int]]]] = None) -> dict:
    """A UI-format workflow for an API prompt (numeric ids), laid out left to right by dependency depth.
    Every widget value must be given in the prompt (widget values are positional in the UI format)."""
    column = _columns(prompt)
    rows: dict[int, int] = defaultdict(int)
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = defaultdict(list)
    order = sorted(prompt, key=lambda i: (column[i], int(i)))
    for node_id in order:
        node = prompt[node_id]
        info = object_info[node["class_type"]]
        values, sockets = [], []
        for name, control in widgets(info):
            if name not in node["inputs"] or isinstance(node["inputs"][name], list):
                raise ValueError(f"node {node_id}: widget {name!r} needs a constant value in the prompt")
            values.append(node["inputs"][name])
            if control:
                values.append("fixed")
        for name, kind, opts in ordered_inputs(info):
            value = node["inputs"].get(name)
            if is_widget(kind, opts):
                continue
            socket = {"name": name, "type": kind, "link": None}
            if isinstance(value, list):
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(node_id), len(sockets),
                              object_info[prompt[value[0]]["class_type"]]["output"][value[1]]])
                out_links[(value[0], value[1])].append(link_id)
                socket["link"] = link_id
            sockets.append(socket)
        height = 40 + 20 * max(len(sockets), len(info["output"])) + 24 * len(values)
        x = 40 + column[node_id] * (NODE_WIDTH + COLUMN_GAP)
        y = 40 + rows[column[node_id]]
        rows[column[node_id]] += height + ROW_GAP
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [x, y], "size": [NODE_WIDTH, height],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": sockets, "outputs": [],
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values})
    for n in nodes:
        info = object_info[n["type"]]
        names = info.get("output_name") or info["output"]
        n["outputs"] = [{"name": names[i], "type": kind, "links": out_links.get((str(n["id"]), i), []),
                         "slot_index": i} for i, kind in enumerate(info["output"])]
    next_id = max([n["id"] for n in nodes], default=0) + 1
    for k, (text, pos) in enumerate(notes or []):
        nodes.append({"id": next_id + k, "type": "MarkdownNote", "pos": list(pos), "size": [NODE_WIDTH + 60, 180],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": max([n["id"] for n in nodes], default=0), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
            "version": 0.4}


def definition_of(node_class: type) -> dict:
    """The /object_info entry ComfyUI serves for a V1 node class (the parts the conversions read)."""
    spec = node_class.INPUT_TYPES()
    outputs = list(node_class.RETURN_TYPES)
    return {"input": {k: spec.get(k, {}) for k in ("required", "optional")},
            "input_order": {k: list(spec.get(k, {})) for k in ("required", "optional")},
            "output": outputs, "output_name": list(getattr(node_class, "RETURN_NAMES", None) or outputs)}
