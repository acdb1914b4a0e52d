"""Which memory answers each edited prompt of a saved WISE state (kedit generate --explain).

Run from the repository root: python3 route.py STATE_DIR OUT.jsonl (KEDIT: the kedit binary,
default target/release/kedit). For each of the first 100 ZsRE records: the rewrite prompt, the
rephrased prompt and the NQ locality prompt, each followed by its answer as the evaluation
feeds it, one prefill each; the router's choice and every memory's score are recorded."""
import json, subprocess, sys, os
data = json.load(open('../shared/data/zsre/zsre_mend_eval_portability_0-499.json'))[:100]
state = sys.argv[1]
out = open(sys.argv[2], 'w')
kedit = os.environ.get('KEDIT', 'target/release/kedit')
env = dict(os.environ)
for i, r in enumerate(data):
    for kind, prompt in [('rel', r['src'] + ' ' + r['alt']), ('gen', r['rephrase'] + ' ' + r['alt']), ('loc', r['loc'] + ' ' + r['loc_ans'])]:
        p = subprocess.run([kedit, 'generate', '--load', state,
                            '--prompt=' + prompt, '--max-new-tokens', '1', '--explain'], capture_output=True, text=True, env=env)
        ex = [json.loads(l[len('explain: '):]) for l in p.stdout.splitlines() if l.startswith('explain: ')]
        if not ex:
            print(i, kind, 'no explanation', p.stderr[-500:], file=sys.stderr); continue
        e = ex[-1]
        row = e['rows'][0]
        out.write(json.dumps({'i': i, 'kind': kind, 'answer': row['answer'], 'scores': row['scores'],
                              'memory_thresholds': e['memory_thresholds'], 'threshold': e['threshold']}) + '\n')
        out.flush()
