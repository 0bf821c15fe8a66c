"""TLS between the cluster and `aiodagger worker` processes, and between workers.

A throwaway CA and certificates for 127.0.0.1 are made with the openssl command line.
The cluster asks for client certificates too, so both ends prove who they are before
the token handshake even starts; a plain client gets nowhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import subprocess

import pytest

import aiodagger as dagger
from aiodagger.comm.framing import open_comm
from aiodagger.comm.handshake import client_handshake, new_token
from aiodagger.comm.server import parse_address
from aiodagger.errors import AuthenticationError, ProtocolError
from tests.workers import WorkerProcesses, block, digest, pid_of, write_token

pytestmark = pytest.mark.timeout(90)

OPENSSL = shutil.which("openssl")
LEAF_EXT = """\
subjectAltName = IP:127.0.0.1
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
"""
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str, cwd) -> None:
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"openssl {' '.join(args)} failed:\n{proc.stderr}"


def make_ca(directory, name: str) -> None:
    openssl("req", "-x509", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "1", "-subj", f"/CN=aiodagger test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def make_leaf(directory, name: str, ca: str, serial: int) -> None:
    (directory / "leaf.ext").write_text(LEAF_EXT)
    openssl("req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", str(serial), "-days", "1", "-extfile", "leaf.ext", "-out", f"{name}.pem",
            cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca, server and worker (signed by ca), and a rogue CA with a certificate of its own."""
    if OPENSSL is None:
        pytest.skip("the openssl command line is not installed: cannot make test certificates")
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_leaf(directory, "server", "ca", 2)
    make_leaf(directory, "worker", "ca", 3)
    make_ca(directory, "rogue-ca")
    make_leaf(directory, "rogue", "rogue-ca", 4)
    return directory


def server_context(pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki / "ca.pem")
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED  # workers show a certificate from our CA too
    return ctx


def client_context(pki, cert: str, trust: str = "ca") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki / f"{trust}.pem")
    ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return ctx


@pytest.fixture
def workers(tmp_path):
    procs = WorkerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
async def tls_cluster(pki):
    async with dagger.Cluster(threads=2, listen="tcp://127.0.0.1:0", token=new_token(),
                              ssl=server_context(pki)) as c:
        yield c


def tls_args(pki) -> list[str]:
    return ["--tls-cert", str(pki / "worker.pem"), "--tls-key", str(pki / "worker.key"),
            "--tls-ca", str(pki / "ca.pem")]


async def test_tls_workers_join_run_tasks_and_exchange_data(tls_cluster, pki, tmp_path, workers):
    token_file = write_token(tmp_path, tls_cluster.token)
    procs = [workers.start(tls_cluster.address, token_file, *tls_args(pki)) for _ in range(2)]
    infos = await workers.wait_joined(tls_cluster, procs)
    assert [i.pid for i in infos] == [p.pid for p in procs]
    on = [dagger.options(scope=dagger.scope(worker=i.id)) for i in infos]
    pids = await asyncio.wait_for(dagger.gather(*(o.spawn(pid_of) for o in on for _ in range(3))), 30)
    assert pids == [procs[0].pid] * 3 + [procs[1].pid] * 3

    # A result too big to travel with its completion stays on the first worker; the
    # second fetches it from there, over TLS between the workers' own endpoints.
    size = 1 << 20
    made = on[0].spawn(block, size, 7)
    pid, blocks = await asyncio.wait_for(on[1].spawn(digest, made), 30)
    assert pid == procs[1].pid
    assert blocks == [(procs[0].pid, size, hashlib.sha256(bytes([7]) * size).hexdigest())]


async def assert_plain_client_refused(address: str, token: str, role: str) -> None:
    host, port = parse_address(address)
    comm = await open_comm(host, port)
    try:
        with pytest.raises((ConnectionError, ProtocolError, AuthenticationError, TimeoutError)):
            await client_handshake(comm, token, {"role": role}, timeout=10)
    finally:
        comm.close()


async def test_plain_client_cannot_complete_a_handshake(tls_cluster):
    await assert_plain_client_refused(tls_cluster.address, tls_cluster.token, "worker")
    assert [w.id for w in tls_cluster.workers] == [0]


@pytest.mark.parametrize("cert, trust", [("rogue", "ca"), ("worker", "rogue-ca")],
                         ids=["client-certificate-from-another-ca", "client-distrusts-server"])
async def test_tls_client_outside_the_pki_is_refused(tls_cluster, pki, cert, trust):
    """A client whose certificate our CA did not sign is turned away by the cluster; a
    client that does not trust our CA turns the cluster away. Either way, no handshake."""
    host, port = parse_address(tls_cluster.address)
    with pytest.raises((ssl.SSLError, ConnectionError, ProtocolError, TimeoutError)):
        comm = await open_comm(host, port, ssl=client_context(pki, cert, trust))
        try:
            await client_handshake(comm, tls_cluster.token, {"role": "worker"}, timeout=10)
        finally:
            comm.close()
    assert [w.id for w in tls_cluster.workers] == [0]


async def test_tls_client_inside_the_pki_completes_the_handshake(tls_cluster, pki):
    """The counterpart of the refusals above, so that they prove something."""
    host, port = parse_address(tls_cluster.address)
    comm = await open_comm(host, port, ssl=client_context(pki, "worker"))
    try:
        welcome = await client_handshake(comm, tls_cluster.token, {"role": "peer"}, timeout=10)
        assert welcome["op"] == "welcome"
    finally:
        comm.close()


def same_bytes(block_):
    """A big result made from a big input: it stays where it is made, as its input did."""
    _, data = block_
    return pid_of(), data


async def test_inputs_move_between_a_tls_remote_worker_and_subprocess_workers(pki, tmp_path, workers):
    """Cluster(ssl=..., processes=1, tls_*=...): the subprocess worker fetches from a TLS
    remote worker's data server, serves its own over TLS, and the remote worker fetches
    from it in turn. Its data server refuses a client without TLS."""
    async with dagger.Cluster(processes=1, threads=1, listen="tcp://127.0.0.1:0", token=new_token(),
                              ssl=server_context(pki), tls_cert=pki / "worker.pem",
                              tls_key=pki / "worker.key", tls_ca=pki / "ca.pem") as cluster:
        remote = workers.start(cluster.address, write_token(tmp_path, cluster.token), *tls_args(pki))
        (remote_info,) = await workers.wait_joined(cluster, [remote])
        sub = next(w for w in cluster.workers if w.id not in (0, remote_info.id))
        on_remote = dagger.options(scope=dagger.scope(worker=remote_info.id))
        on_sub = dagger.options(scope=dagger.scope(worker=sub.id))

        size = 1 << 20  # past the inline limit: each value stays where it is made
        made = on_remote.spawn(block, size, 9)
        moved = on_sub.spawn(same_bytes, made)           # TLS remote -> subprocess worker
        back = on_remote.spawn(digest, moved)            # subprocess worker -> TLS remote
        pid, blocks = await asyncio.wait_for(back, 30)
        assert pid == remote.pid
        assert blocks == [(sub.pid, size, hashlib.sha256(bytes([9]) * size).hexdigest())]
        assert sub.id in moved._where and remote_info.id in made._where  # (and now copies)

        await assert_plain_client_refused(sub.address, cluster.token, "peer")


def test_worker_tls_files_are_checked_by_the_cluster(pki, tmp_path):
    with pytest.raises(ValueError, match="certificate and its key go together"):
        dagger.Cluster(processes=1, tls_cert=pki / "worker.pem")
    with pytest.raises(ValueError, match=r"Cluster\(tls_cert="):
        dagger.Cluster(processes=1, tls_ca=tmp_path / "no-such-ca.pem")
