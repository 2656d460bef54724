"""Build hook for the optional extension ``mf_kernels._C``.

Everything else is declared in pyproject.toml. The extension is built later by its own module
(`mf_kernels._cpp_lib`); a pure-Python install imports and passes the CPU tests without it.
"""
from setuptools import setup

setup()
