"""Pipelines: studies as chains of stages that resume (see `stages`)."""
