#!/usr/bin/env python3
"""Router scores of a saved WISE state against its threshold, for choosing `act_ratio`.

For the first T records of a ZsRE file that `kedit edit --method wise --save DIR` edited, and for
`--unedited N` further records of the same file (questions of the same style that were not
edited), print the score `kedit generate --load DIR --explain` gives each teacher-forced input:
rewrite (`src alt`), rephrase (`rephrase alt`), locality (`loc loc_ans`) and unedited
(`src alt` of a record that was not edited). The score is divided by the state's
`min_act` (ε), so a ratio r routes an input to the side memory iff score/ε ≥ r.

    bench/wise_router_scores.py --kedit target/release/kedit --load DIR --data FILE --edited T \
        [--unedited 10] > scores.json
"""
import argparse, json, subprocess, sys


def explain(kedit, load, prompt):
    out = subprocess.run([kedit, "generate", "--load", load, "--prompt", prompt,
                          "--max-new-tokens", "1", "--explain"],
                         capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("explain: "))
    e = json.loads(line[len("explain: "):])
    row = e["rows"][0]
    best = max(s for _, s in row["scores"]) if row["scores"] else 0.0
    return best, e["threshold"], row["answer"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kedit", required=True)
    ap.add_argument("--load", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--edited", type=int, required=True)
    ap.add_argument("--unedited", type=int, default=10)
    ap.add_argument("--act-ratio", type=float, default=0.88,
                    help="the ratio the state was saved with (to recover ε from the threshold)")
    a = ap.parse_args()
    recs = json.load(open(a.data))
    rows = []
    threshold = None
    for i, r in enumerate(recs[: a.edited + a.unedited]):
        kinds = [("rewrite", f"{r['src']} {r['alt']}"), ("rephrase", f"{r['rephrase']} {r['alt']}"),
                 ("locality", f"{r['loc']} {r['loc_ans']}")] if i < a.edited else \
                [("unedited", f"{r['src']} {r['alt']}")]
        for kind, prompt in kinds:
            score, threshold, answer = explain(a.kedit, a.load, prompt)
            rows.append({"record": i, "kind": kind, "score": score, "answer": answer})
            print(f"{i:3} {kind:9} {score:8.2f} {answer}", file=sys.stderr)
    eps = threshold / a.act_ratio
    for row in rows:
        row["score_over_eps"] = row["score"] / eps
    json.dump({"threshold": threshold, "eps": eps, "rows": rows}, sys.stdout, indent=1)


main()
