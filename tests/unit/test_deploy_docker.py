"""The images, checked offline (no Docker here): the Dockerfiles are parsed
and held to what can be seen without building them."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from meshgate import mesh_auth

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES_DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "deploy" / "docker" / "triton.Dockerfile"
# What a final stage must not carry: compilers and build tool chains.
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|build-essential|cmake|cargo|rustc|python3-dev|libc6-dev)\b"
)


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == keyword]


def parse(path: pathlib.Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped,
    ARGs before the first FROM substituted into FROM lines."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif instruction == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], arguments).split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) == 3 else None))
        else:
            stages[-1].instructions.append((instruction, arguments))
    return stages


def _exec_form(arguments: str) -> list[str]:
    # ENTRYPOINT/CMD in JSON form; shell form would put a shell between the
    # signal and the service, and SIGTERM would never reach its drain.
    import json

    return json.loads(arguments)


def _chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "@sha256:" in image or bool(re.search(r"\d+\.\d+", tag)) and tag != "latest"


SERVICE_STAGES = parse(SERVICES_DOCKERFILE)
TRITON_STAGES = parse(TRITON_DOCKERFILE)


def test_the_services_image_is_multi_stage_with_a_target_per_service():
    names = [stage.name for stage in SERVICE_STAGES]
    assert names[0] == "build"
    assert set(mesh_auth.MESH_SERVICES) <= set(names)
    for service in mesh_auth.MESH_SERVICES:
        (stage,) = [s for s in SERVICE_STAGES if s.name == service]
        # Built on the runtime stage, which starts afresh from the base: the
        # build stage's tool venv and weights never reach a service image.
        chain = _chain(SERVICE_STAGES, stage)
        assert [s.name for s in chain] == [service, "runtime"]
        assert "build" not in {s.base for s in chain}


@pytest.mark.parametrize("service", mesh_auth.MESH_SERVICES)
def test_each_service_target_runs_its_entry_point_as_a_non_root_user_with_a_health_check(service):
    (stage,) = [s for s in SERVICE_STAGES if s.name == service]
    chain = _chain(SERVICE_STAGES, stage)
    (entrypoint,) = stage.all("ENTRYPOINT")
    assert _exec_form(entrypoint) == [f"meshgate-{service}"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert f"meshgate-{service}" in scripts and "meshgate-probe" in scripts
    (healthcheck,) = stage.all("HEALTHCHECK")
    assert _exec_form(healthcheck.split(" CMD ", 1)[1])[:2] == ["meshgate-probe", service]
    users = [user for s in reversed(chain) for user in s.all("USER")]
    assert users, "no USER: the service would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    assert uid.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    # It listens on all interfaces of its container, on the (first) port it exposes.
    (exposed,) = stage.all("EXPOSE")
    port = exposed.split()[0]
    assert f"MESHGATE_{service.upper()}__LISTEN=0.0.0.0:{port}" in " ".join(stage.all("ENV"))


def test_the_build_copies_what_the_wheel_test_builds_from():
    """tests/unit/test_deploy_wheel.py installs a wheel built from these same sources."""
    from tests.unit.test_deploy_wheel import IMAGE_SOURCES

    build = SERVICE_STAGES[0]
    copied = [shlex.split(arguments)[:-1] for arguments in build.all("COPY")]
    sources = {source for words in copied for source in words if not source.startswith("--")}
    assert set(IMAGE_SOURCES) <= sources
    assert sources - set(IMAGE_SOURCES) == {"model_repository/smollm2/build_tokenizer.py"}


def test_no_build_tools_in_the_final_stages():
    runtime = next(s for s in SERVICE_STAGES if s.name == "runtime")
    for stage in [runtime, *(s for s in SERVICE_STAGES if s.name in mesh_auth.MESH_SERVICES)]:
        for command in stage.all("RUN"):
            assert not BUILD_TOOLS.search(command), command
            assert "pip install" not in command, "the final stage copies the built venv, it installs nothing"
    # What the runtime copies from the build stage: the venv and the model
    # files, not the source tree.
    copies = [shlex.split(arguments) for arguments in runtime.all("COPY")]
    assert all(words[0] == "--from=build" for words in copies)
    assert {words[1] for words in copies} == {"/opt/meshgate", "/opt/meshgate-models"}
    # The build stage itself compiles nothing either: binary wheels only.
    build = SERVICE_STAGES[0]
    for command in build.all("RUN"):
        for install in re.findall(r"pip install[^&]*", command):
            assert "--only-binary=:all:" in install, install


@pytest.mark.parametrize("stages", [SERVICE_STAGES, TRITON_STAGES], ids=["services", "triton"])
def test_base_images_are_pinned_and_copied_sources_exist(stages):
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue
        assert _pinned(stage.base), stage.base
        for arguments in stage.all("COPY"):
            words = shlex.split(arguments)
            if any(word.startswith("--from=") for word in words):
                continue
            for source in [w for w in words if not w.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_the_image_finds_smollm2_files_without_a_checkout():
    runtime = next(s for s in SERVICE_STAGES if s.name == "runtime")
    environment = " ".join(runtime.all("ENV"))
    assert "MESHGATE_SMOLLM2_FILES=/opt/meshgate-models/smollm2" in environment
    build = " ".join(SERVICE_STAGES[0].all("RUN"))
    assert "/opt/meshgate-models/smollm2/tokenizer.json" in build
    assert "/opt/meshgate-models/smollm2/chat_template.jinja" in build


def test_the_triton_image_serves_the_bundled_models_as_a_non_root_user():
    final = TRITON_STAGES[-1]
    assert final.base.startswith("nvcr.io/nvidia/tritonserver:")
    assert final.all("USER") and final.all("USER")[-1] not in ("root", "0")
    assert final.all("HEALTHCHECK")
    (entrypoint,) = final.all("ENTRYPOINT")
    command = _exec_form(entrypoint)
    models = [arg.split("=", 1)[1] for arg in command if arg.startswith("--load-model=")]
    assert models
    for model in models:
        assert (ROOT / "model_repository" / model / "config.pbtxt").is_file()
    assert "--exit-on-error=true" in command


def test_the_triton_images_copy_of_meshgate_imports_minilm_alone(tmp_path):
    """The image holds the files of meshgate its Dockerfile copies (and an
    __init__ it makes empty), not the package: its __init__ imported
    meshgate.tasks, which the image lacked, so minilm failed to load and
    tritonserver exited (a review; the local stack and tests imported the
    checkout's whole package through the editable install and never saw it).
    Here the copy alone, the editable install's finder left out."""
    dockerfile = (ROOT / "deploy" / "docker" / "triton.Dockerfile").read_text()
    (copied,) = re.findall(r"^COPY ((?:meshgate/\S+ )+)/tmp/meshgate/$", dockerfile, re.M)
    package = tmp_path / "meshgate"
    package.mkdir()
    for source in copied.split():
        (package / pathlib.Path(source).name).write_text((ROOT / source).read_text())
    if re.search(r"touch /tmp/meshgate/__init__\.py", dockerfile):
        (package / "__init__.py").write_text("")
    script = (
        "import sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(tmp_path)!r}); "
        "import meshgate.minilm, meshgate; "
        f"assert meshgate.__file__.startswith({str(tmp_path)!r}), meshgate.__file__; "
        "assert set(sys.modules) >= {'meshgate.minilm'} and 'meshgate.tasks' not in sys.modules"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
