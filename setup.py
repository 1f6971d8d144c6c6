# setuptools needs this shim for cffi_modules (pyproject.toml holds everything else).
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
