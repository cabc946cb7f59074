"""A TCP-to-Unix-socket proxy that also supervises one `vmm` process.

schemathesis speaks HTTP over TCP; the VMM serves its API on a Unix socket.
This listens on 127.0.0.1 (a free port, printed on stdout as the first line)
and copies bytes both ways to the socket. A generated request may stop the
VMM (`Shutdown`, `SendCtrlAltDel`): the next connection then starts it again
with the same command, so the run goes on. On SIGTERM or SIGINT it stops
the VMM it started (by its PID) and exits.

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


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def main():
    sock = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    sup = Supervisor(sock, cmd)
    sup.ensure_running()
    lock = asyncio.Lock()

    async def handle(creader, cwriter):
        async with lock:
            # A stopping VMM may still have its socket for a moment.
            for _ in range(300):
                try:
                    sup.ensure_running()
                    ureader, uwriter = await asyncio.open_unix_connection(sock)
                    break
                except (ConnectionError, FileNotFoundError, OSError):
                    await asyncio.sleep(0.01)
            else:
                cwriter.close()
                return
        await asyncio.gather(pipe(creader, uwriter), pipe(ureader, cwriter))

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
