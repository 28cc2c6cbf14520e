"""The hostile-input corpus (issue 5): identifiers, values, files, configuration and state that a
user's machine can throw at the uploader, each checked for the outcome a user would expect.

A package, so that this folder's conftest.py is imported as `hostile.conftest` and never takes
the place of tests/conftest.py under the module name `conftest`.
"""
