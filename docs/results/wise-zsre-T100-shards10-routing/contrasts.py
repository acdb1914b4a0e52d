"""Which memory tops each edited prompt when the per-token distances (route_tokens.py) are
summed in other ways than the router's mean; memory j holds edits 20j..20j+19."""
import json, sys
import gzip
src=sys.argv[1]
rows=[json.loads(l) for l in (gzip.open(src,'rt') if src.endswith('.gz') else open(src))]
own=lambda i: 1+i//20
def contrast(dist, how, agg):
    mems=dist[1:]
    T=len(mems[0])
    out=[]
    for j,d in enumerate(mems):
        vals=[]
        for t in range(1,T):
            col=[m[t] for m in mems]
            mu=sum(col)/len(col)
            vals.append(d[t]-mu if how=='diff' else d[t]/mu)
        vals.sort()
        out.append(agg(vals))
    return out
for how in ('diff','ratio'):
    for an,agg in [('max',lambda v:v[-1]),('top3',lambda v:sum(v[-3:])/3),('mean',lambda v:sum(v)/len(v))]:
        res={}
        for kind in ('rel','gen'):
            ok=n=0
            for r in rows:
                if r['kind']!=kind: continue
                sc=contrast(r['dist'],how,agg)
                ok+= (1+max(range(len(sc)),key=lambda c:sc[c]))==own(r['i']); n+=1
            res[kind]=f'{ok}/{n}'
        print(how,an,res)
