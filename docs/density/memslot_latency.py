"""Times KVM_SET_USER_MEMORY_REGION: 250 new 2 MiB memslots in one VM, each
call timed (p10/p50/p90 and the longest, in us). Run it as is
(python3 docs/density/memslot_latency.py); sample its kernel stack meanwhile
with `cat /proc/PID/stack` to see where a slow call waits. See
docs/density.md, "KVM's floor"."""
import ctypes, os, mmap, struct, time
libc = ctypes.CDLL(None, use_errno=True)
def ioctl(fd, req, arg=0):
    r = libc.ioctl(fd, ctypes.c_ulong(req), arg)
    if r < 0: raise OSError(ctypes.get_errno(), f"ioctl {req:#x}")
    return r
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = ioctl(kvm, 0xAE01)
mem = mmap.mmap(-1, 512<<20, flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS)
addr = ctypes.addressof((ctypes.c_char*(512<<20)).from_buffer(mem))
ts=[]
for slot in range(250):
    rb = ctypes.create_string_buffer(struct.pack("<IIQQQ", slot, 0, slot<<21, 2<<20, addr+(slot<<21)), 32)
    a=time.perf_counter(); ioctl(vm, 0x4020AE46, rb); ts.append((time.perf_counter()-a)*1e6)
ts.sort(); print("slots us p10/p50/p90/max", [round(ts[int(len(ts)*q)]) for q in (0.1,0.5,0.9)], round(ts[-1]))
