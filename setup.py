"""Setuptools entry point; metadata and dependencies live in setup.cfg.

The twistd plugin is a module of Twisted's ``twisted.plugins`` namespace. It is listed
as a package here (with no ``__init__.py`` of ours, which would shadow Twisted's) so that a
plain ``pip install .`` puts it where ``twistd`` looks.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["wsprovider", "wsprovider.*"]) + ["twisted.plugins"],
)
