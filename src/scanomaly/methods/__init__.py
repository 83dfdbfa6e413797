"""Built-in methods. Importing this package registers each one with the Detector registry."""

import importlib

# one module per method, imported here so that it registers; a listed module that does not exist is
# skipped, any other import error (a dependency a method needs) is raised
for _module in ("healthygan", "anogan", "fanogan", "ganomaly", "alad", "alocc", "padim", "patchcore", "ddad"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{_module}":  # a real missing dependency, not a method not written yet
            raise
