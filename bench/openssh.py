"""A private OpenSSH server for the baselines: sftp, and rsync over ssh."""

import os
import pathlib
import shutil
import subprocess

from bench.tools import run_measured
from tests.support.processes import free_port, wait_for_port


class Sshd:
    """A private sshd on a loopback port, with keys generated for this run."""

    def __init__(self, workdir):
        self.dir = pathlib.Path(workdir) / "ssh"
        self.dir.mkdir()
        os.chmod(self.dir, 0o700)
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "user_key.pub").read_text())
        os.chmod(self.dir / "authorized_keys", 0o600)
        self.port = free_port()
        sftp_server = next(p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                       "/usr/libexec/sftp-server") if os.path.exists(p))
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
            f"Subsystem sftp {sftp_server}\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)
        self.process = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, what="sshd")

    def options(self, cipher):
        """What ssh, sftp and rsync's ssh are given, the port aside."""
        return ["-i", str(self.dir / "user_key"), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", f"Ciphers={cipher}"]

    @staticmethod
    def login():
        return f"{os.environ.get('USER') or 'root'}@127.0.0.1"

    def sftp(self, batch_command, cipher, port=None):
        """One sftp session running `batch_command` (e.g. "get remote local"); `port` to go
        through something in front of this sshd (the delaying proxy)."""
        command = ["sftp", "-q", "-b", "-", "-P", str(port or self.port), *self.options(cipher), self.login()]
        return run_measured(command, stdin=batch_command + "\n")

    def rsync(self, source, destination, cipher, port=None, options=()):
        """`rsync -a` (and `options`, e.g. "--delete") over ssh to this sshd; the remote side's
        path is given as ("remote", path)."""
        ssh = " ".join(["ssh", "-p", str(port or self.port), *self.options(cipher)])

        def spelled(path):
            return f"{self.login()}:{path[1]}" if isinstance(path, tuple) else str(path)

        return run_measured(["rsync", "-a", *options, "-e", ssh, spelled(source), spelled(destination)])

    def sftp_get(self, remote, local, cipher):
        return self.sftp(f"get {remote} {local}", cipher)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def have_sshd():
    return shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")


def have_rsync():
    return shutil.which("rsync") is not None
