"""CPU-torch workaround for ComfyUI's venv, imported at interpreter start by a `.pth` file.

PyPI's torchvision wheel is linked against CUDA torch: with the CPU torch its `_C` extension does not
load, and then torchvision's fake-kernel registrations fail because the `torchvision::nms` / `qnms`
op schemas were never defined. We define those schemas just before torchvision is first imported
(a meta-path hook, so interpreters that never touch torchvision do not pay for importing torch).
"""

import importlib.abc
import sys

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def define_schemas():
    import torch

    global _lib
    _lib = torch.library.Library("torchvision", "FRAGMENT")  # a global: the definitions live as long as it
    for name, schema in SCHEMAS.items():
        try:
            torch.ops.torchvision.__getattr__(name)  # already defined (a working torchvision _C)
        except (AttributeError, RuntimeError):
            _lib.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_schemas()
        return None  # let the normal finders import it


def install():
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
