"""The Dockerfile and the install extras, checked without Docker and without the network.

The development machine has no Docker engine, so the image is never built here. What a build would
trip over first is checked by reading the files: the base tag, the apt packages against the base's
Ubuntu release, the Python the venv is made from, the pins (torch like pyproject's, TensorRT 10 for
onnxruntime-gpu's TensorRT provider) and that exactly one onnxruntime build is installed:
onnxruntime and onnxruntime-gpu install the same ``onnxruntime`` module into one folder, and pip
cannot say that they conflict, so every extras combination the Makefile, the Dockerfile and the
README install is resolved against pyproject.toml here.
"""
from __future__ import annotations

import importlib.metadata
import itertools
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# The one base the image is built on. "base" flavour: torch's nvidia-* wheels bring the CUDA libraries,
# so runtime/devel would duplicate them; 13.0.3 is the CUDA update torch 2.13.0's wheel pins
# (cuda-toolkit==13.0.3, read from its metadata with pip's resolver for cp312 / manylinux x86_64).
BASE_IMAGE = "nvidia/cuda:13.0.3-base-ubuntu24.04"
BASE_TAG = re.compile(r"nvidia/cuda:(?P<cuda>\d+)\.(?P<minor>\d+)\.\d+-(?P<flavour>base|runtime)-ubuntu(?P<ubuntu>\d+\.\d+)")

# Package names of Ubuntu 24.04 "noble" (main and universe, amd64), written down from the release's
# package lists, not looked up by this test. Only names known to exist there belong here: e.g.
# python3.11 / python3.11-venv / python3.11-dev do not (noble's python3 is 3.12), nor does jammy's
# libglib2.0-0 (noble's is libglib2.0-0t64). Add a package here only after checking it for noble.
NOBLE_PACKAGES = {
    "python3", "python3-venv", "python3-dev", "python3-pip",
    "gcc", "g++", "make", "build-essential", "ninja-build",
    "git", "ca-certificates", "curl",
    "openssh-client", "openssh-server", "pdsh",
    "numactl", "libnuma-dev", "libaio-dev",
}
PACKAGES_BY_RELEASE = {"24.04": NOBLE_PACKAGES}

# Distributions that each install the `onnxruntime` module (the runtime itself; companions such as
# onnxruntime-extensions or onnxruntime-genai install other modules and are not builds).
NOT_BUILDS = {"onnxruntime-extensions", "onnxruntime-genai", "onnxruntime-tools"}


def is_onnxruntime_build(name: str) -> bool:
    name = canonicalize_name(name)
    return name not in NOT_BUILDS and (name == "onnxruntime" or name.startswith(("onnxruntime-", "ort-nightly")))


# ---------------------------------------------------------------------------------------------------
# reading the files


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined as Docker joins them, comments dropped."""
    out, buf = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (buf is None and not stripped):
            continue  # comment lines (also inside a continuation) and blank lines
        part = line.rstrip()
        if part.endswith("\\"):
            buf = (buf or "") + part[:-1]
            continue
        logical = ((buf or "") + part).strip()
        buf = None
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert buf is None, "the Dockerfile ends inside a line continuation"
    return out


def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def simple_commands(shell: str) -> list[list[str]]:
    """The simple commands of a shell line: words, split at &&, ||, ;, |, ! and parentheses."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "!", "(", ")", "&"} or set(token) <= set("&|;()"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def run_commands(instructions) -> list[list[str]]:
    return [cmd for kw, args in instructions if kw == "RUN" for cmd in simple_commands(args)]


PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-i", "--index-url",
                     "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
                     "--platform", "--python-version", "--implementation", "--abi", "--no-binary",
                     "--only-binary", "--upgrade-strategy", "--progress-bar", "--cache-dir", "--src", "--log",
                     "--trusted-host", "-C", "--config-settings", "--report"}


def pip_installs(commands: list[list[str]]) -> list[dict]:
    """Every `pip install` (also `python -m pip install`): its requirement arguments and its options."""
    found = []
    for words in commands:
        for i in range(len(words) - 1):
            if Path(words[i]).name in {"pip", "pip3"} and words[i + 1] == "install":
                break
        else:
            continue
        requirements, options, args = [], {}, words[i + 2:]
        j = 0
        while j < len(args):
            word = args[j]
            if word.startswith("-"):
                key, eq, value = word.partition("=")
                if key in PIP_VALUE_OPTIONS and not eq:
                    value, j = args[j + 1], j + 1
                options.setdefault(key, []).append(value)
                if key in {"-e", "--editable"}:
                    requirements.append(value)
            else:
                requirements.append(word)
            j += 1
        found.append({"words": words, "requirements": requirements, "options": options})
    return found


def project_requirements(extras: set[str], project: dict | None = None) -> list[Requirement]:
    """pyproject's dependencies plus those of ``extras`` (self-references like multiclip[x] followed)."""
    project = (project or pyproject())["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    unknown = extras - set(optional)
    assert not unknown, f"extras {sorted(unknown)} are not in pyproject.toml (it has {sorted(optional)})"
    out, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in optional[extra]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


LOCAL_PROJECT = re.compile(r"^\.(?:\[(?P<extras>[^\]]*)\])?$")


def requirements_of(pip: dict) -> list[Requirement]:
    """What one pip install asks for directly; `.[extras]` is resolved from pyproject.toml."""
    out = []
    for arg in pip["requirements"]:
        local = LOCAL_PROJECT.match(arg)
        if local:
            extras = {e.strip() for e in (local["extras"] or "").split(",") if e.strip()}
            out.extend(project_requirements(extras))
        else:
            out.append(Requirement(arg))
    for path in pip["options"].get("-r", []) + pip["options"].get("--requirement", []):
        out.extend(Requirement(line.split("#")[0].strip()) for line in (ROOT / path).read_text().splitlines()
                   if line.split("#")[0].strip())
    return out


def names(requirements) -> list[str]:
    return [canonicalize_name(r.name) for r in requirements]


def onnxruntime_builds(requirements) -> list[str]:
    return sorted({canonicalize_name(r.name) for r in requirements if is_onnxruntime_build(r.name)})


def pinned(requirements, name: str) -> str:
    specs = [r.specifier for r in requirements if canonicalize_name(r.name) == canonicalize_name(name)]
    assert len(specs) == 1, f"{name} is asked for {len(specs)} times: {specs}"
    (spec,) = specs
    assert len(spec) == 1 and next(iter(spec)).operator == "==", f"{name} is not pinned with ==: {spec}"
    return next(iter(spec)).version


# ---------------------------------------------------------------------------------------------------
# the Dockerfile


def test_base_image_is_cuda13_base_flavour_on_ubuntu_24_04():
    froms = [args for kw, args in dockerfile() if kw == "FROM"]
    assert froms == [BASE_IMAGE], f"expected one stage FROM {BASE_IMAGE}, got {froms}"
    tag = BASE_TAG.fullmatch(froms[0])
    assert tag and tag["flavour"] != "devel" and "cudnn" not in froms[0]
    assert tag["cuda"] == "13", "torch 2.13.0's PyPI wheel and onnxruntime-gpu 1.31 are CUDA 13 builds"
    assert tag["ubuntu"] in PACKAGES_BY_RELEASE


def test_apt_packages_exist_in_the_base_release():
    release = BASE_TAG.fullmatch(BASE_IMAGE)["ubuntu"]
    known = PACKAGES_BY_RELEASE[release]
    installs = [w for w in run_commands(dockerfile()) if w[:1] in (["apt-get"], ["apt"]) and "install" in w]
    assert installs, "the Dockerfile installs no apt packages (it needs at least python3)"
    packages = [p for w in installs for p in w[w.index("install") + 1:] if not p.startswith("-")]
    unknown = sorted(set(packages) - known)
    assert not unknown, f"apt packages not known to exist in Ubuntu {release}: {unknown}"
    for needed in ("python3", "python3-venv"):
        assert needed in packages, f"{needed} is not installed (the venv is made from the base's Python)"


def test_python_is_the_base_releases_own():
    for kw, args in dockerfile():
        versioned = re.findall(r"python3\.\d+", args)
        assert not versioned, f"{kw} {args[:80]}...: versioned Python {versioned} (Ubuntu 24.04 has only python3 = 3.12)"
    venvs = [w for w in run_commands(dockerfile()) if "venv" in w and "-m" in w]
    assert venvs and all(w[0] == "python3" for w in venvs), venvs
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains("3.12"), \
        "pyproject's requires-python must admit the image's Python 3.12"


def test_exactly_one_onnxruntime_build_is_installed():
    pips = pip_installs(run_commands(dockerfile()))
    assert pips, "the Dockerfile runs no pip install"
    requirements = [r for pip in pips for r in requirements_of(pip)]
    assert onnxruntime_builds(requirements) == ["onnxruntime-gpu"], onnxruntime_builds(requirements)
    words = [w for pip in pips for w in pip["words"]]
    commands = run_commands(dockerfile())
    assert not any(w[:2] == ["pip", "uninstall"] or w[1:4] == ["-m", "pip", "uninstall"] for w in commands), \
        "no uninstall/reinstall dance: install one build in the first place"
    assert "--force-reinstall" not in words


def test_pins_follow_pyproject_and_constraints():
    pips = pip_installs(run_commands(dockerfile()))
    first = pips[0]
    assert names(requirements_of(first)) == ["torch"], "torch is installed first, alone"
    project_torch = pinned(project_requirements({"train"}), "torch")
    assert pinned(requirements_of(first), "torch") == project_torch
    constraints = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    assert pinned(constraints, "torch") == project_torch
    rest = [pip for pip in pips[1:] if any(LOCAL_PROJECT.match(a) for a in pip["requirements"])]
    assert rest and all(pip["options"].get("-c") == ["constraints.txt"] for pip in rest), \
        "the project is installed under constraints.txt (which holds torch)"
    for pip in pips:
        assert not {"-i", "--index-url", "--extra-index-url", "-f", "--find-links"} & set(pip["options"]), \
            f"no other index: PyPI's torch==2.13.0 is the CUDA 13.0 build ({' '.join(pip['words'])})"


def test_tensorrt_10_for_the_tensorrt_provider():
    """serving/ asks for TensorRT first; onnxruntime-gpu 1.31's provider loads libnvinfer.so.10."""
    requirements = [r for pip in pip_installs(run_commands(dockerfile())) for r in requirements_of(pip)]
    trt = [r for r in requirements if canonicalize_name(r.name).startswith("tensorrt")]
    assert len(trt) == 1, f"expected one TensorRT package, got {trt}"
    match = re.fullmatch(r"tensorrt-cu(\d+)-libs", canonicalize_name(trt[0].name))
    assert match and match[1] == BASE_TAG.fullmatch(BASE_IMAGE)["cuda"], trt[0]
    assert pinned(trt, trt[0].name).split(".")[0] == "10", f"{trt[0]}: TensorRT 11 does not fit onnxruntime-gpu 1.31"


def test_run_lines_are_valid_shell_and_python():
    for kw, args in dockerfile():
        if kw != "RUN" or args.startswith("["):
            continue
        check = subprocess.run(["sh", "-n"], input=args, text=True, capture_output=True)
        assert check.returncode == 0, f"RUN {args[:80]}...: {check.stderr}"
        words = shlex.split(args)
        for i, word in enumerate(words[:-2]):
            if word in {"python", "python3"} and words[i + 1] == "-c":
                compile(words[i + 2], "<Dockerfile RUN python -c>", "exec")
    assert "://" not in "\n".join(args for _, args in dockerfile()), "no URLs: the packages come by name"


# ---------------------------------------------------------------------------------------------------
# pyproject extras


def test_base_dependencies_name_no_onnxruntime_build():
    assert onnxruntime_builds(project_requirements(set())) == []


def test_cpu_and_gpu_extras_are_the_only_conflict():
    optional = pyproject()["project"]["optional-dependencies"]
    assert onnxruntime_builds(project_requirements({"cpu"})) == ["onnxruntime"]
    assert onnxruntime_builds(project_requirements({"gpu"})) == ["onnxruntime-gpu"]
    for n in range(len(optional) + 1):
        for combo in itertools.combinations(sorted(optional), n):
            builds = onnxruntime_builds(project_requirements(set(combo)))
            conflicting = {"cpu", "gpu"} <= set(combo)
            assert (len(builds) > 1) == conflicting, f".[{','.join(combo)}] brings {builds}"


def test_base_dependencies_bring_no_onnxruntime_build_transitively():
    """Walked through this environment's installed metadata (the same pins; markers as evaluated here)."""
    todo = [(r, "multiclip") for r in project_requirements(set())]
    seen, found = set(), []
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        if is_onnxruntime_build(name):
            found.append(f"{name} (from {parent})")
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. a GPU-only wheel this CPU environment lacks
        for spec in requires:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append((sub, name))
    assert not found, found


@pytest.mark.parametrize("path", ["Makefile", "Dockerfile", "README.md"])
def test_no_extras_combination_in_use_brings_two_builds(path):
    text = (ROOT / path).read_text()
    combos = re.findall(r"""(?:^|(?<=["'\s]))\.\[([\w, -]+)\](?=["'\s]|$)""", text, flags=re.M)
    if path != "README.md":
        assert combos, f"{path} installs the project with no extras"
    for combo in combos:
        extras = {e.strip() for e in combo.split(",") if e.strip()}
        builds = onnxruntime_builds(project_requirements(extras))
        assert len(builds) <= 1, f"{path}: .[{combo}] brings {builds}"


def test_make_setup_installs_the_cpu_build():
    """The development machine and CI (make test) have no GPU: their venv gets the CPU build, once."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index("$(STAMP): pyproject.toml")
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(PY)", "python"))
    pips = pip_installs([w for line in recipe for w in simple_commands(line)])
    requirements = [r for pip in pips for r in requirements_of(pip)]
    assert onnxruntime_builds(requirements) == ["onnxruntime"], onnxruntime_builds(requirements)
    torch_first = [pip for pip in pips if names(requirements_of(pip)) == ["torch"]]
    assert torch_first, "the Makefile installs torch alone before the project"
    assert pinned(requirements_of(torch_first[0]), "torch") == pinned(project_requirements({"train"}), "torch")
