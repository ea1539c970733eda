"""The program that runs on every machine: ``python -m vmexec.agent``.

Imports only the standard library, cloudpickle, psutil and vmexec's protocol/errors, so
that it runs on a bare machine with nothing else installed.
"""
