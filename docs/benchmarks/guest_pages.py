"""Lists the guest-RAM pages an idle 2 GiB ondemand VM holds on the host.

Usage: python3 docs/benchmarks/guest_pages.py VMM_BINARY [extra vmm run args]
Runs the VM (workload=wait) for one second, reads /proc/PID/pagemap (root
needed for the flags) over guest RAM, prints the present pages by
guest-physical page number ("f": file-backed, i.e. shared page cache), then
ends the VM it started.
"""
import os, sys, struct, subprocess, time
V=sys.argv[1]
p=subprocess.Popen([V,"run","--mem-mib","2048","--serial","none","--no-api","--memmap-init","ondemand","--cmdline","workload=wait"]+sys.argv[2:],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
time.sleep(1.0)
maps=open(f"/proc/{p.pid}/maps").read().splitlines()
ram=None
rs=[[int(x,16) for x in l.split()[0].split("-")] for l in maps]
ends={b for a,b in rs}
for a,b in rs:
    if a+(2048<<20) in ends: ram=(a,a+(2048<<20),"%x"%a); break
print(ram[2])
a,b,_=ram
f=open(f"/proc/{p.pid}/pagemap","rb")
res=[]
# scan in 2MiB windows
for base in range(a,b,2<<20):
    f.seek((base>>12)*8); d=f.read(512*8)
    for i in range(512):
        e=struct.unpack_from("<Q",d,i*8)[0]
        if e>>63 or (e>>62)&1:
            excl=(e>>56)&1
            res.append(((base-a)//4096+i, excl, (e>>61)&1))
p.kill(); p.wait()
print(len(res),"present; exclusive:",sum(r[1] for r in res),"file/shared:",sum(r[2] for r in res))
print(" ".join("%x%s"%(r[0], "f" if r[2] else "") for r in res))
