"""Boot-by-boot A/B of two vmm binaries: N boots of each, alternating
(ABBA...), 2 GiB ondemand, workload=exit, --report json; prints the p50 (p10,
p90) of guest ready, and the p50 of vm_created, guest_entered and spawn to
exit. Usage: python3 docs/benchmarks/boot_ab.py BEFORE AFTER N"""
import subprocess, json, time, statistics as st, sys
bins={"before":sys.argv[1],"after":sys.argv[2]}; N=int(sys.argv[3])
res={k:[] for k in bins}; wall={k:[] for k in bins}; vmc={k:[] for k in bins}; ent={k:[] for k in bins}
order=list(bins)
for i in range(N):
    for k in (order if i%2==0 else order[::-1]):
        t=time.perf_counter()
        p=subprocess.run([bins[k],"run","--mem-mib","2048","--vcpus","1","--serial","none","--no-api","--memmap-init","ondemand","--cmdline","workload=exit","--report","json"],capture_output=True,text=True)
        wall[k].append((time.perf_counter()-t)*1000)
        d=json.loads(p.stdout); tm=d.get("timings") or d["report"]["timings"]
        res[k].append(tm["guest_ready"]/1000); vmc[k].append(tm["vm_created"]/1000); ent[k].append(tm["guest_entered"]/1000)
for k in bins:
    q=lambda a,p: sorted(a)[int(len(a)*p)]
    print(k, "ready p50 %.2f (p10 %.2f, p90 %.2f) ms | vm_created p50 %.2f | guest_entered p50 %.2f | spawn->exit p50 %.2f ms (n=%d)"%(st.median(res[k]), q(res[k],.1), q(res[k],.9), st.median(vmc[k]), st.median(ent[k]), st.median(wall[k]), len(res[k])))
