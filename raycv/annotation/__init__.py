"""Bulk annotation with Ray Data: plan -> read/decode -> model actors -> rows -> write -> commit.

:mod:`raycv.annotation.pipeline` runs it; each step is a module of its own.
"""
