"""Byte streams to agents: ``base`` is the interface, ``local`` pipes, ``ssh`` paramiko."""
