"""The error tree: every exception class vqscope defines derives from
InspectorError and is listed in inspector/errors.py's docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import inspector
import probes
import tui
from inspector import errors


def _project_exceptions() -> dict[str, type]:
    found = {}
    for pkg in (inspector, probes, tui):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith(("_build_vqd", "__main__")):
                continue
            mod = importlib.import_module(info.name)
            for name, obj in vars(mod).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException)
                        and obj.__module__ == mod.__name__):
                    found[f"{mod.__name__}.{name}"] = obj
    return found


def test_every_project_exception_is_an_inspector_error_and_listed():
    found = _project_exceptions()
    assert "inspector.vhost_user.protocol.ProtocolViolation" in found   # the walk sees the tree
    for where, cls in found.items():
        assert issubclass(cls, errors.InspectorError), where
        assert not cls.__name__.startswith("_"), f"{where}: a private exception class"
        assert cls.__name__ in errors.__doc__, f"{where} is missing from inspector/errors.py's tree"
