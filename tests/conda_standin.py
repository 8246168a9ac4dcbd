"""A stand-in for the `conda` command, enough for `snakemake --software-deployment-method conda` (no conda-forge here).

It answers the calls Snakemake makes (`info --json`, `--version`, `config --get`, `env create`, `clean`) and builds
each environment the way conda does what matters to us: the `pip:` entries of the environment file
are written to a requirements file beside it and installed with pip run from that file's folder, so a
relative path there resolves where conda would resolve it. The environment is a venv that sees this
interpreter's site-packages through a .pth line (so torch and friends need no download) but none of
its installed scripts or editable packages: `umtfss` exists in it only if the environment installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

import yaml

def install(base: Path) -> Path:
    """Write a `conda` command and an `activate` script under base/bin; returns that bin folder."""
    bin_dir = base / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    conda = bin_dir / "conda"
    conda.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {base} \"$@\"\n")
    conda.chmod(0o755)
    # Snakemake runs `source <conda_prefix>/bin/activate <env>; <command>`
    (bin_dir / "activate").write_text('export CONDA_PREFIX="$1"\nexport PATH="$1/bin:$PATH"\n')
    return bin_dir


def create_env(env_file: Path, prefix: Path) -> None:
    """`conda env create --file env_file --prefix prefix`, pip entries installed from env_file's folder."""
    spec = yaml.safe_load(env_file.read_text())
    venv.EnvBuilder(with_pip=False).create(prefix)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    (site / "_standin_outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip_specs = [entry for dep in spec.get("dependencies", []) if isinstance(dep, dict) for entry in dep.get("pip", [])]
    if pip_specs:
        with tempfile.NamedTemporaryFile("w", prefix="condaenv.", suffix=".requirements.txt",
                                         dir=env_file.parent, delete=False) as req:
            req.write("\n".join(pip_specs))
        try:
            proc = subprocess.run([str(prefix / "bin" / "python"), "-m", "pip", "install", "-U", "-r", req.name],
                                  cwd=env_file.parent, capture_output=True, text=True)
        finally:
            os.unlink(req.name)
        if proc.returncode:
            sys.exit(f"Pip failed\n{proc.stdout}\n{proc.stderr}")


def main(argv: list[str]) -> None:
    base, args = Path(argv[0]), argv[1:]
    if args == ["--version"]:
        print("conda 24.11.3")
    elif args[:2] == ["info", "--json"]:
        print(json.dumps({"conda_prefix": str(base), "platform": "linux-64", "envs_dirs": [str(base / "envs")]}))
    elif args[:2] == ["config", "--get"]:
        print(json.dumps({"get": {"channel_priority": "strict"}}))
    elif args[:1] == ["clean"]:  # Snakemake's --conda-cleanup-pkgs (tarballs by default): nothing cached here
        pass
    elif args[:2] == ["env", "create"]:
        create_env(Path(args[args.index("--file") + 1].strip('"')), Path(args[args.index("--prefix") + 1].strip('"')))
    else:
        sys.exit(f"conda stand-in: unsupported call {args}")


if __name__ == "__main__":
    main(sys.argv[1:])
