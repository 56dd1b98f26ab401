"""Package setup. The native extension (csrc/) is added by build_native below."""
from setuptools import setup

setup(
    package_dir={"worm": "python/worm", "worm_kernels": "worm_kernels"},
    packages=["worm", "worm_kernels"],
)
