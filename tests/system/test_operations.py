"""Operations with the real tools: systemd units, socket activation, sd_notify readiness,
reload, graceful shutdown, TLS with hostname verification, HAProxy with PROXY protocol v2."""

import datetime
import hashlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from eketwist import wire

from tests.support.processes import PASSWORD, BIN as VENV_BIN, free_port, run_client, wait_for_daemon, wait_for_port
from tests.support.rawclient import RawClient

CONTRIB = pathlib.Path(__file__).parents[2] / "contrib"


def need(tool):
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        pytest.skip(f"{tool} is not installed (make test installs it with apt-get)")
    return path


def twistd_command(root, users, port_description, *options):
    return [str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "eke", "--port", port_description,
            "--root", str(root), "--users", str(users), "--server-id", "ops", *options]


class Output:
    """Collects a process's output in a thread, so that it can be searched while it runs."""

    def __init__(self, process):
        self.lines = []
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)

    def wait_for(self, needle, timeout=15):
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in output:\n{self.text()[-3000:]}")
            time.sleep(0.05)


def start(command, **kwargs):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    return process, Output(process)


# -- systemd


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = need("systemd-analyze")
    for unit in ("eketwist.service", "eketwist.socket", "eketwist-activated.service"):
        text = (CONTRIB / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/eketwist/bin/twistd", str(VENV_BIN / "twistd")))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / u) for u in ("eketwist.service", "eketwist.socket", "eketwist-activated.service"))],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    service = (CONTRIB / "systemd" / "eketwist.service").read_text()
    for setting in ("Type=notify", "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "StateDirectory=", "CapabilityBoundingSet=", "RestrictAddressFamilies=",
                    "SystemCallFilter=@system-service", "Restart=on-failure", "--nodaemon", "--pidfile="):
        assert setting in service
    assert "FileDescriptorName=eke" in (CONTRIB / "systemd" / "eketwist.socket").read_text()
    assert "systemd:domain=INET:name=eke" in (CONTRIB / "systemd" / "eketwist-activated.service").read_text()


def test_socket_activation_serves_a_download(root, users_file, tmp_path):
    activate = need("systemd-socket-activate")
    port = free_port()
    process, output = start([activate, "-l", f"127.0.0.1:{port}", "--fdname=eke",
                             *twistd_command(root, users_file, "systemd:domain=INET:name=eke")])
    try:
        wait_for_port(port, process)
        result = run_client(port, "get", "sub/data.bin", cwd=tmp_path)
        assert result.returncode == 0, result.stderr + output.text()
        assert (tmp_path / "data.bin").read_bytes() == (root / "sub" / "data.bin").read_bytes()
        output.wait_for("sent sub/data.bin")
    finally:
        process.terminate()
        process.wait(15)


def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(20)
    return sock, path


def test_ready_reload_and_stopping_notifications(root, users_file, tmp_path):
    sock, path = notify_socket(tmp_path)
    port = free_port()
    process, output = start(twistd_command(root, users_file, f"tcp:{port}:interface=127.0.0.1"),
                            env=dict(os.environ, NOTIFY_SOCKET=path))
    wait_for_daemon(output.text, port, process)
    try:
        message = sock.recv(4096).decode()
        assert message.startswith("READY=1") and f":{port}" in message
        # Ready means listening: a connection succeeds at once.
        socket.create_connection(("127.0.0.1", port), 2).close()
        # SIGHUP re-reads the users file; a broken one is refused and the old one kept.
        text = users_file.read_text()
        users_file.write_text(text + "{broken\n")
        os.utime(users_file, ns=(0, 0))
        process.send_signal(signal.SIGHUP)
        assert sock.recv(4096).decode() == "RELOADING=1"
        assert sock.recv(4096).decode() == "READY=1"
        output.wait_for("users file not reloaded (SIGHUP), keeping the last good copy")
        assert "line" in output.text().split("not reloaded (SIGHUP)")[1].splitlines()[0]
        result = run_client(port, "get", "hello.txt", cwd=tmp_path)
        assert result.returncode == 0, result.stderr + output.text()[-3000:]
        users_file.write_text(text)
        process.send_signal(signal.SIGHUP)
        output.wait_for("users file reloaded (SIGHUP)")
        assert [sock.recv(4096).decode() for _ in range(2)] == ["RELOADING=1", "READY=1"]
        process.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        # twistd ends by re-raising the signal it stopped for; systemd counts that as success.
        assert process.wait(15) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        sock.close()


# -- graceful shutdown


def slow_download(port, path, pause, result):
    """A client that reads one 64 KiB piece per `pause` seconds; stores what it got."""
    raw = RawClient(port, timeout=60)
    try:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert raw.handshake("alice", PASSWORD)["type"] == "ok"
        raw.send_control({"type": "get", "path": path})
        kind, header = raw.recv_record()
        result["started"] = True
        chunks = []
        while True:
            kind, body = raw.recv_record()
            if kind == 1:
                result["end"] = body
                break
            chunks.append(body)
            result["records"] = len(chunks)
            time.sleep(pause)
        result["data"] = b"".join(chunks)
        try:
            result["after"] = raw.recv_record()[1]
        except Exception as problem:  # noqa: BLE001 - closed is fine too
            result["after"] = repr(problem)
    except Exception as problem:  # noqa: BLE001
        result["error"] = repr(problem)
    finally:
        raw.close()


RECORDS = 24


# 24 records read `pause` apart: still running when SIGTERM comes; 0.1 s apart, longer than the
# short grace.
@pytest.mark.parametrize("grace, finishes, pause", [(30, True, 0.05), (1, False, 0.1)])
def test_sigterm_lets_running_transfers_finish_within_the_grace_period(root, users_file, tmp_path, grace, finishes, pause):
    (root / "slow.bin").write_bytes(os.urandom(RECORDS * wire.DATA_CHUNK))
    port = free_port()
    process, output = start(twistd_command(root, users_file, f"tcp:{port}:interface=127.0.0.1",
                                           "--shutdown-grace", str(grace)))
    try:
        wait_for_daemon(output.text, port, process)
        result = {}
        reader = threading.Thread(target=slow_download, args=(port, "slow.bin", pause, result))
        reader.start()
        deadline = time.monotonic() + 10
        while "started" not in result and time.monotonic() < deadline:
            time.sleep(0.02)
        idle = RawClient(port)
        assert idle.handshake("alice", PASSWORD)["type"] == "ok"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        read_before = result.get("records", 0)
        # New connections are refused at once; idle ones are told why and closed.
        time.sleep(0.5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), 1).close()
        assert idle.recv_record()[1]["code"] == "try-later"
        idle.close()
        reader.join(60)
        assert process.wait(60) in (0, -signal.SIGTERM)
        stopped_after = time.monotonic() - started
        if finishes:
            assert result["end"]["sha1"] == hashlib.sha1((root / "slow.bin").read_bytes()).hexdigest()
            assert result["data"] == (root / "slow.bin").read_bytes()
            # It waited for the transfer: SIGTERM came with most of the file still to send
            # (what the kernel's buffers hold is a few records), and all of it arrived.
            assert read_before < RECORDS - 8, read_before
        else:
            # Cut, and told so: a fatal try-later instead of END (the client may resume later).
            assert result["end"]["type"] == "error" and result["end"]["code"] == "try-later", result["end"]
            assert stopped_after < grace + 5
            assert "cutting the transfer" in output.text()
    finally:
        if process.poll() is None:
            process.kill()


# -- TLS


def make_certificates(directory, names):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eketwist test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


@pytest.mark.parametrize("names, succeeds", [(["localhost"], True), (["other.example"], False)])
def test_tls_verifies_the_server_name(root, users_file, tmp_path, names, succeeds):
    make_certificates(tmp_path, names)
    port = free_port()
    description = f"ssl:{port}:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"
    process, output = start(twistd_command(root, users_file, description))
    try:
        wait_for_daemon(output.text, port, process)
        env = dict(os.environ, EKE_PASSWORD=PASSWORD)
        result = subprocess.run(
            [str(VENV_BIN / "eke-client"), "--host", "localhost", "--port", str(port), "--tls", "--ca-file",
             str(tmp_path / "ca.pem"), "--user", "alice", "get", "hello.txt"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
        )
        if succeeds:
            assert result.returncode == 0, result.stderr + output.text()
            assert (tmp_path / "hello.txt").read_bytes() == (root / "hello.txt").read_bytes()
        else:
            assert result.returncode == 3 and "TLS failed" in result.stderr, result.stderr
            assert not (tmp_path / "hello.txt").exists()
        # The PAKE runs inside TLS: a wrong password still fails.
        wrong = subprocess.run(
            [str(VENV_BIN / "eke-client"), "--host", "localhost", "--port", str(port), "--tls", "--ca-file",
             str(tmp_path / "ca.pem"), "--user", "alice", "get", "hello.txt"],
            capture_output=True, text=True, env=dict(env, EKE_PASSWORD="wrong"), cwd=tmp_path, timeout=60,
        )
        assert wrong.returncode in ((4,) if succeeds else (3,))
    finally:
        process.terminate()
        process.wait(15)


# -- HAProxy


def test_haproxy_with_proxy_protocol_v2_in_front_of_two_instances(root, users_file, tmp_path):
    haproxy = need("haproxy")
    ports = [free_port(), free_port()]
    front = free_port()
    daemons = [start(twistd_command(root, users_file, f"haproxy:tcp:{p}:interface=127.0.0.1", "--trusted-proxies", "127.0.0.1"))
               for p in ports]
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
        f"frontend eke\n    bind 127.0.0.1:{front}\n    default_backend instances\n"
        "backend instances\n    balance roundrobin\n"
        "    default-server send-proxy-v2 check-send-proxy check inter 1s\n"
        + "".join(f"    server eke{i} 127.0.0.1:{p}\n" for i, p in enumerate(ports))
    )
    check = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proxy = None
    try:
        for port, (process, output) in zip(ports, daemons):
            wait_for_daemon(output.text, port, process)
        # HAProxy counts a server up from the start, until checks fail: started once both
        # instances listen, its first checks pass (no wait for them to run).
        proxy = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(front, proxy)
        for i in range(4):  # round robin: both instances serve
            result = run_client(front, "get", "sub/data.bin", str(tmp_path / f"got{i}"))
            assert result.returncode == 0, result.stderr
            assert (tmp_path / f"got{i}").read_bytes() == (root / "sub" / "data.bin").read_bytes()
        # The instances see, log and limit the client's own address, not HAProxy's.
        for source in ("127.0.0.7", "127.0.0.8"):
            raw = RawClient(front, source=source)
            assert raw.handshake("alice", PASSWORD)["type"] == "ok"
            raw.close()
        deadline = time.monotonic() + 10
        logs = ""
        while time.monotonic() < deadline:
            logs = "".join(output.text() for _, output in daemons)
            if "alice authenticated from 127.0.0.7" in logs and "alice authenticated from 127.0.0.8" in logs:
                break
            time.sleep(0.1)
        assert "alice authenticated from 127.0.0.7" in logs and "alice authenticated from 127.0.0.8" in logs, [l for l in logs.splitlines() if "authent" in l]
        assert all("authenticated from" in output.text() for _, output in daemons)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for process, _ in daemons:
            process.terminate()
            process.wait(15)


def test_proxy_protocol_v1_header_gives_the_client_address(root, users_file):
    port = free_port()
    process, output = start(twistd_command(root, users_file, f"haproxy:tcp:{port}:interface=127.0.0.1", "--trusted-proxies", "127.0.0.1"))
    try:
        wait_for_daemon(output.text, port, process)
        raw = RawClient(port)
        raw.sock.sendall(b"PROXY TCP4 192.0.2.33 127.0.0.1 40404 4000\r\n")
        assert raw.handshake("alice", PASSWORD)["type"] == "ok"
        header, data, end = raw.get("hello.txt")
        assert data == (root / "hello.txt").read_bytes()
        raw.close()
        output.wait_for("alice authenticated from 192.0.2.33:40404")
        output.wait_for("alice from 192.0.2.33:40404: sent hello.txt")
    finally:
        process.terminate()
        process.wait(15)
