"""docker/Dockerfile and docker/README.md, checked without a Docker engine.

The Dockerfile is parsed: every file it copies must exist in the build context (and not be excluded by
.dockerignore), every extra it installs must be defined in pyproject.toml, and its pins must sit inside
the extras' ranges. Every `spo` command line in the README must parse against the real CLI, and the
training lines must resolve (recipe + --set) and launch what the README says, through `spo train --dry-run`.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKER_README = REPO / "docker" / "README.md"
DOCKERIGNORE = REPO / ".dockerignore"
REQUIRED_EXTRAS = {"train", "deepspeed", "flash", "eval"}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (the parser directive included)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.exists():
        return []
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.strip().startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def test_parser_joins_continuations_and_skips_comments():
    text = "# syntax=docker/dockerfile:1\nARG A=1\nRUN a \\\n    # note\n    && b\nCOPY x ./y\n"
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("ARG", "A=1", 2),
        ("RUN", "a && b", 3),
        ("COPY", "x ./y", 6),
    ]


def test_every_copied_path_exists_in_the_build_context_and_is_not_dockerignored(instructions):
    patterns = dockerignore_patterns()
    copies = [ins for ins in instructions if ins.keyword in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    checked = 0
    for ins in copies:
        tokens = shlex.split(ins.args)
        if any(t.startswith("--from=") for t in tokens):
            continue  # copied from another build stage, not from the context
        sources = [t for t in tokens if not t.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile line {ins.line}: COPY source {source!r} does not exist"
            assert not is_ignored(source, patterns), f"Dockerfile line {ins.line}: {source!r} is excluded by .dockerignore"
            checked += 1
    assert checked >= 3  # pyproject.toml, README.md, src at least


def test_project_sources_are_copied_before_the_install(instructions):
    keywords = [(ins.keyword, ins.args) for ins in instructions]
    install = next(i for i, (k, a) in enumerate(keywords) if k == "RUN" and ".[" in a)
    copied = {shlex.split(a)[0] for k, a in keywords[:install] if k == "COPY" and "--from" not in a}
    assert {"pyproject.toml", "src"} <= copied


def test_every_installed_extra_is_defined_and_the_required_ones_are_installed(instructions, pyproject):
    defined = set(pyproject["project"]["optional-dependencies"])
    installed: set[str] = set()
    for ins in instructions:
        if ins.keyword == "RUN":
            for group in re.findall(r"\.\[([A-Za-z0-9_,\- ]+)\]", ins.args):
                installed |= {extra.strip() for extra in group.split(",")}
    assert installed, "no `pip install .[extras]` found"
    assert installed <= defined, f"extras not defined in pyproject.toml: {sorted(installed - defined)}"
    assert REQUIRED_EXTRAS <= installed, f"missing extras: {sorted(REQUIRED_EXTRAS - installed)}"


def _requirement(pyproject: dict, extra: str, name: str):
    from packaging.requirements import Requirement

    for line in pyproject["project"]["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"{name} is not in the {extra} extra")


def test_base_image_is_cuda_devel_and_torch_and_flash_attn_are_pinned_inside_the_extras(instructions, pyproject):
    from packaging.version import Version

    args = arg_defaults(instructions)
    first_from = next(ins for ins in instructions if ins.keyword == "FROM")
    image = substitute(first_from.args.split()[0], args)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?devel-ubuntu\d+\.\d+", image), image

    torch_version = args["TORCH_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", torch_version), "torch must be pinned to an exact version"
    assert Version(torch_version) in _requirement(pyproject, "train", "torch").specifier
    cuda_major = args["CUDA_VERSION"].split(".")[0]
    assert re.search(rf"/cu{cuda_major}\d$", args["TORCH_INDEX_URL"]), "torch's CUDA major must match the base image"

    flash_version = args["FLASH_ATTN_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", flash_version)
    assert Version(flash_version) in _requirement(pyproject, "flash", "flash-attn").specifier
    assert int(args["MAX_JOBS"]) >= 1  # the compile is bounded
    run_text = " ".join(ins.args for ins in instructions if ins.keyword == "RUN")
    assert "--constraint" in run_text or "-c /opt/constraints.txt" in run_text  # extras may not replace torch


def test_spo_is_the_entrypoint_and_cache_and_outputs_are_volumes(instructions, pyproject):
    import json

    assert "spo" in pyproject["project"]["scripts"]
    entry = [ins for ins in instructions if ins.keyword == "ENTRYPOINT"][-1]
    assert json.loads(entry.args)[-1] == "spo"
    volumes = set(json.loads([ins for ins in instructions if ins.keyword == "VOLUME"][-1].args))
    env_text = " ".join(ins.args for ins in instructions if ins.keyword == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env_text).group(1)
    assert hf_home in volumes
    workdir = [ins for ins in instructions if ins.keyword == "WORKDIR"][-1].args
    assert f"{workdir}/outputs" in volumes  # shipped recipes write to outputs/... under the working directory


def test_spo_runs_under_an_init_installed_in_the_image_with_the_stop_grace_stated(instructions):
    """PID 1 without an init ignores signals it has no handler for (tests/train/test_train_container_init.py
    runs the entrypoint as PID 1 for real); the init must be installed, and the grace spo compares a save with is
    docker stop's default unless the user says otherwise."""
    import json

    entry = json.loads([ins for ins in instructions if ins.keyword == "ENTRYPOINT"][-1].args)
    assert entry == ["tini", "--", "spo"]
    installed = " ".join(ins.args for ins in instructions if ins.keyword == "RUN" and "apt-get install" in ins.args)
    assert re.search(r"\btini\b", installed)
    env_text = " ".join(ins.args for ins in instructions if ins.keyword == "ENV")
    assert re.search(r"\bSPO_STOP_GRACE_S=10\b", env_text)


# ---------------------------------------------------------------- README commands


def readme_commands() -> list[list[str]]:
    """Shell commands of the README's bash blocks, continuations joined, tokenized."""
    text = DOCKER_README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(shlex.split(command))
    return commands


def spo_argv(tokens: list[str]) -> list[str] | None:
    """The `spo` arguments of a docker command: after the image (entrypoint spo) or after `spo` in an exec."""
    if tokens[:2] == ["docker", "run"]:
        if "--entrypoint" in tokens:
            return None
        image = next(i for i, t in enumerate(tokens) if t.startswith("spo-align:"))
        return tokens[image + 1 :]
    if tokens[:2] == ["docker", "exec"]:
        return tokens[tokens.index("spo", 2) + 1 :]
    return None


def test_readme_build_line_and_image_tags_agree():
    commands = readme_commands()
    builds = [c for c in commands if c[:2] == ["docker", "build"]]
    assert len(builds) == 1
    build = builds[0]
    assert build[build.index("-f") + 1] == "docker/Dockerfile" and build[-1] == "."
    tag = build[build.index("-t") + 1]
    images = {t for c in commands if c[:2] == ["docker", "run"] for t in c if t.startswith("spo-align:")}
    assert images == {tag}


def test_readme_covers_one_gpu_eight_gpus_zero3_and_multi_node():
    commands = [c for c in readme_commands() if spo_argv(c)]
    trains = [spo_argv(c) for c in commands if spo_argv(c)[0] == "train"]
    assert any("distributed.num_processes=1" in argv for argv in trains)
    assert any(argv[1].startswith("spo_recipes/qwen2.5-7b-instruct/") and "zero3" in argv[1] for argv in trains)
    assert any("distributed.hostfile=/workspace/hostfile" in argv for argv in trains)
    assert all("--gpus" in c for c in commands if c[:2] == ["docker", "run"] and spo_argv(c)[0] == "train" and "--dry-run" not in c)


def _cli_group():
    import typer.main

    from spo_align.cli import app

    return typer.main.get_command(app)


@pytest.mark.parametrize("tokens", [c for c in readme_commands() if spo_argv(c)], ids=lambda c: " ".join(spo_argv(c))[:60])
def test_readme_spo_command_parses_against_the_real_cli(tokens):
    import click

    group = _cli_group()
    argv = spo_argv(tokens)
    command = group.commands.get(argv[0])
    assert command is not None, f"`spo {argv[0]}` is not a command (have: {sorted(group.commands)})"
    with click.Context(group) as parent:
        command.make_context(argv[0], list(argv[1:]), parent=parent)  # raises on unknown options / bad arity


def _dry_run(argv: list[str], tmp_path: Path, monkeypatch) -> str:
    from typer.testing import CliRunner

    from spo_align.cli import app

    fixed = []
    for token in argv:
        # Files the README mounts into the container (the hostfile) stand in as local temporary files.
        key, sep, value = token.partition("=")
        if sep and value.startswith("/workspace/") and not value.startswith("/workspace/outputs"):
            local = tmp_path / Path(value).name
            local.write_text("10.0.0.1 slots=8\n10.0.0.2 slots=8\n", encoding="utf-8")
            token = f"{key}={local}"
        fixed.append(token)
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, [*fixed, "--dry-run"] if "--dry-run" not in fixed else fixed)
    assert result.exit_code == 0, result.output
    return result.output


def test_readme_training_lines_resolve_and_launch_as_described(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    trains = {" ".join(spo_argv(c)): (c, spo_argv(c)) for c in readme_commands() if spo_argv(c) and spo_argv(c)[0] == "train"}
    assert trains
    for _, (tokens, argv) in trains.items():
        output = _dry_run(argv, tmp_path, monkeypatch)
        launch = output.splitlines()[0]
        if "zero3" in argv[1] and "distributed.hostfile=/workspace/hostfile" in argv:
            assert launch.startswith("launch: deepspeed --num_gpus=8")
            assert "--hostfile=" in launch and "--num_nodes=2" in launch
            master = next(t for t in tokens if t.startswith("MASTER_ADDR="))
            assert tokens[tokens.index(master) - 1] == "-e"
        elif "zero3" in argv[1]:
            assert launch.startswith("launch: deepspeed --num_gpus=8")
        elif "distributed.num_processes=1" in argv:
            assert "in-process" in launch
