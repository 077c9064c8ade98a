"""Recipes and hardware profiles: YAML data that installs as ``cwca_export.recipes``.

This file only makes the folder a package, so the YAML files ship as its package data and
``importlib.resources`` finds them in an editable install and in a wheel alike.
"""
