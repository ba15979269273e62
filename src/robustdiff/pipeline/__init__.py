"""Pipelines that run several of robustdiff's jobs in one process, each stage in its own directory and resumable:
``demo`` (robustdiff-demo) and what such pipelines share (``stages``)."""
