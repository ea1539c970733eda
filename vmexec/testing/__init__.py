"""Tools for testing vmexec, and code that uses it, offline on one machine.

- ``vmexec.testing.sshd.SSHServer``: a real OpenSSH ``sshd`` on 127.0.0.1 with throwaway
  host and client keys, for exercising ``provider="ssh"`` without any remote machine
  (``sshd_available()`` says why it cannot run, for skip messages).
- ``vmexec.testing.proxy.TCPProxy``: a loopback TCP forwarder whose ``cut()`` drops every
  connection at once, to simulate a network failure in the middle of a task.

Submodules are imported on demand: importing this package starts nothing and pulls in
no optional dependency.
"""
