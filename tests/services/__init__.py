"""Tests of py/webmacs/services."""
