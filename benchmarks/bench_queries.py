"""Benchmark of the queries stage's dump pass: MB/s and RSS growth on a synthetic dump stream.

A synthetic MediaWiki XML dump (~1 GB by default) is generated on the fly and streamed through
the real code path (`wikidump.iter_pages` -> `markup.strip_markup` -> `NgramCounts`), never
stored. Words follow a Zipf law over a 400k-word synthetic vocabulary, so the number of
distinct bigrams keeps growing and the counters must spill to stay bounded. Page text carries
links, templates, refs, emphasis and headings, like real wikitext.

Printed: generator-only MB/s (measured first on a slice, to separate it out), end-to-end MB/s
and the parse+count MB/s derived from both; the same pipeline on the real 6 MB sample (the peer,
ratio printed); bz2 decompression MB/s on the sample; RSS at start, peak and growth; spill
files; the selection pass (merge of the spill runs + PMI) time and RSS; and the expected time
for a full English dump under the stated size assumption.

Run (about 5 minutes on one busy core):
    python benchmarks/bench_queries.py            # ~1 GB
    python benchmarks/bench_queries.py --mb 64    # quick look
"""

from __future__ import annotations

import argparse
import bz2
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wit_builder.querybuild.dumps import count_dumps  # noqa: E402
from wit_builder.querybuild.markup import strip_markup  # noqa: E402
from wit_builder.querybuild.ngrams import NgramCounts, count_pages, select_ngrams  # noqa: E402
from wit_builder.querybuild.wikidump import iter_pages  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "queries", "enwiki_sample.xml.bz2")
# Assumption for the full-dump estimate: enwiki pages-articles-multistream.xml.bz2 is ~22 GB
# compressed and ~4.5x that uncompressed (~100 GB of XML, ~95 GB of it wikitext).
FULL_DUMP_BZ2_GB = 22.0
FULL_DUMP_RATIO = 4.5


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_vocab(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct pronounceable words: the number i written in base 30 with one syllable per digit."""
    syll = [
        "ka",
        "lo",
        "mi",
        "ne",
        "ru",
        "ta",
        "so",
        "vi",
        "de",
        "po",
        "an",
        "el",
        "or",
        "us",
        "ix",
        "ba",
        "ce",
        "fu",
        "ga",
        "he",
        "jo",
        "ki",
        "ly",
        "mo",
        "nu",
        "pe",
        "qu",
        "ri",
        "sa",
        "to",
    ]

    def word(i: int) -> str:
        out = []
        i += 30  # at least two syllables
        while i:
            i, d = divmod(i, 30)
            out.append(syll[d])
        return "".join(out)

    vocab = np.array([word(i) for i in range(n)], dtype=object)
    rng.shuffle(vocab)
    caps = rng.random(n) < 0.15
    vocab[caps] = [w.capitalize() for w in vocab[caps]]
    return vocab


class SyntheticDump(io.RawIOBase):
    """A readable stream of MediaWiki XML with `total_bytes` of pages, made page by page."""

    def __init__(self, total_bytes: int, seed: int = 0, vocab_size: int = 400_000):
        self.rng = np.random.default_rng(seed)
        self.vocab = make_vocab(vocab_size, self.rng)
        ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
        p = ranks**-1.07
        self.cdf = np.cumsum(p / p.sum())
        self.total = total_bytes
        self.produced = 0
        self.page_no = 0
        self.buf = b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n'
        self.done = False

    def readable(self) -> bool:
        return True

    def _words(self, n: int) -> np.ndarray:
        return self.vocab[np.searchsorted(self.cdf, self.rng.random(n))]

    def _page(self) -> bytes:
        self.page_no += 1
        w = self._words(int(self.rng.integers(300, 1500))).copy()
        r = self.rng.random(len(w))
        marks = [  # (probability band, transform) -- punctuation and wiki markup around words
            (0.08, lambda x: x + "."),
            (0.14, lambda x: x + ","),
            (0.20, lambda x: "[[" + x + "]]"),
            (0.215, lambda x: "[[" + x + " page|" + x + "]]"),
            (0.24, lambda x: "'''" + x + "'''"),
            (0.25, lambda x: x + "<ref>{{cite web|url=http://example.org/x|title=t}}</ref>"),
            (0.254, lambda x: "{{Infobox|name=" + x + "|x={{small|y}}}}\n" + x),
            (0.27, lambda x: x + ".\n\n"),
        ]
        lo = 0.0
        for hi, fn in marks:
            m = (r >= lo) & (r < hi)
            if m.any():
                w[m] = fn(w[m])
            lo = hi
        text = "== Section ==\n" + " ".join(w.tolist())
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        title = f"Page {self.page_no}"
        return (
            f"<page><title>{title}</title><ns>0</ns><id>{self.page_no}</id><revision>"
            f'<text xml:space="preserve">{text}</text></revision></page>\n'
        ).encode()

    def readinto(self, b) -> int:  # type: ignore[override]
        while len(self.buf) < len(b) and not self.done:
            if self.produced >= self.total:
                self.buf += b"</mediawiki>\n"
                self.done = True
                break
            page = self._page()
            self.produced += len(page)
            self.buf += page
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def bench_generator(mb: int) -> float:
    """CPU MB/s of the generator alone."""
    s = SyntheticDump(mb * 1_000_000, seed=1)
    t = time.process_time()
    buf = bytearray(1 << 20)
    total = 0
    while n := s.readinto(buf):
        total += n
    return total / 1e6 / (time.process_time() - t)


def bench_sample() -> tuple[float, float, float]:
    """CPU MB/s (uncompressed) of the whole pipeline on the real sample incl. bz2, of bz2 alone, and MB."""
    raw = open(SAMPLE, "rb").read()
    xml_mb = len(bz2.decompress(raw)) / 1e6
    t = time.process_time()
    for _ in range(3):
        bz2.decompress(raw)
    bz2_rate = 3 * xml_mb / (time.process_time() - t)
    counts = NgramCounts()
    t = time.process_time()
    count_dumps([SAMPLE], counts, show_progress=False)
    pipeline_s = time.process_time() - t
    rate = xml_mb / (pipeline_s - xml_mb / bz2_rate)  # without the bz2 share, like the synthetic figure
    counts.close()
    return rate, bz2_rate, xml_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="synthetic dump size in MB (default 1024)")
    ap.add_argument("--spill-keys", type=int, default=4_000_000)
    ap.add_argument(
        "--workers", type=int, default=1, help="counting processes (CPU figures then cover the main one only)"
    )
    args = ap.parse_args()

    gen_rate = bench_generator(max(8, args.mb // 16))
    sample_rate, bz2_rate, sample_mb = bench_sample()
    print(
        f"(all rates are MB of uncompressed XML per CPU-second of this process; the machine is shared, "
        f"wall rates are printed too)\nreal sample: {sample_mb:.2f} MB XML, parse+strip+count {sample_rate:.2f} MB/s, "
        f"bz2 decompression {bz2_rate:.1f} MB/s; generator alone {gen_rate:.1f} MB/s",
        flush=True,
    )

    stream = SyntheticDump(args.mb * 1_000_000, seed=0)
    counts = NgramCounts(spill_keys=args.spill_keys)
    stats = {"pages": 0, "articles": 0, "redirects": 0, "other_namespaces": 0}
    read = [0]
    peak = [rss_mb()]
    rss0 = peak[0]
    last = [time.perf_counter()]

    def on_read(n: int) -> None:
        read[0] += n
        now = time.perf_counter()
        if now - last[0] > 2:
            last[0] = now
            peak[0] = max(peak[0], rss_mb())
            if now - t0 > 0 and int(now - t0) % 30 < 2:
                print(
                    f"  {read[0] / 1e6:,.0f} MB, {read[0] / 1e6 / (now - t0):.2f} MB/s, RSS {rss_mb():,.0f} MB, "
                    f"spills {counts.unigrams.spills}+{counts.bigrams.spills}",
                    flush=True,
                )

    t0 = time.perf_counter()
    c0 = time.process_time()
    pool = None
    if args.workers > 1:
        from wit_builder.querybuild.workers import ParallelCounter

        pool = ParallelCounter(counts, args.workers)
        add = pool.add_wikitext
    else:

        def add(text: str) -> None:
            counts.add_text(strip_markup(text))

    count_pages(iter_pages(stream, on_read=on_read, name="synthetic"), add, None, stats)
    if pool is not None:
        pool.finish()
    count_s = time.perf_counter() - t0
    count_cpu = time.process_time() - c0
    peak[0] = max(peak[0], rss_mb())
    mb = read[0] / 1e6
    wall = mb / count_s
    e2e = mb / count_cpu
    parse_rate = 1 / (1 / e2e - 1 / gen_rate) if e2e < gen_rate else float("inf")

    t1 = time.process_time()
    uni, _, uni_seen, bi, _, bi_seen, table = select_ngrams(counts, 100, 5, 30.0)
    select_s = time.process_time() - t1
    rss_after_select = rss_mb()
    peak[0] = max(peak[0], rss_after_select)
    spills = (counts.unigrams.spills, counts.bigrams.spills)
    counts.close()

    uncompressed_gb = FULL_DUMP_BZ2_GB * FULL_DUMP_RATIO
    est_h = uncompressed_gb * 1000 * (1 / parse_rate + 1 / bz2_rate) / 3600
    est_sample_h = uncompressed_gb * 1000 * (1 / sample_rate + 1 / bz2_rate) / 3600
    print(
        f"synthetic dump: {mb:,.0f} MB XML, {stats['pages']:,} pages, {counts.tokens:,} tokens, "
        f"{uni_seen:,} distinct unigrams, {bi_seen:,} distinct bigrams",
        flush=True,
    )
    print(
        f"end-to-end {e2e:.2f} MB/s CPU ({wall:.2f} MB/s wall); parse+strip+count without the generator "
        f"{parse_rate:.2f} MB/s (ratio to the real-sample pipeline, the peer: {parse_rate / sample_rate:.2f}x)"
    )
    print(
        f"counting {count_s:.0f} s wall / {count_cpu:.0f} s CPU; "
        f"selection (merge {spills[0]}+{spills[1]} spill runs, PMI) {select_s:.0f} s CPU; "
        f"kept {len(uni):,} unigrams >= 100, {len(bi):,} bigrams (PMI >= 30 count >= 5); PMI table {table}"
    )
    print(
        f"RSS: start {rss0:,.0f} MB, peak {peak[0]:,.0f} MB, growth {peak[0] - rss0:,.0f} MB, "
        f"after selection {rss_after_select:,.0f} MB ({'under' if peak[0] < 4096 else 'OVER'} 4 GB)"
    )
    print(
        f"full English dump estimate (assumed {FULL_DUMP_BZ2_GB:.0f} GB bz2 x {FULL_DUMP_RATIO} = "
        f"{uncompressed_gb:.0f} GB XML, one process on one free core, bz2 at {bz2_rate:.1f} MB/s in the same thread): "
        f"{est_h:.1f} h at the synthetic rate, {est_sample_h:.1f} h at the real-sample rate"
    )


if __name__ == "__main__":
    main()
