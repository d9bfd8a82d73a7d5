"""Make the UI-format (litegraph, version 0.4) twin of an API-format workflow, from a server's /object_info.

The shipped `*_ui.json` files are generated from the `*_api.json` ones, so the two never drift apart
(tier 3 checks it). Regenerate after editing an API workflow:

    python -m harness.comfyui.workflow_ui  # starts ComfyUI with the pack; rewrites comfyui_nodes/workflows/*_ui.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    return [(name, info["input"][part][name]) for part in ("required", "optional")
            for name in info.get("input_order", {}).get(part, [])]


def depth(api: dict, node_id: str) -> int:
    parents = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
    return 1 + max((depth(api, p) for p in parents), default=-1)


def to_ui(api: dict, object_info: dict) -> dict:
    links, nodes, column_bottom = [], {}, {}
    for order, (node_id, node) in enumerate(api.items()):
        info, column = object_info[node["class_type"]], depth(api, node_id)
        ui = {"id": int(node_id), "type": node["class_type"], "pos": [40 + 360 * column, column_bottom.get(column, 40)],
              "size": [320, 0], "flags": {}, "order": order, "mode": 0, "inputs": [],
              "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                          for i, (n, t) in enumerate(zip(info["output_name"], info["output"]))],
              "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": []}
        if "title" in node.get("_meta", {}):
            ui["title"] = node["_meta"]["title"]
        for name, spec in ordered_inputs(info):
            value = node["inputs"].get(name)
            if isinstance(value, list):  # a link [source node, output slot]
                kind = "COMBO" if isinstance(spec[0], list) else spec[0]
                ui["inputs"].append({"name": name, "type": kind, "link": None, "_from": value})
            elif is_widget(spec):
                ui["widgets_values"].append(value if value is not None else spec[1].get("default", ""))
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    ui["widgets_values"].append("fixed")  # the frontend's extra widget after a seed
            else:
                ui["inputs"].append({"name": name, "type": spec[0], "link": None})
        ui["size"][1] = 40 + 24 * (len(ui["inputs"]) + len(ui["widgets_values"]))  # no overlap in the column
        column_bottom[column] = ui["pos"][1] + ui["size"][1] + 60
        nodes[node_id] = ui
    for node_id, ui in nodes.items():
        for slot, port in enumerate(ui["inputs"]):
            source = port.pop("_from", None)
            if source is None:
                continue
            output = nodes[str(source[0])]["outputs"][source[1]]
            link_id = len(links) + 1
            links.append([link_id, int(source[0]), source[1], int(node_id), slot, output["type"]])
            port["link"] = link_id
            output["links"].append(link_id)
    return {"last_node_id": max(int(i) for i in api), "last_link_id": len(links), "nodes": list(nodes.values()),
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    from . import workflows
    from .server import ComfyServer

    base = Path(tempfile.mkdtemp(prefix="viditq-ui-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "viditq").symlink_to(workflows.WORKFLOWS.parent)
    server = ComfyServer(base).start()
    try:
        object_info = server.get("/object_info")
    finally:
        server.stop()
    for path in sorted(workflows.WORKFLOWS.glob("*_api.json")):
        ui = to_ui(json.loads(path.read_text()), object_info)
        path.with_name(path.name.replace("_api.json", "_ui.json")).write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", path.name.replace("_api.json", "_ui.json"), file=sys.stderr)


if __name__ == "__main__":
    main()
