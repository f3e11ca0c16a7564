"""Packaging: what the Comfy Registry, pip and ComfyUI read from the pack.

- pyproject.toml carries the fields the Registry reads (docs.comfy.org/registry/specifications,
  and the checks comfy-cli and the Registry apply to them), names the same requirements as
  requirements.txt, and its version heads a CHANGELOG.md section.
- `pip install <pack>` works in a clean virtual environment (no system site packages) and
  installs the package `comfyui_pladis` and nothing else; `pip install -r requirements.txt`
  works there too.
- The files git tracks, laid down in a custom_nodes folder as ComfyUI-Manager's clone or the
  Registry's archive would lay them down, load through ComfyUI's own custom-node loader, and
  ComfyUI's own pyproject parser reads our fields. The installed package imports as well.
- The Comfy CLI from PyPI (comfy-cli, in a virtual environment of its own) validates the
  tracked files as `comfy node publish` does, reads our fields, and refuses a broken copy.

The ComfyUI steps run in subprocesses with this interpreter (it has torch and ComfyUI's
requirements) and the ComfyUI that scripts/comfyui_host.py finds (COMFYUI_PATH first).
pip may fetch setuptools from the package index for its isolated build.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from host import comfyui_host

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

PACK = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((PACK / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT.get("project", {})
COMFY = PYPROJECT.get("tool", {}).get("comfy", {})
PACKAGE = "comfyui_pladis"
OUR_NODES = {"ApplyPLADIS", "PladisFluxPatch", "ApplyTGATE"}
# The accelerator classifiers comfy-cli and ComfyUI accept; one other drops them all.
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
# comfy-cli's pattern for each comma-separated part of requires-comfyui.
COMFYUI_VERSION_PART = re.compile(r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?")
STEP_TIMEOUT = 300
# The Comfy CLI that publishes to the Registry (`comfy node publish` runs `comfy node validate` first).
COMFY_CLI = "comfy-cli==1.23.0"


# ---------------------------------------------------------------------------------------------
# pyproject.toml, requirements.txt and CHANGELOG.md


def _requirement_key(text, where):
    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        pytest.fail(f"{where}: {text!r} is not a requirement: {e}")
    return (canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier), str(req.marker or ""), req.url or "")


def _requirements_txt():
    keys = set()
    for number, line in enumerate((PACK / "requirements.txt").read_text(encoding="utf-8").splitlines(), 1):
        text = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
        if not text:
            continue
        assert not text.startswith("-"), (
            f"requirements.txt:{number}: pip option {text!r} has no counterpart in [project] dependencies"
        )
        keys.add(_requirement_key(text, f"requirements.txt:{number}"))
    return keys


def test_requirements_txt_and_pyproject_name_the_same_requirements():
    assert "dependencies" not in PROJECT.get("dynamic", []), (
        "keep [project] dependencies static: the Registry reads them from pyproject.toml, not requirements.txt"
    )
    dependencies = PROJECT.get("dependencies")
    assert isinstance(dependencies, list), "[project] dependencies must be a list (empty when nothing is needed)"
    in_pyproject = {_requirement_key(d, "[project] dependencies") for d in dependencies}
    assert len(in_pyproject) == len(dependencies), "[project] dependencies names a requirement twice"
    in_txt = _requirements_txt()
    assert in_pyproject == in_txt, (
        f"only in pyproject.toml: {sorted(in_pyproject - in_txt)}; only in requirements.txt: {sorted(in_txt - in_pyproject)}"
    )


def test_project_has_what_the_registry_reads():
    name = PROJECT.get("name", "")
    # The Registry's node id: starts with a letter, letters/digits with single -, _ or . between.
    assert len(name) < 100 and re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", name), f"invalid node id {name!r}"

    version = PROJECT.get("version", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"version {version!r} is not X.Y.Z"
    assert "version" not in PROJECT.get("dynamic", [])

    description = PROJECT.get("description", "")
    assert description.strip() and len(description) <= 1000, "description: required, at most 1000 characters"

    license_ = PROJECT.get("license")
    if isinstance(license_, str):  # an SPDX expression (PEP 639); comfy-cli sends it as the licence's text
        assert license_.strip()
        for pattern in PROJECT.get("license-files", []):
            assert list(PACK.glob(pattern)), f"license-files: nothing matches {pattern!r}"
        assert PROJECT.get("license-files"), "name the LICENSE file in license-files"
    else:
        assert isinstance(license_, dict) and set(license_) & {"file", "text"}, (
            'license: an SPDX string, or { file = "LICENSE" } / { text = "..." }'
        )
        if "file" in license_:
            assert (PACK / license_["file"]).is_file()

    urls = PROJECT.get("urls", {})
    repository = urls.get("Repository", "")
    parsed = urlparse(repository)
    assert parsed.scheme == "https" and parsed.netloc and parsed.path.strip("/"), f"[project.urls] Repository {repository!r}"
    for label, url in urls.items():
        assert urlparse(url).scheme == "https", f"[project.urls] {label} = {url!r}"

    classifiers = PROJECT.get("classifiers", [])
    for classifier in classifiers:
        if classifier.startswith("Operating System :: "):
            assert classifier[len("Operating System :: "):].startswith(OS_PREFIXES), classifier
        if classifier.startswith("Environment ::"):
            assert classifier[len("Environment :: "):] in ACCELERATORS, (
                f"{classifier!r}: comfy-cli drops all accelerator classifiers when one is not one of {sorted(ACCELERATORS)}"
            )
    assert any(c.startswith("Operating System :: ") for c in classifiers), "say which operating systems the pack runs on"


def test_tool_comfy_has_what_the_registry_reads():
    publisher = COMFY.get("PublisherId", "")
    assert re.fullmatch(r"[a-z][a-z0-9-]*", publisher), f"PublisherId {publisher!r}: lowercase letters, digits, -"
    assert COMFY.get("DisplayName", "").strip(), "DisplayName"

    requires = COMFY.get("requires-comfyui", "")
    assert requires, "requires-comfyui"
    for part in requires.split(","):
        assert COMFYUI_VERSION_PART.fullmatch(part.strip()), f"requires-comfyui {requires!r}: {part!r}"

    includes = COMFY.get("includes", [])
    assert isinstance(includes, list)
    for folder in includes:
        assert (PACK / folder).exists(), f"includes: {folder!r} does not exist"

    icon = COMFY.get("Icon", "")
    parsed = urlparse(icon)
    assert parsed.scheme == "https" and parsed.netloc, f"Icon must be a URL, not {icon!r}"
    assert Path(parsed.path).suffix.lower() in {".svg", ".png", ".jpg", ".jpeg", ".gif"}, f"Icon {icon!r}: SVG, PNG, JPG or GIF"


def test_icon_is_in_the_repository_and_square():
    """An Icon served from this repository's raw files is there, square and at most 400 px."""
    icon = urlparse(COMFY.get("Icon", ""))
    repository = urlparse(PROJECT.get("urls", {}).get("Repository", "")).path.strip("/").removesuffix(".git")
    if icon.netloc != "raw.githubusercontent.com":
        return  # hosted elsewhere: nothing in the repository to check
    owner, repo, _branch, *path = icon.path.strip("/").split("/")
    assert f"{owner}/{repo}".lower() == repository.lower(), f"Icon {icon.geturl()} is not from {repository}"
    local = PACK.joinpath(*path)
    assert local.is_file(), f"Icon points at {'/'.join(path)}, which the pack lacks"
    if local.suffix.lower() == ".svg":
        root = ElementTree.parse(local).getroot()
        view_box = [float(v) for v in root.get("viewBox", "").replace(",", " ").split()]
        width = float(re.sub(r"px$", "", root.get("width", ""))) if root.get("width") else view_box[2]
        height = float(re.sub(r"px$", "", root.get("height", ""))) if root.get("height") else view_box[3]
        assert width == height and width <= 400, f"{local.name}: {width} x {height}, want square, at most 400 px"


def test_changelog_has_a_section_for_the_version():
    version = PROJECT["version"]
    changelog = (PACK / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^##\s+\[?v?(\d+\.\d+\.\d+[^\]\s]*)\]?", changelog, flags=re.MULTILINE)
    assert version in headings, f'CHANGELOG.md has no "## {version}" section (it has {headings})'
    newer = [h for h in headings if _version(h) > Version(version)]
    assert not newer, f"CHANGELOG.md has sections newer than pyproject's version {version}: {newer}"


def _version(text):
    try:
        return Version(text)
    except InvalidVersion:
        pytest.fail(f"CHANGELOG.md heading {text!r} is not a version")


# ---------------------------------------------------------------------------------------------
# The pack as shipped: the files git tracks


def _tracked_files():
    try:
        out = subprocess.run(
            ["git", "-C", str(PACK), "ls-files", "-z"], capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"packaging tests need the pack's git checkout (git ls-files failed: {e})")
    # A tracked file deleted in the working tree does not ship.
    return sorted(p for p in out.decode().split("\0") if p and (PACK / p).is_file())


def _untracked_hint():
    """A note naming the pack's Python files that git does not track: they do not ship."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PACK), "ls-files", "--others", "--exclude-standard", "--", "*.py"],
            capture_output=True, text=True, timeout=60,
        ).stdout.split()
    except OSError:
        return ""
    ours = [p for p in out if p == "__init__.py" or p.split("/")[0] in ("nodes", "pladis_comfy", "pladis_core")]
    return f"\nNot tracked by git, so not shipped (git add them if the pack needs them): {ours}" if ours else ""


def _lay_down(files, folder):
    for rel in files:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACK / rel, target)
    return folder


@pytest.fixture(scope="module")
def tracked():
    files = _tracked_files()
    assert "pyproject.toml" in files and "__init__.py" in files, "pyproject.toml and __init__.py must be tracked"
    return files


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("packaging")


def _run(command, step, hint=lambda: "", **kwargs):
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT, **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{step}: timed out after {STEP_TIMEOUT} s\n{e.stdout or ''}\n{e.stderr or ''}")
    if result.returncode != 0:
        pytest.fail(f"{step} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}{hint()}")
    return result


def _clean_environ():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _venv_python(env_dir):
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="module")
def installed(tracked, workdir):
    """A clean virtual environment with `pip install <a checkout of the pack>` done in it."""
    source = _lay_down(tracked, workdir / "checkout" / "comfyui-pladis")
    env_dir = workdir / "venv"
    env = _clean_environ()
    # The interpreter's own venv module: no system site packages, pip from ensurepip.
    _run([sys.executable, "-m", "venv", str(env_dir)], "python -m venv", env=env)
    python = str(_venv_python(env_dir))
    _run([python, "-m", "pip", "install", str(source)], "pip install <pack>", env=env, cwd=workdir)
    probe = textwrap.dedent(
        """
        import importlib.metadata as md, json, os, sys, sysconfig
        dist = md.distribution("comfyui-pladis")
        print(json.dumps({
            "version": md.version("comfyui-pladis"),
            "requires": dist.requires or [],
            "files": [f.as_posix() for f in dist.files],
            "purelib": sysconfig.get_paths()["purelib"],
            "base_prefix": sys.base_prefix, "prefix": sys.prefix,
            "site_dirs": [p for p in sys.path if os.path.basename(os.path.normpath(p)) in ("site-packages", "dist-packages")],
        }))
        """
    )
    info = json.loads(_run([python, "-c", probe], "reading the installed metadata", env=env, cwd=workdir).stdout)
    return {"python": python, "source": source, "env": env, **info}


def test_pip_install_into_a_clean_venv(installed, tracked):
    assert installed["prefix"] != installed["base_prefix"], "not a virtual environment"
    prefix = Path(installed["prefix"]).resolve()
    outside = [p for p in installed["site_dirs"] if not Path(p).resolve().is_relative_to(prefix)]
    assert not outside, f"the virtual environment sees other site packages: {outside}"
    assert installed["version"] == PROJECT["version"]
    assert {_requirement_key(r, "Requires-Dist") for r in installed["requires"]} == {
        _requirement_key(d, "[project] dependencies") for d in PROJECT["dependencies"]
    }

    files = [f for f in installed["files"] if "__pycache__" not in f.split("/")]
    top = {f.split("/")[0] for f in files}
    dist_info = f"{PACKAGE}-{PROJECT['version']}.dist-info"
    assert top == {PACKAGE, dist_info}, f"the wheel installs more than {PACKAGE}/: {sorted(top)}"
    modules = {f for f in files if f.startswith(f"{PACKAGE}/")}
    # Every Python module (and the CPU kernel's C++ source) git tracks outside tests/, bench/ and
    # scripts/ ships, and nothing else.
    expected = {
        f"{PACKAGE}/{p}"
        for p in tracked
        if p.endswith((".py", ".cpp")) and (p == "__init__.py" or p.split("/")[0] in ("nodes", "pladis_comfy", "pladis_core"))
    }
    assert {f"{PACKAGE}/pladis_core/entmax.py", f"{PACKAGE}/pladis_core/cpu_rows.cpp"} <= expected
    assert modules == expected, (
        f"missing from the wheel (add the package to [tool.setuptools] packages, or the file to package-data?): {sorted(expected - modules)}; "
        f"not expected in it: {sorted(modules - expected)}"
    )


def test_pip_install_requirements_txt_into_the_clean_venv(installed):
    _run(
        [installed["python"], "-m", "pip", "install", "-r", str(installed["source"] / "requirements.txt")],
        "pip install -r requirements.txt",
        env=installed["env"],
    )


# ---------------------------------------------------------------------------------------------
# ComfyUI


@pytest.fixture(scope="module")
def comfyui_root():
    root = comfyui_host.find_comfyui()
    if root is None:
        pytest.fail("No ComfyUI found: set COMFYUI_PATH, or run scripts/setup.sh to lay down the pinned one.")
    return Path(root)


# Runs in a fresh interpreter: ComfyUI as tests/host.py sets it up, then one step; prints one JSON line.
_COMFYUI_PRELUDE = """
import asyncio, json, logging, sys
root = sys.argv[1]
sys.path.insert(0, root)
import torch
from comfy.cli_args import args
if not torch.cuda.is_available():
    args.cpu = True
import nodes

class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

warnings = Collect()
logging.getLogger().addHandler(warnings)

def node_modules():
    return {name: nodes.NODE_CLASS_MAPPINGS[name].__module__ for name in NODES if name in nodes.NODE_CLASS_MAPPINGS}
"""

_LOAD_CUSTOM_NODE = """
folder = sys.argv[2]
ok = asyncio.run(nodes.load_custom_node(folder))
loader_warnings = list(warnings.messages)
from comfy_config import config_parser
config = config_parser.extract_node_configuration(folder)
print("RESULT " + json.dumps({
    "ok": ok,
    "modules": node_modules(),
    "warnings": loader_warnings,
    "config": config.model_dump(mode="json"),
}))
"""

_IMPORT_INSTALLED = """
sys.path.append(sys.argv[2])  # the clean venv's site-packages, after ComfyUI's and this interpreter's own
import comfyui_pladis
extension = asyncio.run(comfyui_pladis.comfy_entrypoint())
node_list = asyncio.run(extension.get_node_list())
print("RESULT " + json.dumps({
    "file": comfyui_pladis.__file__,
    "ids": [cls.GET_SCHEMA().node_id for cls in node_list],
    "modules": {cls.GET_SCHEMA().node_id: cls.__module__ for cls in node_list},
}))
"""


def _comfyui_step(step, script, *args, cwd):
    code = f"NODES = {sorted(OUR_NODES)!r}\n" + _COMFYUI_PRELUDE + script
    result = _run([sys.executable, "-c", code, *map(str, args)], step, hint=_untracked_hint, cwd=cwd)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"{step}: no result\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):]), result.stderr


def test_tracked_files_load_from_a_custom_nodes_folder(tracked, workdir, comfyui_root):
    folder = _lay_down(tracked, workdir / "ComfyUI" / "custom_nodes" / "comfyui-pladis")
    out, log = _comfyui_step("loading the pack in ComfyUI", _LOAD_CUSTOM_NODE, comfyui_root, folder, cwd=workdir)
    assert out["ok"], (
        "ComfyUI's load_custom_node returned False:\n" + "\n".join(out["warnings"]) + log[-4000:] + _untracked_hint()
    )
    assert set(out["modules"]) == OUR_NODES, f"registered: {out['modules']}"
    module_name = str(folder).replace(".", "_x_")  # how load_custom_node names a folder's module
    for node_id, module in out["modules"].items():
        assert module.startswith(module_name), f"{node_id} comes from {module}, not from {folder}"
    assert not out["warnings"], "ComfyUI warned while loading the pack:\n" + "\n".join(out["warnings"])

    # What ComfyUI (and ComfyUI-Manager through it) reads from our pyproject.toml.
    _check_config_read(out["config"])


def _check_config_read(config):
    """A parsed pyproject.toml (ComfyUI's or comfy-cli's PyProjectConfig as a dict) holds our fields."""
    project, comfy = config["project"], config["tool_comfy"]
    assert project["name"] == PROJECT["name"]
    assert project["version"] == PROJECT["version"]
    assert project["description"] == PROJECT["description"]
    assert project["dependencies"] == PROJECT["dependencies"]
    assert project["urls"]["repository"] == PROJECT["urls"]["Repository"]
    assert project["license"]["text"] or project["license"]["file"]
    assert project["supported_comfyui_version"] == COMFY["requires-comfyui"]
    os_classifiers = [c for c in PROJECT.get("classifiers", []) if c.startswith("Operating System :: ")]
    assert project["supported_os"] == [c[len("Operating System :: "):] for c in os_classifiers]
    assert comfy["publisher_id"] == COMFY["PublisherId"]
    assert comfy["display_name"] == COMFY["DisplayName"]
    assert comfy["icon"] == COMFY["Icon"]


def test_installed_package_imports_in_comfyui(installed, workdir, comfyui_root):
    out, _ = _comfyui_step(
        "importing the installed package", _IMPORT_INSTALLED, comfyui_root, installed["purelib"], cwd=workdir
    )
    assert Path(out["file"]).resolve() == (Path(installed["purelib"]) / PACKAGE / "__init__.py").resolve()
    assert OUR_NODES <= set(out["ids"]), f"the pack's extension lists {out['ids']}"
    assert all(module.startswith(f"{PACKAGE}.nodes.") for module in out["modules"].values()), out["modules"]


# ---------------------------------------------------------------------------------------------
# The Comfy CLI (PyPI's comfy-cli), in a virtual environment of its own


@pytest.fixture(scope="module")
def comfy_cli(tracked, workdir):
    """(run, checkout): run(args, cwd) runs `comfy` there; checkout holds the tracked files."""
    env_dir = workdir / "comfy-cli"
    env = _clean_environ()
    _run([sys.executable, "-m", "venv", str(env_dir)], "python -m venv", env=env)
    _run([str(_venv_python(env_dir)), "-m", "pip", "install", "-q", COMFY_CLI], f"pip install {COMFY_CLI}", env=env)
    comfy = str(env_dir / "bin" / "comfy")

    def run(args, cwd):
        command = [comfy, "--skip-prompt", "--no-enable-telemetry", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT, env=env, cwd=cwd)

    return run, _venv_python(env_dir), _lay_down(tracked, workdir / "cli-checkout" / "comfyui-pladis")


def test_comfy_cli_validates_pyproject(comfy_cli):
    run, _, checkout = comfy_cli
    result = run(["node", "validate"], checkout)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"comfy node validate failed:\n{out[-4000:]}"
    # Its security checks (ruff) only warn: a clean pack gets this line instead of warnings.
    assert "All validation checks passed successfully" in out, out[-4000:]


def test_comfy_cli_refuses_a_broken_pyproject(comfy_cli, tmp_path):
    """The control: the same command fails when pyproject.toml has no version."""
    run, _, checkout = comfy_cli
    broken = shutil.copytree(checkout, tmp_path / "comfyui-pladis")
    text = (broken / "pyproject.toml").read_text(encoding="utf-8")
    (broken / "pyproject.toml").write_text(re.sub(r'(?m)^version = ".*"$', 'version = ""', text), encoding="utf-8")
    result = run(["node", "validate"], broken)
    assert result.returncode != 0 and "version is empty" in result.stdout + result.stderr, result.stdout[-4000:]


def test_comfy_cli_reads_our_fields(comfy_cli):
    _, python, checkout = comfy_cli
    # Its dataclasses hold tomlkit values, which dataclasses.asdict cannot copy.
    probe = textwrap.dedent(
        """
        import dataclasses, json, sys
        from comfy_cli.registry.config_parser import extract_node_configuration

        def plain(o):
            if dataclasses.is_dataclass(o):
                return {f.name: plain(getattr(o, f.name)) for f in dataclasses.fields(o)}
            if isinstance(o, (list, tuple)):
                return [plain(v) for v in o]
            return str(o) if isinstance(o, str) else o

        print(json.dumps(plain(extract_node_configuration(sys.argv[1]))))
        """
    )
    result = _run([str(python), "-c", probe, str(checkout / "pyproject.toml")], "comfy-cli's extract_node_configuration")
    _check_config_read(json.loads(result.stdout.strip().splitlines()[-1]))
