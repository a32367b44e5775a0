"""compose.yaml agrees with the code: settings names, commands, health checks, dependencies."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
from conftest import REPO

from unmask.settings import Settings

yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _defaults(text: str) -> str:
    """`text` with every ${VAR:-default} replaced by its default (what runs when VAR is unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def _parse(command: list[str]):
    """The command's arguments as `unmask` parses them (fails on an unknown flag)."""
    from unmask.cli import build_parser

    assert command[0] == "unmask", command
    return build_parser(command[1]).parse_args(command[1:])


def test_services_and_profiles(compose):
    services = compose["services"]
    assert {"redis", "server", "worker", "worker-cpu"} <= set(services)
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in services["worker"] and "profiles" not in services["server"]


def test_every_unmask_variable_is_a_setting_and_parses(compose):
    names = set(Settings.env_names().values())
    for name, service in compose["services"].items():
        env = _env(service)
        unknown = {k for k in env if k.startswith("UNMASK_")} - names
        assert not unknown, f"{name}: {unknown} are not Settings fields"
        values = {k: v for k, v in env.items() if k.startswith("UNMASK_") and "${" not in v}
        Settings.from_env(values)  # every value parses and validates


def test_front_end_and_workers_share_the_broker_and_model_name(compose):
    services = compose["services"]
    envs = {n: _env(services[n]) for n in ("server", "worker", "worker-cpu")}
    brokers = {e["UNMASK_BROKER_URL"] for e in envs.values()}
    names = {e.get("UNMASK_MODEL_NAME", "default") for e in envs.values()}
    assert brokers == {"redis://redis:6379/0"} and len(names) == 1
    assert envs["worker"]["UNMASK_DEVICE"] == "cuda"
    assert envs["worker-cpu"]["UNMASK_DEVICE"] == "cpu"
    server = envs["server"]
    assert server["UNMASK_HOST"] == "0.0.0.0"
    grpc_port, http_port = server["UNMASK_PORT"], server["UNMASK_HTTP_PORT"]
    # both published on loopback by default (host address and ports overridable); the HTTP
    # gateway + playground on loopback only
    ports = services["server"]["ports"]
    assert [_defaults(p) for p in ports] == [f"127.0.0.1:{grpc_port}:{grpc_port}",
                                             f"127.0.0.1:{http_port}:{http_port}"]  # fmt: skip
    assert ports[1].startswith("127.0.0.1:")


def test_redis_is_durable_private_and_checked(compose):
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    # reached over the compose network: Debian's redis-server (the local base) needs this said
    assert cmd[cmd.index("--protected-mode") + 1] == "no"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert "ports" not in redis  # not published outside the compose network
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_every_service_has_a_health_check_and_waits_for_a_healthy_redis(compose):
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and check["test"][0] == "CMD", name
        if name != "redis":
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_commands_and_health_checks_are_real_cli_commands(compose):
    services = compose["services"]
    assert _parse(services["server"]["command"]).func.__name__ == "cmd_serve"
    for name in ("worker", "worker-cpu"):
        assert services[name]["command"] == ["unmask", "worker"]
        check = _parse(services[name]["healthcheck"]["test"][1:])
        assert check.func.__name__ == "cmd_health" and check.worker
    check = _parse(services["server"]["healthcheck"]["test"][1:])
    port = _env(services["server"])["UNMASK_PORT"]
    assert check.func.__name__ == "cmd_health" and check.server == f"127.0.0.1:{port}"


def test_the_gpu_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "deploy" not in compose["services"]["worker-cpu"]


def test_the_monitoring_profile_scrapes_the_front_end_and_every_worker(compose):
    services = compose["services"]
    for name in ("flower", "prometheus"):
        assert services[name]["profiles"] == ["monitoring"], name
        assert services[name]["image"].startswith("${UNMASK_"), name  # overridable
    envs = {n: _env(services[n]) for n in ("server", "worker", "worker-cpu")}
    ports = {int(e["UNMASK_METRICS_PORT"]) for e in envs.values()}
    assert len(ports) == 1 and 0 not in ports
    port = ports.pop()
    for name, env in envs.items():  # reachable from the Prometheus container, not published
        assert env["UNMASK_HOST"] == "0.0.0.0" and str(port) in services[name]["expose"], name
    assert f"{port}:{port}" not in " ".join(services["server"]["ports"])
    # the scrape config is the file mounted into the Prometheus container
    source, target = services["prometheus"]["volumes"][0].split(":")[:2]
    assert target == "/etc/prometheus/prometheus.yml"
    assert f"--config.file={target}" in services["prometheus"]["command"]
    jobs = {j["job_name"]: j for j in yaml.safe_load((REPO / source).read_text())["scrape_configs"]}
    assert jobs["unmask-server"]["static_configs"][0]["targets"] == [f"server:{port}"]
    dns = jobs["unmask-worker"]["dns_sd_configs"][0]  # every container of each worker service
    assert set(dns["names"]) == {"worker", "worker-cpu"} and dns["port"] == port
    # Flower watches the same broker as the front end and the workers
    broker = [a for a in services["flower"]["command"] if a.startswith("--broker=")]
    assert broker == [f"--broker={envs['server']['UNMASK_BROKER_URL']}"]


def test_the_dockerfile_installs_the_package_and_defaults_to_serve():
    text = (REPO / "Dockerfile").read_text()
    for folder in ("src", "tokenizers", "models", "engine", "workers", "service"):
        assert f"COPY {folder} ./{folder}" in text, folder
    cmd = [line for line in text.splitlines() if line.startswith("CMD")][-1]
    assert shlex.split(cmd.replace("[", "").replace("]", "").replace(",", " "))[1:] == [
        "unmask", "serve",
    ]  # fmt: skip


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker compose is not available")
    out = subprocess.run([docker, "compose", "-f", str(REPO / "compose.yaml"), "config", "-q"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_images_are_overridable_and_default_to_docker_hub(compose):
    services = compose["services"]
    expected = {"redis": "${UNMASK_REDIS_IMAGE:-redis:7}", "server": "${UNMASK_IMAGE:-unmask:cpu}",
                "worker-cpu": "${UNMASK_IMAGE:-unmask:cpu}",
                "worker": "${UNMASK_GPU_IMAGE:-unmask:gpu}"}  # fmt: skip
    assert {name: services[name]["image"] for name in expected} == expected
    for name in ("server", "worker"):
        args = services[name]["build"]["args"]
        assert _defaults(args["BASE_IMAGE"]) == "python:3.11-slim", name
    # one build per image: the CPU worker runs the image the server builds
    assert "build" not in services["worker-cpu"]
    assert services["worker-cpu"]["image"] == services["server"]["image"]
    gpu = services["worker"]["build"]["args"]
    assert gpu["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # the CUDA build of torch
    assert gpu["TORCH_WHEEL"] == "none"  # never the CPU wheel of a wheelhouse
    assert "TORCH_WHEEL" not in services["server"]["build"]["args"]


def test_compose_variables_are_not_settings_unless_passed_as_such(compose):
    """A ${UNMASK_*} of compose.yaml that is also a setting is passed on under its own name
    (UNMASK_AUTH_TOKENS); the others (images, published ports) are no setting's name."""
    names = set(Settings.env_names().values())
    text = (REPO / "compose.yaml").read_text()
    for var in set(re.findall(r"\$\{(UNMASK_[A-Z0-9_]+)", text)) & names:
        for service in compose["services"].values():
            value = _env(service).get(var)
            assert value is None or value.startswith("${" + var), (var, value)


def test_every_build_arg_is_a_dockerfile_arg():
    dockerfile = (REPO / "Dockerfile").read_text()
    declared = set(re.findall(r"^ARG ([A-Z_]+)", dockerfile, re.M))
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        args = (service.get("build") or {}).get("args") or {}
        assert set(args) <= declared, (name, set(args) - declared)


def test_the_image_is_multi_stage_non_root_and_health_checked():
    text = (REPO / "Dockerfile").read_text()
    assert text.startswith("#") and "ARG BASE_IMAGE=python:3.11-slim" in text
    froms = re.findall(r"^FROM (.+)$", text, re.M)
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"], froms
    final = text[text.rindex("\nFROM ") :]
    # the final stage takes the virtual environment only: no sources, wheels or pip caches
    copies = re.findall(r"^COPY (.+)$", final, re.M)
    assert copies and all(c.startswith("--from=build /opt/") for c in copies), copies
    users = re.findall(r"^USER (\S+)$", final, re.M)
    assert users and users[-1] not in ("root", "0")
    check = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", final, re.M | re.S)
    assert check and '"unmask", "health"' in check.group(1)


def test_the_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore leaves out everything but the sources (and build/wheelhouse/)."""
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]  # fmt: skip
    assert ignore[0] == "*"
    included = {line[1:] for line in ignore if line.startswith("!")}
    text = (REPO / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in sources.split():
            path = re.sub(r"\[(.)\]", r"\1", source).rstrip("*")  # buil[d]/wheelhouse*
            assert path.split("/")[0] in included or path in included, source
    assert "build/wheelhouse" in included
