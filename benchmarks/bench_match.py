"""Matching speed: our `Matcher` in every mode vs a MetaCLIP-style spaced pyahocorasick matcher.

The reference is written here from MetaCLIP's published definition (pad the caption with
spaces, wrap `, . ; : ? ! \\`` in spaces, tabs/newlines to spaces, case-sensitive search for
" query " with pyahocorasick, one `automaton.iter` per caption, hits collected in a set); it
is timed in the same run, on the same captions and queries, on one core. Then the Ray match
stage on 2 workers over >= 5M cycled captions, timed after warm-up (automata already built).

Queries: the shipped list (queries/default_queries.parquet, or --queries) topped up to
--num-queries (500k) with a generated list when shorter; the generated list alone when there is
none (or with --generated-queries): wordfreq's English list (~320k) + WordNet lemmas when
/usr/share/wordnet exists + the most frequent word bigrams of the Wikipedia sample in
../shared/data/wiki.

Run:
    python benchmarks/bench_match.py                       # 500k queries, 200k captions
    python benchmarks/bench_match.py --stage-captions 5000000 --workers 2
"""

from __future__ import annotations

import argparse
import bz2
import collections
import os
import re
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from wit_builder.stages.match import Matcher  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
CAPTION_FILES = [
    ("captions/laion_10k.parquet", "TEXT"),
    ("captions/coco_val2017_captions.parquet", "caption"),
]


class ReferenceMetaclipMatcher:
    """MetaCLIP's substring matching, from its definition (not its code)."""

    def __init__(self, queries: list[str]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for i, q in enumerate(queries):
            self.automaton.add_word(f" {q} ", i)  # duplicate entries: the last id wins, as in MetaCLIP
        self.automaton.make_automaton()

    @staticmethod
    def spacing(text: str) -> str:
        text = f" {text} "
        for p in [",", ".", ";", ":", "?", "!", "`"]:
            text = text.replace(p, f" {p} ")
        for c in ["\t", "\n", "\r"]:
            text = text.replace(c, " ")
        return text

    def match_one(self, caption: str) -> list[int]:
        found = set()
        for _, qid in self.automaton.iter(self.spacing(caption)):
            found.add(qid)
        return sorted(found)


def real_captions() -> list[str]:
    caps: list[str] = []
    for rel, col in CAPTION_FILES:
        caps += pq.read_table(os.path.join(DATA, rel), columns=[col]).column(col).to_pylist()
    return caps


def generated_queries(n: int) -> tuple[list[str], str]:
    import wordfreq

    seen: dict[str, None] = {}
    for w in wordfreq.top_n_list("en", 10**6, wordlist="large"):
        seen.setdefault(w)
    parts = [f"wordfreq {len(seen)}"]
    wn = "/usr/share/wordnet"
    if os.path.isdir(wn):
        before = len(seen)
        for pos in ("noun", "verb", "adj", "adv"):
            with open(os.path.join(wn, f"index.{pos}"), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.startswith(" "):
                        seen.setdefault(line.split(" ", 1)[0].replace("_", " "))
        parts.append(f"WordNet +{len(seen) - before}")
    wiki = os.path.join(DATA, "wiki", "enwiki_sample.xml.bz2")
    if len(seen) < n and os.path.exists(wiki):
        before = len(seen)
        words = re.findall(r"[A-Za-z][A-Za-z'-]*", bz2.open(wiki, "rt", encoding="utf-8").read())
        bigrams = collections.Counter(zip(words, words[1:]))
        for (a, b), _ in bigrams.most_common():
            if len(seen) >= n:
                break
            seen.setdefault(f"{a} {b}")
        parts.append(f"Wikipedia-sample bigrams +{len(seen) - before}")
    return list(seen)[:n], "generated: " + ", ".join(parts)


def load_queries(path: str | None, n: int, generated_only: bool = False) -> tuple[list[str], str]:
    """The shipped list (queries/default_queries.parquet), topped up to n with the generated
    list when it is shorter; the generated list alone when there is none (or when asked)."""
    path = path or os.path.join(REPO, "queries", "default_queries.parquet")
    if generated_only or not os.path.exists(path):
        return generated_queries(n)
    t = pq.read_table(path, columns=["query_id", "text"]).sort_by("query_id")
    shipped = t.column("text").to_pylist()[:n]
    source = f"shipped list {os.path.relpath(path, REPO)} ({len(shipped):,})"
    if len(shipped) < n:
        seen = dict.fromkeys(shipped)
        extra, how = generated_queries(n + len(shipped))
        for q in extra:
            if len(seen) >= n:
                break
            seen.setdefault(q)
        source += f" + {len(seen) - len(shipped):,} from the {how} list"
        shipped = list(seen)
    return shipped, source


def bench_single_core(queries, captions, repeat):
    """Captions/s per method: the captions are cut in chunks of 16,384, the methods take turns
    on each chunk, `repeat` times, and each method's time is the sum over chunks of its best
    time; so load from other processes on a shared machine hits every method alike."""
    t = time.perf_counter()
    ref = ReferenceMetaclipMatcher(queries)
    print(f"  build reference automaton: {time.perf_counter() - t:.1f}s")
    matchers = {}
    for mode in ("word", "metaclip", "substring"):
        t = time.perf_counter()
        matchers[mode] = Matcher(queries, mode=mode)
        print(f"  build {mode} automaton: {time.perf_counter() - t:.1f}s")

    def run_ref(chunk):
        for c in chunk:
            ref.match_one(c)

    def run_mode(m):
        def go(chunk):
            for lo in range(0, len(chunk), 8192):
                m.match_csr(chunk[lo : lo + 8192])

        return go

    methods = {"reference": run_ref} | {mode: run_mode(m) for mode, m in matchers.items()}
    step = 16384
    chunks = [captions[lo : lo + step] for lo in range(0, len(captions), step)]
    best = {name: [float("inf")] * len(chunks) for name in methods}
    for _ in range(repeat):
        for i, chunk in enumerate(chunks):  # methods take turns on each chunk
            for name, fn in methods.items():
                t = time.perf_counter()
                fn(chunk)
                best[name][i] = min(best[name][i], time.perf_counter() - t)
    rates = {name: len(captions) / sum(s) for name, s in best.items()}
    print(f"  reference MetaCLIP-style (per caption iter): {rates['reference']:,.0f} captions/s")
    rows = [("reference", rates["reference"], 1.0)]
    for mode, m in matchers.items():
        offsets, qids = m.match_csr(captions[:20000])
        ratio = rates[mode] / rates["reference"]
        print(
            f"  {mode:9s}: {rates[mode]:,.0f} captions/s = {ratio:.2f}x reference "
            f"({len(qids) / 20000:.1f} distinct matches/caption)"
        )
        rows.append((mode, rates[mode], ratio))
    return rows, rates["reference"]


def bench_stage(queries, captions, n_rows, workers, single_rate_word):
    from wit_builder import parallel
    from wit_builder.stages import match as match_stage
    from wit_builder.stages.base import StageContext

    tmp = tempfile.mkdtemp(prefix="bench_match_")
    ctx = StageContext(run_dir=tmp, seed=0, num_cpus=workers, progress=False)
    qt = pa.table(
        {
            "query_id": pa.array(range(len(queries)), pa.int32()),
            "text": queries,
            "source": ["bench"] * len(queries),
            "count": pa.nulls(len(queries), pa.int64()),
        }
    )
    pq.write_table(qt, os.path.join(tmp, "queries.parquet"))
    os.makedirs(ctx.stage_dir("queries"))
    os.replace(os.path.join(tmp, "queries.parquet"), os.path.join(ctx.stage_dir("queries"), "queries.parquet"))
    cand_dir = ctx.stage_dir("candidates")
    os.makedirs(cand_dir)
    per_part = 250_000
    n_parts = max(workers * 2, (n_rows + per_part - 1) // per_part)
    caps = np.array(captions, dtype=object)
    for p in range(n_parts):
        idx = np.arange(p * per_part, (p + 1) * per_part) % len(caps)
        c = caps[idx].tolist()
        t = pa.table(
            {
                "uid": [f"{i:016x}" for i in range(p * per_part, (p + 1) * per_part)],
                "url": ["http://x/y.jpg"] * per_part,
                "caption": c,
                "source_file": ["bench"] * per_part,
                "page_url": pa.nulls(per_part, pa.string()),
            }
        )
        pq.write_table(t, os.path.join(cand_dir, f"part-{p:05d}.parquet"))
    parallel.init(num_cpus=workers)
    cfg = match_stage.Config(mode="word", num_workers=workers)
    # warm-up: workers start and build the automaton, then match one part per worker
    import functools

    setup = functools.partial(
        match_stage.build_matcher, os.path.join(ctx.stage_dir("queries"), "queries.parquet"), "word"
    )
    parts = sorted(os.listdir(cand_dir))
    tasks = [(os.path.join(cand_dir, p), os.path.join(tmp, "out", p), cfg.batch_rows) for p in parts]
    ray = parallel._ray()
    actor_cls = ray.remote(num_cpus=1)(parallel._Worker)
    actors = [actor_cls.remote(setup, match_stage.match_part) for _ in range(workers)]
    ray.get([a.call.remote(tasks[i]) for i, a in enumerate(actors)])  # warm-up: build + one part each

    def timed(n_actors: int, subset) -> float:
        t = time.perf_counter()
        refs = [actors[i % n_actors].call.remote(task) for i, task in enumerate(subset)]
        rows = sum(r["rows_in"] for r in ray.get(refs))
        return rows / (time.perf_counter() - t)

    one = timed(1, tasks[: max(2, len(tasks) // 4)])  # the same code path on a single worker
    many = timed(workers, tasks)
    print(
        f"  Ray match_part (read parquet, match, write parquet), word mode, after warm-up:\n"
        f"    1 worker:  {one:,.0f} captions/s over {max(2, len(tasks) // 4) * per_part:,} captions\n"
        f"    {workers} workers: {many:,.0f} captions/s over {len(tasks) * per_part:,} captions "
        f"= {many / one:.2f}x one worker, {many / single_rate_word:.2f}x the Matcher alone on one core"
    )
    for a in actors:  # give their CPUs back to the stage run below
        ray.kill(a)
    # the stage end to end (includes actor start-up and automaton builds)
    t = time.perf_counter()
    res = match_stage.run(ctx, cfg)
    print(
        f"  match stage run() end to end on {workers} workers: {res.line('match')} "
        f"(incl. {workers} automaton builds, {time.perf_counter() - t:.1f}s)"
    )
    parallel.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", default=None, help="query list parquet (default: queries/default_queries.parquet)")
    ap.add_argument("--generated-queries", action="store_true", help="use only the generated list")
    ap.add_argument("--num-queries", type=int, default=500_000)
    ap.add_argument("--captions", type=int, default=200_000, help="captions cycled from the real ones")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--stage-captions", type=int, default=0, help="also run the Ray stage over this many")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    real = real_captions()
    captions = [real[i % len(real)] for i in range(args.captions)]
    queries, source = load_queries(args.queries, args.num_queries, args.generated_queries)
    print(f"queries: {len(queries):,} ({source})")
    print(f"captions: {len(captions):,} cycled from {len(real):,} real ones; one core")
    rows, _ = bench_single_core(queries, captions, args.repeat)
    if args.stage_captions:
        word_rate = dict((r[0], r[1]) for r in rows)["word"]
        bench_stage(queries, real, args.stage_captions, args.workers, word_rate)


if __name__ == "__main__":
    main()
