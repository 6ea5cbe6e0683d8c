"""mamp: memory-aligned mixed-precision LLM serving.

The repository keeps three top-level folders, installed as subpackages of this one (pyproject.toml maps them):
`kernels/` -> mamp.kernels (format, layers, kernels), `quantizer/` -> mamp.quantizer, `server/` -> mamp.server.
Installed this way no top-level `kernels` package exists to shadow (or be shadowed by) the PyPI package of that
name, which transformers imports when it is present. docs/ARCHITECTURE.md maps the modules.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _unshadow() -> None:
    """Drop a source checkout's root from sys.path. `python -m mamp...` or `python -m pytest` run in the checkout
    put it first, and there its `kernels/` folder shadows the PyPI package `kernels`, which transformers (5.x
    requires it) imports with every Llama model: `cannot import name ... from 'kernels'`. mamp's own modules come
    from the installed mapping above, never from the root."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not (_os.path.isfile(_os.path.join(root, "pyproject.toml"))
            and _os.path.isfile(_os.path.join(root, "kernels", "cpu_decode_layer.cpp"))):
        return  # an installed copy: its parent is site-packages, which stays
    mod = _sys.modules.get("kernels")
    if mod is not None and (getattr(mod, "__file__", None) or "").startswith(root + _os.sep):
        del _sys.modules["kernels"]  # imported from the checkout before us: let the next import find PyPI's
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != root]
    # A script run as `python benchmarks/x.py` has benchmarks/ first on the path, where benchmarks/kernels.py
    # shadows PyPI's package the same way (and scripts may put that folder back later): import PyPI's now, with
    # the folder out of the way, so that every later `import kernels` finds it in sys.modules.
    bench = _os.path.join(root, "benchmarks")
    if "kernels" not in _sys.modules and any(_os.path.abspath(p or _os.curdir) == bench for p in _sys.path):
        import importlib.util as _util

        saved = _sys.path[:]
        _sys.path[:] = [p for p in saved if _os.path.abspath(p or _os.curdir) != bench]
        try:
            if _util.find_spec("kernels") is not None:
                import kernels  # noqa: F401  (PyPI's)
        except Exception:  # a broken install: transformers will say so where it needs the package
            pass
        finally:
            _sys.path[:] = saved


_unshadow()
