"""Prometheus text (0.0.4) and OpenMetrics (1.0.0) exposition of metric readings.

Why not prometheus_client's ``generate_latest``: it formats every sample through a generic
path (a dict of labels sorted and escaped per sample) and takes ~290 ms for a 1,000-layer model
(~40,000 samples) on this project's CPU; a scrape must stay under 50 ms. Here each line's
prefix (name and labels) is built once and kept while the model's layers stay the same, so a
render formats only the values. The output parses to the same
families as prometheus_client's own rendering of :class:`~.prometheus.NeuronwatchCollector`
(``tests/unit/test_exporter_prometheus.py`` checks it).
"""

from __future__ import annotations

import itertools
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from neuronwatch.metric_families import FAMILIES, MetricFamily
from neuronwatch.metric_values import Histogram, Histograms, Reading

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "Renderer",
    "choose_format",
    "render",
]

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def accepted(header: str | None, token: str) -> bool:
    """Whether an ``Accept``/``Accept-Encoding`` header lists ``token`` with a weight above
    zero (``gzip;q=0`` is a refusal, not a request)."""
    for part in (header or "").split(","):
        name, *params = part.split(";")
        if name.strip().lower() != token:
            continue
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if weight > 0:
            return True
    return False


def choose_format(accept: str | None) -> bool:
    """Whether the ``Accept`` header asks for OpenMetrics (Prometheus does, by default)."""
    return accepted(accept, "application/openmetrics-text")


def _label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


class _Numbers(dict[float, bytes]):
    """``repr(value)`` and the line's newline, as bytes, per value, kept between renders.

    ``repr`` of a float is ~60 % of formatting a line; an exposition repeats few values (counts
    up to the layer width, ratios of them), so most lines are a dict hit. Keys compare by
    value: ``-0.0`` may print as ``0.0`` and ``1`` as ``1.0``, the same number to every
    parser. Cleared when it holds :attr:`KEEP` values.
    """

    KEEP = 50_000  # ~5 MB at most; a 1,000-layer render meets ~3,000 new values

    def __missing__(self, value: float) -> bytes:
        if len(self) >= self.KEEP:
            self.clear()
        text = self[value] = f"{value!r}\n".encode()
        return text


def deflate_segment(data: bytes) -> bytes:
    """``data`` as raw deflate blocks ending byte-aligned with an empty stored block, the
    dictionary reset (``Z_FULL_FLUSH``): segments made this way concatenate into one valid
    deflate stream (how pigz compresses in parallel)."""
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush(zlib.Z_FULL_FLUSH)


# The last block of a stream: an empty final block (BFINAL set).
_LAST_BLOCK = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
# Magic, deflate, no flags, no mtime, no extra flags, OS unknown (RFC 1952).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def gzip_member(segments: Sequence[bytes], crc: int, size: int) -> bytes:
    """One gzip member (RFC 1952) from :func:`deflate_segment` outputs, the CRC-32 and the
    length of the uncompressed data."""
    trailer = struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)
    return b"".join([_GZIP_HEADER, *segments, _LAST_BLOCK, trailer])


class _Chunk:
    """One family's text, the series it was rendered from, and its deflate segment (made on
    first use: only gzip scrapes need it)."""

    __slots__ = ("_segment", "labels", "text", "values")

    def __init__(self, values: object, labels: object, text: bytes) -> None:
        self.values, self.labels, self.text = values, labels, text
        self._segment: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.text)

    @property
    def compressed(self) -> bool:
        return self._segment is not None

    def segment(self) -> bytes:
        if self._segment is None:
            self._segment = deflate_segment(self.text)
        return self._segment


_EOF = _Chunk(None, None, b"# EOF\n")
_compressor_pool: ThreadPoolExecutor | None = None
_compressor_lock = threading.Lock()


def _compressor() -> ThreadPoolExecutor:
    """One thread that compresses families while the scrape's thread renders the next ones
    (made on the first gzip scrape; idle, it costs a parked thread)."""
    global _compressor_pool
    with _compressor_lock:
        if _compressor_pool is None:
            _compressor_pool = ThreadPoolExecutor(1, thread_name_prefix="neuronwatch-gzip")
        return _compressor_pool


class Renderer:
    """Renders readings to an exposition, keeping every series' line prefix between renders.

    A line is ``<prefix><value>\n`` with the prefix ``name{labels} ``. A model's layers (so
    its label sets) rarely change between snapshots: the prefixes of a label list are built on
    its first render and reused while it stays the same, so a render only looks the values up
    (:class:`_Numbers`) and joins, with C-level ``map``/``zip``/``join`` and no Python bytecode
    per line (~40,000 lines for 1,000 layers). At most :attr:`KEEP` label lists are kept (a
    model that renames its layers at every snapshot does not grow the cache).
    """

    KEEP = 16

    def __init__(self, constant: Mapping[str, str]) -> None:
        self._constant = {k: _label_value(v) for k, v in constant.items()}
        self._templates: dict[tuple[str, ...], str] = {}
        # label names + label values -> the label strings; (sample, suffix, key) -> prefixes
        self._strings: dict[tuple[tuple[str, ...], tuple[tuple[str, ...], ...]], list[str]] = {}
        self._prefixes: dict[tuple[str, str, int], list[bytes]] = {}
        self._interleaved: dict[tuple[str, bool, int], list[bytes]] = {}
        # (family, format) -> the values and labels rendered last, and their text: a family
        # whose series a reading took over from the previous one is not formatted again.
        self._rendered: dict[tuple[str, bool], _Chunk] = {}
        self._numbers = _Numbers()

    def _template(self, names: tuple[str, ...]) -> str:
        """A format string with the labels sorted by name (as prometheus_client writes them):
        ``kind="{2}",layer="{1}",model="{0}",run="r1"``."""
        template = self._templates.get(names)
        if template is None:
            fields = {name: f"{{{i}}}" for i, name in enumerate(names)}
            for name, value in self._constant.items():
                fields[name] = value.replace("{", "{{").replace("}", "}}")
            template = ",".join(f'{name}="{fields[name]}"' for name in sorted(fields))
            self._templates[names] = template
        return template

    def _label_strings(
        self, names: tuple[str, ...], labels: Sequence[tuple[str, ...]]
    ) -> tuple[int, list[str]]:
        """``kind="post",layer="fc1",...`` for every label set, and a key naming the list."""
        key = (names, tuple(labels))
        strings = self._strings.get(key)
        if strings is None:
            fill = self._template(names).format
            strings = [fill(*map(_label_value, values)) for values in labels]
            self._strings[key] = strings
        return id(strings), strings

    def _lines(self, sample: str, suffix: str, key: int, strings: list[str]) -> list[bytes]:
        """``sample{labels<suffix>} `` per label string: the lines' prefixes (UTF-8)."""
        prefixes = self._prefixes.get((sample, suffix, key))
        if prefixes is None:
            prefixes = [f"{sample}{{{text}{suffix}}} ".encode() for text in strings]
            self._prefixes[(sample, suffix, key)] = prefixes
        return prefixes

    def _values(self, prefixes: list[bytes], values: Iterable[float]) -> list[bytes]:
        """The pieces of the lines: prefix, value and newline, prefix, ... (interleaved by
        slice assignment: a third faster than chaining zipped pairs, no object per line)."""
        numbers = list(map(self._numbers.__getitem__, values))
        if len(numbers) != len(prefixes):
            raise ValueError(f"{len(numbers)} values for {len(prefixes)} series")
        pieces = [b""] * (2 * len(numbers))
        pieces[::2] = prefixes
        pieces[1::2] = numbers
        return pieces

    def render(self, readings: Sequence[Reading], openmetrics: bool) -> bytes:
        """The exposition of ``readings`` (one per watched model)."""
        return b"".join(chunk.text for chunk in self.chunks(readings, openmetrics))

    def render_gzip(self, readings: Sequence[Reading], openmetrics: bool) -> bytes:
        """The exposition gzipped: one gzip member whose deflate stream is each family's
        segment compressed on its own (:func:`deflate_segment`), so a family rendered again
        unchanged is not compressed again either; the CRC still covers every byte."""
        chunks, compressing = [], []
        for chunk in self.chunks(readings, openmetrics):
            chunks.append(chunk)
            if not chunk.compressed:
                # zlib lets go of the GIL: the next family renders meanwhile on this thread.
                compressing.append(_compressor().submit(chunk.segment))
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk.text, crc)
        for done in compressing:
            done.result()
        return gzip_member([chunk.segment() for chunk in chunks], crc, sum(c.size for c in chunks))

    def chunks(self, readings: Sequence[Reading], openmetrics: bool) -> Iterator[_Chunk]:
        """The exposition family by family (what a compressor can take piece by piece, never
        holding the whole text: a 1,000-layer model's is ~5 MB)."""
        if len(self._strings) >= self.KEEP:
            # Trimmed between renders, never during one: prefixes are keyed by the id of a
            # strings list, which must stay alive in _strings as long as they are kept.
            self._strings.clear()
            self._prefixes.clear()
            self._interleaved.clear()
        # Per label list and label names, this render: families of one scope share a list.
        keys: dict[tuple[int, tuple[str, ...]], tuple[object, tuple[int, list[str]]]] = {}
        for family in FAMILIES:
            pieces: list[Iterable[bytes]] = []
            series = [reading.series[family.name] for reading in readings]
            if len(series) == 1:  # the usual case: one model, its lists as they are
                values, labels = series[0].values, series[0].labels
            else:
                values = [value for one in series for value in one.values]
                labels = [label for one in series for label in one.labels]
            if not values:
                continue  # e.g. the active-parameter ratio of a model whose wiring is unknown
            last = self._rendered.get((family.name, openmetrics))
            if last is not None and last.values is values and last.labels is labels:
                yield last
                continue
            known = keys.get((id(labels), family.labels))
            if known is None or known[0] is not labels:
                keyed = self._label_strings(family.labels, labels)
                known = keys[(id(labels), family.labels)] = (labels, keyed)
            key, strings = known[1]
            pieces.append((_header(family, openmetrics).encode(),))
            if family.kind == "gaugehistogram":
                self._histogram(family, key, strings, values, openmetrics, pieces)
            else:
                prefixes = self._lines(family.samples[0], "", key, strings)
                pieces.append(self._values(prefixes, values))
            chunk = _Chunk(values, labels, b"".join(itertools.chain.from_iterable(pieces)))
            self._rendered[(family.name, openmetrics)] = chunk
            yield chunk
        if openmetrics:
            yield _EOF

    def _histogram(
        self,
        family: MetricFamily,
        key: int,
        strings: list[str],
        points: Sequence[Histogram] | Histograms,
        openmetrics: bool,
        pieces: list[Iterable[bytes]],
    ) -> None:
        bucket = family.name + "_bucket"
        gcount, gsum = family.name + "_gcount", family.name + "_gsum"
        prefixes = self._interleaved.get((family.name, openmetrics, key))
        if prefixes is None:
            per_series = [
                self._lines(bucket, f',le="{le}"', key, strings) for le in family.bucket_labels
            ]
            if openmetrics:
                per_series += [self._lines(gcount, "", key, strings)]
                per_series += [self._lines(gsum, "", key, strings)]
            # Series by series: its buckets, then (OpenMetrics) its gcount and gsum.
            prefixes = [p for lines in zip(*per_series, strict=True) for p in lines]
            self._interleaved[(family.name, openmetrics, key)] = prefixes
        table = points if isinstance(points, Histograms) else Histograms.of(points)
        pieces.append(self._values(prefixes, table.flat(summaries=openmetrics)))
        if openmetrics:
            return
        # The text format has no gcount/gsum samples: they go in gauges of their own.
        for name, field in ((gcount, "gcount"), (gsum, "gsum")):
            header = f"# HELP {name} {_help(family.help, False)}\n# TYPE {name} gauge\n"
            pieces.append((header.encode(),))
            lines = self._lines(name, "", key, strings)
            pieces.append(self._values(lines, table.column(field)))


def _header(family: MetricFamily, openmetrics: bool) -> str:
    if openmetrics:
        unit = f"# UNIT {family.name} {family.unit}\n" if family.unit else ""
        return (
            f"# HELP {family.name} {_help(family.help, True)}\n"
            f"# TYPE {family.name} {family.kind}\n{unit}"
        )
    # The text format has no info or gaugehistogram types (prometheus_client's munging).
    name, kind = family.samples[0], str(family.kind)
    if kind == "info":
        kind = "gauge"
    elif kind == "gaugehistogram":
        name, kind = family.name, "histogram"
    return f"# HELP {name} {_help(family.help, False)}\n# TYPE {name} {kind}\n"


def render(readings: Sequence[Reading], constant: Mapping[str, str], openmetrics: bool) -> bytes:
    """The exposition of ``readings`` (one per watched model) with ``constant`` labels (a
    one-off :class:`Renderer`)."""
    return Renderer(constant).render(readings, openmetrics)
