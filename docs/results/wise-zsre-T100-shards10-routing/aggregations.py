"""Which memory tops each edited prompt when the per-token distances (route_tokens.py) are
summed in other ways than the router's mean; memory j holds edits 20j..20j+19."""
import json, sys
import gzip
src=sys.argv[1]
rows=[json.loads(l) for l in (gzip.open(src,'rt') if src.endswith('.gz') else open(src))]
def own(i): return 1+ i//20   # candidate index: 0 = side, memory j = edits 20j..20j+19
import statistics
def aggs():
    yield 'mean', lambda d: sum(d)/len(d)
    yield 'mean_no_first', lambda d: sum(d[1:])/max(1,len(d)-1)
    yield 'max_no_first', lambda d: max(d[1:])
    yield 'median_no_first', lambda d: statistics.median(d[1:])
    for k in (1,2,3,4,6):
        yield f'last{k}', lambda d,k=k: sum(d[-k:])/k
    yield 'top3_no_first', lambda d: sum(sorted(d[1:])[-3:])/3
    yield 'top25%_no_first', lambda d: (lambda s: sum(s[-max(1,len(s)//4):])/max(1,len(s)//4))(sorted(d[1:]))
for name,f in aggs():
    res={}
    for kind in ('rel','gen'):
        ok=n=0
        for r in rows:
            if r['kind']!=kind: continue
            sc=[f(d) if max(d)>0 else 0 for d in r['dist']]
            best=max(range(1,len(sc)),key=lambda c:sc[c])
            ok+= best==own(r['i']); n+=1
        res[kind]=f'{ok}/{n}'
    # loc: fraction of NQ prompts whose top score is below the lowest own-rel top score? skip
    print(f'{name:18s}', res)
