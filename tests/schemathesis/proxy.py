"""A TCP-to-Unix-socket proxy that also supervises one `vmm` process.

schemathesis speaks HTTP over TCP; the VMM serves its API on a Unix socket.
This listens on 127.0.0.1 (a free port, printed on stdout as the first line)
and copies bytes both ways to the socket. A generated request may stop the
VMM (`Shutdown`, `SendCtrlAltDel`): the next connection then starts it again
with the same command, so the run goes on, and a request the stopping VMM
closed on without answering is sent again to the new one. On SIGTERM or
SIGINT it stops the VMM it started (by its PID) and exits.

usage: proxy.py SOCKET -- VMM-COMMAND...
"""

import asyncio
import os
import signal
import subprocess
import sys
import time


class Supervisor:
    def __init__(self, sock, cmd):
        self.sock = sock
        self.cmd = cmd
        self.child = None
        self.starts = 0

    def ensure_running(self):
        if self.child is not None and self.child.poll() is None:
            return
        if self.child is not None:
            self.child.wait()
        self.child = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline or self.child.poll() is not None:
                raise RuntimeError(f"vmm did not start: {self.cmd}")
            time.sleep(0.01)

    def stop(self):
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()


async def relay(creader, cwriter, connect):
    """Copies one client connection to the VMM and back.

    A VMM that is stopping may close a connection without answering what
    the client sent since its last answer (a keep-alive request that crossed
    the close, or one that came in as the server stopped). Those bytes are
    then sent again, once per new upstream connection (at most twice), to
    the VMM the supervisor starts next, as a client retrying would.
    """
    unanswered = bytearray()
    client_done = False
    for _ in range(3):
        upstream = await connect()
        if upstream is None:
            break
        ureader, uwriter = upstream
        if unanswered:
            uwriter.write(bytes(unanswered))

        async def up():
            nonlocal client_done
            try:
                while True:
                    data = await creader.read(65536)
                    if not data:
                        client_done = True
                        uwriter.write_eof()
                        return
                    if len(unanswered) < (1 << 20):
                        unanswered.extend(data)
                    uwriter.write(data)
                    await uwriter.drain()
            except (ConnectionError, OSError):
                pass

        task = asyncio.create_task(up())
        try:
            while True:
                data = await ureader.read(65536)
                if not data:
                    break
                unanswered.clear()
                cwriter.write(data)
                await cwriter.drain()
        except (ConnectionError, OSError):
            pass
        task.cancel()
        try:
            uwriter.close()
        except OSError:
            pass
        if not unanswered or client_done:
            break
    try:
        cwriter.close()
    except OSError:
        pass


async def main():
    sock = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    sup = Supervisor(sock, cmd)
    sup.ensure_running()
    lock = asyncio.Lock()

    async def connect():
        async with lock:
            # A stopping VMM removes its socket at once but takes a moment
            # (up to its 2 s drain) to exit; then it is started again.
            deadline = time.monotonic() + 30
            while True:
                try:
                    sup.ensure_running()
                    return await asyncio.open_unix_connection(sock)
                except (ConnectionError, FileNotFoundError, OSError):
                    if time.monotonic() > deadline:
                        return None
                    await asyncio.sleep(0.01)

    async def handle(creader, cwriter):
        await relay(creader, cwriter, connect)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    sup.stop()
    print(f"vmm started {sup.starts} time(s)", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
