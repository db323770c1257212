"""Prefect flows: thin orchestration over the `ecgproto` library."""

from ecgproto.settings import configure_environment

configure_environment()  # before anything imports prefect
