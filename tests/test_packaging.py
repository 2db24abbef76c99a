"""What can be checked here of packaging/: Docker, compose, LiteLLM, systemd, nginx.

Docker cannot run on this machine, so its files are parsed and every path and
command they name is checked against the project. Tools that exist (nginx,
systemd-analyze) check their files for real.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from swapd.cli import build_parser as swapd_parser
from swapd.config import load_config
from swapd.setup import build_parser as setup_parser

PKG = ROOT / "packaging"
DOCS = ROOT / "docs" / "integrations"


# -- a small Dockerfile parser ------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def stages(instructions):
    """Split into build stages: [(from_args, [(instr, args), ...]), ...]."""
    result = []
    for instr, args in instructions:
        if instr == "FROM":
            result.append((args, []))
        elif result:
            result[-1][1].append((instr, args))
    return result


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((PKG / "docker" / "Dockerfile").read_text())


def test_dockerfile_instructions_are_known(dockerfile):
    known = {"ARG", "FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "EXPOSE", "VOLUME",
             "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL", "SHELL", "STOPSIGNAL"}
    assert {i for i, _ in dockerfile} <= known
    assert dockerfile[0][0] in ("ARG", "FROM")


def test_dockerfile_is_multi_stage_cuda(dockerfile):
    st = stages(dockerfile)
    assert len(st) == 2
    build_from, build_body = st[0]
    run_from, run_body = st[1]
    assert re.match(r"nvidia/cuda:\S+-devel-ubuntu\S+ AS llama-build", build_from)
    assert re.match(r"nvidia/cuda:\S+-runtime-ubuntu\S+$", run_from)
    # the build stage builds llama-server with CUDA through `swapd setup`, with flags it has
    run = [a for i, a in build_body if i == "RUN" and "swapd.setup" in a]
    assert len(run) == 1
    argv = shlex.split(run[0].split("python3 -m swapd.setup", 1)[1])
    args = setup_parser().parse_args(argv)
    assert args.install_dir == "/opt/llama/bin" and args.no_verify
    assert "-DGGML_CUDA=ON" in args.cmake_arg
    copied = [a for i, a in run_body if i == "COPY" and "--from=llama-build" in a]
    assert copied and copied[0].split()[1] == "/opt/llama/bin/llama-server"


def test_dockerfile_copy_sources_exist(dockerfile):
    for instr, args in dockerfile:
        if instr not in ("COPY", "ADD") or "--from=" in args:
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for src in words[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} is missing from the project"


def test_dockerfile_runtime_stage(dockerfile):
    body = stages(dockerfile)[1][1]
    env = " ".join(a for i, a in body if i == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    users = [a for i, a in body if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = [a for i, a in body if i == "HEALTHCHECK"]
    assert health and "/health" in health[0]
    entry = yaml.safe_load([a for i, a in body if i == "ENTRYPOINT"][-1])  # JSON form is YAML
    assert entry[0].endswith("tini") and entry[1] == "--"
    assert entry[2] == "/opt/swapd/bin/swapd"  # the console script the venv install makes
    cmd = yaml.safe_load([a for i, a in body if i == "CMD"][-1])
    swapd_parser().parse_args(cmd)  # flags swapd really has
    assert cmd[cmd.index("--config") + 1] == "/etc/swapd/config.yaml"
    copies = [a.split() for i, a in body if i == "COPY"]
    assert ["packaging/docker/config.yaml", "/etc/swapd/config.yaml"] in copies


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["swapd"] == "swapd.cli:main"


def test_docker_config_is_a_valid_swapd_config():
    config = load_config(str(PKG / "docker" / "config.yaml"))
    for model in config.models.values():
        assert model.cmd[0] == "llama-server"  # on PATH in the image: /usr/local/bin


def test_compose_file():
    path = PKG / "docker" / "compose.yaml"
    doc = yaml.safe_load(path.read_text())
    svc = doc["services"]["swapd"]
    context = (path.parent / svc["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / svc["build"]["dockerfile"]).is_file()
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for volume in svc["volumes"]:
        src = volume.split(":")[0]
        if "$" not in src:
            assert (path.parent / src).exists(), f"compose mounts {src}, which is missing"
    grace = int(str(svc["stop_grace_period"]).rstrip("s"))
    assert grace >= 30


# -- LiteLLM ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.yaml", "two-swapd.yaml"])
def test_litellm_configs(name):
    doc = yaml.safe_load((PKG / "litellm" / name).read_text())
    assert doc["general_settings"]["background_health_checks"] is False
    for entry in doc["model_list"]:
        params = entry["litellm_params"]
        assert params["model"].startswith("openai/")
        assert params["api_base"].startswith("os.environ/SWAPD_")
        assert entry["model_info"]["disable_background_health_check"] is True
        assert params["timeout"] >= 300
    if name == "two-swapd.yaml":
        names = [e["model_name"] for e in doc["model_list"]]
        assert len(names) == 2 and len(set(names)) == 1, "two deployments of one model name: load balancing"
        assert doc["router_settings"]["num_retries"] >= 1
        # LiteLLM cools a deployment down once its failures exceed allowed_fails;
        # anything above 0 lets every retry of a request land on a dead instance
        assert doc["router_settings"]["allowed_fails"] == 0


# -- systemd ------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNIT = PKG / "systemd" / "swapd.service"


def test_systemd_unit_settings():
    svc = parse_unit(UNIT.read_text())["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["KillMode"] == "mixed"
    assert int(one["TimeoutStopSec"]) >= 60
    assert one["Restart"] == "on-failure"
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["User"] == "swapd"
    assert set(one["SupplementaryGroups"].split()) >= {"video", "render"}
    allowed = " ".join(svc["DeviceAllow"])
    for dev in ("char-nvidia-frontend", "char-nvidia-uvm", "/dev/nvidiactl"):
        assert dev in allowed
    for path in one["ReadWritePaths"].split():
        assert path.startswith("/var/")
    argv = shlex.split(one["ExecStart"])
    assert argv[0] == "/opt/swapd/bin/swapd"
    swapd_parser().parse_args(argv[1:])


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if system_units is None:
        pytest.skip("no systemd unit directory to verify against")
    # A throw-away root: the unit, stand-ins for the commands it runs (verify
    # checks they are executable) and systemd's own units it depends on.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/swapd.service")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    svc = parse_unit(UNIT.read_text())["Service"]
    for key in ("ExecStart", "ExecReload"):
        exe = shlex.split(svc[key][-1])[0].lstrip("-@!+")
        stub = root / exe.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    r = subprocess.run([tool, "verify", f"--root={root}", "swapd.service"], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "swapd.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


# -- nginx --------------------------------------------------------------------------


def test_nginx_conf_passes_nginx_t(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not nginx:
        pytest.skip("nginx is not installed (scripts/test.sh installs it; tests/e2e/test_nginx.py runs it)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\nevents {{}}\n"
        f"http {{\n  access_log off;\n  proxy_temp_path {tmp_path / 'proxy'};\n"
        f"  client_body_temp_path {tmp_path / 'body'};\n  include {PKG / 'nginx' / 'swapd.conf'};\n}}\n"
    )
    r = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_nginx_conf_streaming_settings():
    text = (PKG / "nginx" / "swapd.conf").read_text()
    for directive in ("proxy_buffering off", "proxy_cache off", "proxy_request_buffering off", "gzip off",
                      "proxy_http_version 1.1", 'proxy_set_header Connection ""'):
        assert re.search(rf"^\s*{re.escape(directive)};", text, re.M), directive
    assert re.search(r"^\s*keepalive \d+;", text, re.M)
    size = re.search(r"client_max_body_size (\d+)m;", text)
    assert size and int(size.group(1)) >= 128
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        value = re.search(rf"{timeout} (\d+)s;", text)
        assert value and int(value.group(1)) >= 600, timeout


# -- docs ---------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["nginx", "litellm", "open-webui", "systemd", "docker", "vllm"])
def test_integration_page_exists_and_names_real_files(page):
    text = (DOCS / f"{page}.md").read_text()
    for ref in re.findall(r"(packaging/[\w./-]+\.(?:conf|yaml|service)|packaging/docker/Dockerfile)", text):
        assert (ROOT / ref).is_file(), f"docs/integrations/{page}.md names {ref}, which is missing"


def test_readme_starts_with_the_real_model_quickstart():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    assert "swapd setup" in first_block and "--print-config-path" in first_block
    assert "bash scripts/test.sh" in text
    assert "## Integrations" in text
