"""The parts of the scheduler (``vmexec.scheduler.Scheduler``), one job each.

* ``items``: what is queued — a call, a chunk, or a ``map`` item that is its own future.
* ``machine``: the scheduler's view of one connected machine, and of a connection
  still in its vmexec handshake.
* ``handout``: which queued work goes to which machine — windows, micro-batches,
  work stealing. Pure bookkeeping under the scheduler's lock: no I/O, no threads.

Must not import: boto3, paramiko, concrete providers or transports (only their bases).
"""
