import time, statistics, torch, xtk, sys
from xtk.bias import T5
b,h,n,d=2,8,1024,32
g=torch.Generator().manual_seed(0)
q,k,v=(torch.randn(b,h,n,d,generator=g).requires_grad_() for _ in range(3))
tab=torch.randn(32,h,generator=g).requires_grad_()
def f(backend):
    o=xtk.attention(q,k,v,is_causal=True,bias=T5(tab,causal=True),backend=backend); o.sum().backward()
res={}
for rep in range(5):
    for be in ("chunked","eager"):
        for th in (1,2):
            torch.set_num_threads(th); f(be)
            t=time.perf_counter(); f(be); res.setdefault((be,th),[]).append((time.perf_counter()-t)*1e3)
for key,v in res.items(): print(key, f"{statistics.median(v):.0f} ms", [f"{x:.0f}" for x in v])
