from setuptools import setup

setup(cffi_modules=["inspector/_build_vqd.py:ffibuilder"])
