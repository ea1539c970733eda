"""The program behind every shim on a fake VM's PATH (shutdown, poweroff, systemctl,
sudo, apt-get, ..., and ``fakevm-ctl``): it turns what would act on this computer into a
request to the local cloud over its control socket, or refuses it.

``vmexec.testing.vmhost.FakeVMHost`` writes it with a header of its own above this text:
the shebang (this interpreter, in isolated mode: no PYTHON* variables, no user site, so
a machine's broken Python cannot break it) and the values below. It imports only the
standard library, so it cannot share ``vmexec.testing.control.control_request``.
"""
import json
import os
import socket
import sys
import time

# Set by the header FakeVMHost writes above this file.
SOCKET: str  # the control socket
MARKER_ENV: str  # the variable that names the machine asking

NAME = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]


def ask(command, *args):
    """Send one request to the local cloud and exit with its verdict."""
    request = {"vm": os.environ.get(MARKER_ENV, ""), "root": os.environ.get("VMEXEC_ROOT", ""),
               "cmd": command, "args": list(args)}
    try:
        with connect(time.monotonic() + 60) as s:
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data or b"{}")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fake VM: {NAME}: the local cloud did not answer: {exc}\n")
        sys.exit(1)
    if reply.get("error"):
        sys.stderr.write(f"fake VM: {NAME}: {reply['error']}\n")
        sys.exit(1)
    if reply.get("message"):
        sys.stdout.write(reply["message"] + "\n")
    sys.exit(0)


def connect(deadline):
    """A connection to the local cloud; waits while its listen backlog is full (many
    machines asking at once), which a socket with a timeout is told with EAGAIN at once."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            s.connect(SOCKET)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def minutes(when):
    """shutdown's TIME: now, +M, or hh:mm (taken as now: a test never waits for a clock)."""
    if when.startswith("+") and when[1:].isdigit():
        return int(when[1:]) * 60
    return 0


def main():
    """Act as the command this shim was called as (``NAME``)."""
    if NAME == "sudo":
        # The fake VM runs everything as root already: drop sudo's options and run the rest.
        args = list(ARGS)
        while args and args[0].startswith("-"):
            option = args.pop(0)
            if option == "--":
                break
            if option in ("-u", "-g", "-C", "-h", "-p", "-U", "-r", "-t", "-T", "-D") and args:
                args.pop(0)
        if not args:
            sys.exit(0)
        os.execvp(args[0], args)
    elif NAME in ("poweroff", "halt"):
        ask("poweroff")
    elif NAME == "reboot":
        ask("reboot")
    elif NAME == "shutdown":
        if "-c" in ARGS:
            ask("cancel-poweroff")
        if "-r" in ARGS or "--reboot" in ARGS:
            ask("reboot")
        times = [a for a in ARGS if not a.startswith("-")]
        ask("poweroff", str(minutes(times[0]) if times else 60))
    elif NAME == "systemctl":
        verbs = [a for a in ARGS if not a.startswith("-")]
        if verbs and verbs[0] in ("poweroff", "halt"):
            ask("poweroff")
        restarts = ("restart", "reload", "start", "reload-or-restart", "try-restart")
        if len(verbs) >= 2 and verbs[0] in restarts and verbs[1].split(".")[0] in ("ssh", "sshd"):
            ask("sshd-reload")
        sys.stderr.write(f"fake VM: systemctl {' '.join(ARGS)}: a fake VM runs no systemd\n")
        sys.exit(1)
    elif NAME in ("apt-get", "apt", "dnf", "yum"):
        # They would change this computer, not the machine: a fake VM has no package manager.
        sys.stderr.write(f"fake VM: {NAME}: a fake VM installs no system packages\n")
        sys.exit(1)
    elif NAME == "systemd-run":
        sys.stderr.write("fake VM: systemd-run: a fake VM runs no systemd\n")
        sys.exit(1)
    elif NAME == "fakevm-ctl" and ARGS:
        ask(*ARGS)
    else:
        sys.stderr.write(f"fake VM: unknown shim {NAME} {ARGS}\n")
        sys.exit(2)


# Run, not imported (a test that imports every module of the package imports this).
if __name__ == "__main__":
    main()
