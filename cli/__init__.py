"""The ``mess-ai`` command line: the top layer. It parses arguments, starts flows (``flows/``) and long-running
services (``deployments/``), and prints what happened; nothing below it imports it."""
