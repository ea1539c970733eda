"""Tools for testing vmexec, and code that uses it, offline on one machine.

- ``vmexec.testing.sshd.SSHServer``: a real OpenSSH ``sshd`` on 127.0.0.1 with throwaway
  host and client keys, for exercising ``provider="ssh"`` without any remote machine
  (``sshd_available()`` says why it cannot run, for skip messages).
- ``vmexec.testing.proxy.TCPProxy``: a loopback TCP forwarder whose ``cut()`` drops every
  connection at once, to simulate a network failure in the middle of a task.
- ``vmexec.testing.localcloud.LocalCloud``: moto's EC2 on 127.0.0.1 whose instances boot
  for real as fake VMs on this computer (``vmexec.testing.fakevm``), each running its
  user-data with its own root, loopback address and sshd, so that
  ``VMExecutor(provider="ec2", **cloud.executor_options())`` runs end to end offline;
  with fault injection (capacity, quotas, throttling, dead machines, silent sshds,
  failed boots, spot notices). Its parts: ``motoserver``, ``faults``, ``machines``,
  ``network``, ``remote``, ``wheelhouse``; the fake VMs': ``fakevm``, ``vmhost``,
  ``control``, ``processes`` (and their scripts under ``scripts/``).
- ``vmexec.testing.faults``: ``FaultInjector`` and ``ApiCallCounter``, EC2 API errors
  and call counts through botocore events on any ``boto3.Session`` (moto's
  ``mock_aws`` included).

Submodules are imported on demand: importing this package starts nothing and pulls in
no optional dependency.
"""
