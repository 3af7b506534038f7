"""Maps the three source roots of the layout into the one package `dsv4_kernels`.

src/dsv4_kernels -> dsv4_kernels, reference/ -> dsv4_kernels.reference, backends/ -> dsv4_kernels.backends.
Metadata lives in pyproject.toml; only the package mapping is computed here.
"""
from setuptools import find_packages, setup

ROOTS = {
    "dsv4_kernels": "src/dsv4_kernels",
    "dsv4_kernels.reference": "reference",
    "dsv4_kernels.backends": "backends",
}

packages = []
for package, path in ROOTS.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(path)]

setup(packages=packages, package_dir=ROOTS)
