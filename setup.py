"""Setuptools entry point; metadata and dependencies live in setup.cfg.

The twistd plugin is a module of Twisted's ``twisted.plugins`` namespace. It is listed
as a package here (with no ``__init__.py`` of ours, which would shadow Twisted's) so that a
plain ``pip install .`` puts it where ``twistd`` looks.
"""
from setuptools import Extension, find_packages, setup

# Optional C loops for the frame and envelope paths (wsprovider/_accel.py falls back to
# pure Python when this does not build).
speedups = Extension("wsprovider._speedups", ["wsprovider/_speedups.c"], optional=True)

setup(
    packages=find_packages(include=["wsprovider", "wsprovider.*"]) + ["twisted.plugins"],
    ext_modules=[speedups],
)
