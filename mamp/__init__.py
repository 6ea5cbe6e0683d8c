"""mamp: memory-aligned mixed-precision LLM serving.

The repository keeps three top-level folders, installed as subpackages of this one (pyproject.toml maps them):
`kernels/` -> mamp.kernels (format, layers, kernels), `quantizer/` -> mamp.quantizer, `server/` -> mamp.server.
Installed this way no top-level `kernels` package exists to shadow (or be shadowed by) the PyPI package of that
name, which transformers imports when it is present. docs/ARCHITECTURE.md maps the modules.
"""
__version__ = "0.1.0"
