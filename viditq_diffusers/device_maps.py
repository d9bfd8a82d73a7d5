"""accelerate device maps ({module name: device}, devices "cpu" and "disk" included): where a tensor goes, whether
a map offloads, and the maps accelerate cannot dispatch. Pure functions on the map, for the diffusers quantizer."""

from __future__ import annotations


def mapped_device(device_map: dict, name: str):
    """The device a `device_map` gives the tensor or module `name`: its own entry or its closest ancestor's."""
    while name not in device_map and name:
        name = name.rpartition(".")[0]
    return device_map.get(name)


def offloads(device_map) -> bool:
    """Whether a resolved `device_map` offloads modules (a "disk" entry, or "cpu" beside another device)."""
    return isinstance(device_map, dict) and ("disk" in device_map.values() or len(set(device_map.values())) > 1)


def nested_map_problem(device_map) -> str | None:
    """Why accelerate cannot dispatch a `device_map` in which a module and one of its submodules get different
    devices (its hook places a module with all its submodules), or None. Maps from `device_map="auto"` never
    nest; a hand-written one often does, e.g. {"": "cpu", "transformer_blocks": "disk"}."""
    if not isinstance(device_map, dict):
        return None
    for child, device in device_map.items():
        parent = child
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in device_map and device_map[parent] != device:
                where = "the whole model ('')" if parent == "" else repr(parent)
                step = child[len(parent):].lstrip(".").split(".")[0]
                sibling = f"{parent}.{step}" if parent else step
                return (f"device_map maps {where} to {device_map[parent]!r} but its submodule {child!r} to "
                        f"{device!r}: accelerate places a module together with all its submodules, so it cannot "
                        f"dispatch this map (it fails on the offloaded tensors). Remove the entry {parent!r} and "
                        f"give each child of it its own entry instead, e.g. {{{sibling!r}: ..., <the other "
                        f"children of {where}>: {device_map[parent]!r}}}, as device_map='auto' does.")
    return None


def main_device(device_map: dict):
    """Where offloaded modules run: the map's first device other than "cpu" and "disk", else "cpu"."""
    return next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
