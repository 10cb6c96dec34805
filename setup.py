"""Maps the top-level folders into the one `qcompile` namespace.

`find_packages` runs per folder so a new subpackage can never be dropped from the wheel
(a static list would silently miss it; tests/test_packaging.py checks the built wheel).
"""
from setuptools import find_packages, setup

ROOTS = {"qcompile": "compiler", "qcompile.passes": "passes", "qcompile.plugins": "plugins"}

packages, package_dir = [], {}
for namespace, folder in ROOTS.items():
    package_dir[namespace] = folder
    packages.append(namespace)
    for sub in find_packages(folder):
        packages.append(f"{namespace}.{sub}")
        package_dir[f"{namespace}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
