"""`make venv TORCH=system`: a venv that keeps the torch (and everything else) of the Python running this.

    python .ci/system_venv.py --venv .venv --require "numpy pytest ..." [--optional "pycocotools ..."] [--project .]

The venv gets the version of the interpreter running this script, and every package that interpreter
can import is importable in the venv too, after the venv's own: its site-packages *even when it is
itself a virtual environment*, as the torch of a GPU machine often is (`venv --system-site-packages`
would show only the base interpreter's packages and hide that torch).
Then only what is missing is installed: `--require` and `--optional` packages that are already there are
left alone, so this works offline; when pip cannot install a missing one, a required package is an
error that names it, an optional one a note (the tests that need it skip and say so). `--project DIR`
installs the project editable (`pip install --no-build-isolation --no-deps -e DIR`, which builds the
extension); where that cannot run (no setuptools>=77 to build with), a .pth puts DIR and DIR/src on
the venv's path instead, and the extension is JIT-built on first use.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

INHERIT_PTH = "_inherited_site.pth"
SOURCE_TREE_PTH = "_fai_mf_source_tree.pth"

# Run by the venv's python: "name>=version" requirements that are not installed (distribution metadata, so
# that e.g. pillow and pytest-benchmark need no import-name mapping).
MISSING_SCRIPT = r"""
import json, re, sys
from importlib import metadata

def release(text):
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])

missing = []
for requirement in sys.argv[1:]:
    name, op, wanted = re.match(r"([A-Za-z0-9_.\-]+)\s*(>=|==)?\s*([\w.]*)", requirement).groups()
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(requirement)
        continue
    if op == ">=" and release(have) < release(wanted) or op == "==" and release(have) != release(wanted):
        missing.append(requirement)
print(json.dumps(missing))
"""


def site_dirs() -> list[str]:
    """The package directories of this interpreter, in its own order (venv, base, user, dist-packages)."""
    dirs = [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    return list(dict.fromkeys(os.path.realpath(p) for p in dirs if os.path.isdir(p)))


def venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_site_packages(root: Path) -> Path:
    python = venv_python(root)
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def inherit(root: Path) -> list[str]:
    """Make this interpreter's package directories visible in the venv at `root`, after its own: one .pth
    whose lines run `site.addsitedir`, so that their own .pth files (editable installs, namespace shims)
    are read as well."""
    own = os.path.realpath(venv_site_packages(root))
    dirs = [d for d in site_dirs() if d != own]
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
    (venv_site_packages(root) / INHERIT_PTH).write_text("\n".join(lines) + "\n")
    return dirs


def missing(root: Path, requirements: list[str]) -> list[str]:
    if not requirements:
        return []
    out = subprocess.run([str(venv_python(root)), "-c", MISSING_SCRIPT, *requirements], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def pip_install(root: Path, packages: list[str]) -> bool:
    if not packages:
        return True
    return subprocess.run([str(venv_python(root)), "-m", "pip", "install", "-q", *packages]).returncode == 0


def install_project(root: Path, project: Path, use_pip: bool) -> str:
    """The project editable in the venv: pip's editable install, else the source tree on the venv's path."""
    project = project.resolve()
    if use_pip and subprocess.run([str(venv_python(root)), "-m", "pip", "install", "-q", "--no-build-isolation",
                                   "--no-deps", "-e", str(project)]).returncode == 0:
        return "editable install"
    (venv_site_packages(root) / SOURCE_TREE_PTH).write_text(f"{project}\n{project / 'src'}\n")
    return (f"source tree on the path ({SOURCE_TREE_PTH}; no `fai-mf` script: use `python -m fai_mf.cli`; the "
            "extension is JIT-built on first use)")


def create(root: Path) -> None:
    """The venv, without a pip of its own: the inherited one (if any) installs into it, and no bundled old
    setuptools shadows the newer one the project builds with."""
    if not venv_python(root).exists():
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python .ci/system_venv.py", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=".venv", type=Path)
    parser.add_argument("--require", default="", help="packages that must be importable (installed if missing)")
    parser.add_argument("--optional", default="", help="packages installed if missing, a note if that fails")
    parser.add_argument("--project", type=Path, help="install this project editable into the venv")
    parser.add_argument("--no-pip", action="store_true", help="never run pip (report what is missing)")
    args = parser.parse_args(argv)
    create(args.venv)
    dirs = inherit(args.venv)
    print(f"venv {args.venv}: sees the packages of {sys.executable} ({', '.join(dirs) or 'none'})")
    for kind, requirements in (("required", args.require.split()), ("optional", args.optional.split())):
        absent = missing(args.venv, requirements)
        if absent and not args.no_pip:
            print(f"venv {args.venv}: installing the missing {kind} packages {' '.join(absent)}")
            pip_install(args.venv, absent)
            absent = missing(args.venv, absent)
        if absent and kind == "required":
            print(f"error: {' '.join(absent)} required but not installed in {sys.executable} and pip cannot install "
                  f"them here (offline?); install them into that Python, or run make with PYTHON=<a python that has "
                  "them>", file=sys.stderr)
            return 1
        if absent:
            print(f"note: optional {' '.join(absent)} not installed; the tests that need them are skipped")
    if args.project:
        how = install_project(args.venv, args.project, use_pip=not args.no_pip)
        print(f"venv {args.venv}: the project at {args.project}: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
