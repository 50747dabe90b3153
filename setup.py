"""Build hook: compile restorer-stub/ and ship it as ckpt/restore/_stub.py.

Everything else is declared in pyproject.toml.
"""
import importlib.util
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


def build_stub() -> None:
    spec = importlib.util.spec_from_file_location(
        "stub_build", ROOT / "restorer-stub" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build(ROOT / "ckpt" / "restore" / "_stub.py")


class BuildPy(build_py):
    def run(self):
        build_stub()
        super().run()


setup(cmdclass={"build_py": BuildPy})
