"""Fault tests of the Databricks target (issue 4, acceptance point 2), against the emulator.

A package, so that this folder's conftest.py is imported as `databricks_faults.conftest` and
never takes the place of tests/conftest.py under the module name `conftest`.
"""
