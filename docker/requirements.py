"""Print the pip requirements that pyproject.toml declares, one a line, so the image installs its
dependencies in a layer of their own, before the source is copied.

    python requirements.py pyproject.toml [--extras smollm2,c4] [--keep-installed torch,triton] [--exclude triton]

--keep-installed pins each named distribution that is already installed to its installed version, so pip keeps
the CUDA build of torch (and its Triton) that the base image ships instead of replacing it from PyPI; --exclude
leaves the named distributions out (the CPU image has no use for Triton).
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib


def requirement_name(requirement: str) -> str:
    """'torch>=2.4,<2.15' -> 'torch' (PEP 503 normalised)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict, extras: list[str], keep_installed: list[str],
                 exclude: list[str] = ()) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    lines = list(project.get("dependencies", [])) + [req for extra in extras for req in optional[extra]]
    keep = {requirement_name(name) for name in keep_installed}
    drop = {requirement_name(name) for name in exclude}
    out = []
    for line in lines:
        name = requirement_name(line)
        if name in drop:
            continue
        if name in keep:
            try:
                line = f"{name}=={metadata.version(name)}"
            except metadata.PackageNotFoundError:
                pass  # not in the base image: install it as pyproject.toml asks
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extras", default="", help="comma-separated optional-dependency groups")
    parser.add_argument("--keep-installed", default="", help="comma-separated distributions to pin as installed")
    parser.add_argument("--exclude", default="", help="comma-separated distributions to leave out")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        pyproject = tomllib.load(f)
    split = lambda s: [item.strip() for item in s.split(",") if item.strip()]
    sys.stdout.write("\n".join(requirements(pyproject, split(args.extras), split(args.keep_installed),
                                            split(args.exclude))) + "\n")


if __name__ == "__main__":
    main()
