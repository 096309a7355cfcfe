"""graphtune's tuning-database schema, migrations and shipped records.

In a source checkout this is the repository's ``tuning_db/``; wheels ship it as the package
``graphtune.tuning_db`` (``[tool.setuptools.package-dir]`` in pyproject.toml), found by
``graphtune.autotune.db`` through importlib.resources. No code lives here.
"""
