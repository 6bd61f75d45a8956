"""Prefect flows and tasks of the pipeline: a thin layer that calls residual_core.

Flows arrive with the orchestration issue; the science stays importable without Prefect.
"""
