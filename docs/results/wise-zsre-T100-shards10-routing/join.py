"""Rel and Gen of the TIES retrieve run (../wise-zsre-T100-shards10) split by where route.jsonl
says each prompt was routed: to the memory that holds its edit, or to another one.
Run from this directory: python3 join.py"""
import json
rows = [json.loads(l) for l in open('route.jsonl')]
rec = {}
for line in open('../wise-zsre-T100-shards10/records.jsonl'):
    r = json.loads(line)
    rec[r['index']] = r
for kind, metric in [('rel', 'rewrite_acc'), ('gen', 'rephrase_acc')]:
    own = [r for r in rows if r['kind'] == kind and r['answer'] == f"memory.{r['i'] // 20}"]
    other = [r for r in rows if r['kind'] == kind and r['answer'] != f"memory.{r['i'] // 20}"]
    mean = lambda rs, when: sum(rec[r['i']][when][metric] for r in rs) / len(rs)
    print(f"{kind}: routed to its own memory {len(own)}, {metric} {mean(own, 'post'):.3f} "
          f"(pre {mean(own, 'pre'):.3f}); routed elsewhere {len(other)}, {mean(other, 'post'):.3f} "
          f"(pre {mean(other, 'pre'):.3f})")
