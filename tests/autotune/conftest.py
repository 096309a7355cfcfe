"""Tuning-database tests count records: fresh databases start empty here (no shipped records).

``tests/autotune/test_db.py::test_repository_shipped_records_load_through_the_import_path`` loads
the real shipped records.
"""
import pytest

from graphtune.autotune import db as dbmod


@pytest.fixture(autouse=True)
def _no_shipped_records(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(dbmod, "SHIPPED_DIR", tmp_path_factory.mktemp("no-shipped-records"))
