"""report.html: one run at a glance, self-contained (inline SVG plots, thumbnails as data
URIs, no script from anywhere else), readable from a bucket or a laptop without a server.

Built from what the run published (summary, selection, manifest figures) plus a sample of
embeddings for the 2-D projection and, when the records are known, a few clusters' images
and questions. A small inline script checks on load that every plot and thumbnail rendered
(the test in headless Chromium reads its verdict).
"""

from __future__ import annotations

import base64
import html
import json
import io as _io
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coincide_ray import io, schema
from coincide_ray.corpus import shards
from coincide_ray.records import Record, accepted_records

WIDTH, HEIGHT, PAD = 520, 300, 40
SAMPLE_ROWS = 2000  # embeddings read for the projection


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    span = hi - lo if hi > lo else 1.0
    return low + (values - lo) / span * (high - low)


def _svg(body: str, title: str, x_label: str, y_label: str) -> str:
    return (f'<figure><svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
            f'role="img" aria-label="{html.escape(title)}">'
            f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 10}" y2="{HEIGHT - PAD}" stroke="#444"/>'
            f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#444"/>{body}'
            f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
            f'<text x="12" y="{HEIGHT / 2}" transform="rotate(-90 12 {HEIGHT / 2})" text-anchor="middle">'
            f'{html.escape(y_label)}</text></svg><figcaption>{html.escape(title)}</figcaption></figure>')


def bars(values: np.ndarray, title: str, x_label: str, y_label: str, highlight: np.ndarray | None = None) -> str:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return _svg("", title + " (no data)", x_label, y_label)
    width = (WIDTH - PAD - 10) / len(values)
    top = max(float(values.max()), 1e-12)
    body = []
    for i, value in enumerate(values):
        h = value / top * (HEIGHT - PAD - 20)
        colour = "#d62728" if highlight is not None and highlight[i] else "#1f77b4"
        body.append(f'<rect x="{PAD + i * width:.2f}" y="{HEIGHT - PAD - h:.2f}" width="{max(width * 0.9, 0.5):.2f}" '
                    f'height="{h:.2f}" fill="{colour}"/>')
    body.append(f'<text x="{PAD - 4}" y="20" text-anchor="end" font-size="10">{top:.3g}</text>')
    return _svg("".join(body), title, x_label, y_label)


def scatter(x: np.ndarray, y: np.ndarray, title: str, x_label: str, y_label: str, *, radius=None,
            colour=None) -> str:
    keep = np.isfinite(x) & np.isfinite(y)
    if not keep.any():
        return _svg("", title + " (no data)", x_label, y_label)
    x, y = np.asarray(x)[keep], np.asarray(y)[keep]
    px, py = _scale(x, PAD + 6, WIDTH - 16), _scale(y, HEIGHT - PAD - 6, 16)
    r = np.full(len(x), 2.5) if radius is None else 1.5 + 6 * np.sqrt(np.asarray(radius)[keep] /
                                                                      max(np.asarray(radius)[keep].max(), 1))
    c = ["#1f77b4"] * len(x) if colour is None else list(np.asarray(colour)[keep])
    body = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{s:.1f}" fill="{k}" fill-opacity="0.6"/>'
                   for a, b, s, k in zip(px, py, r, c))
    return _svg(body, title, x_label, y_label)


def embedding_sample(embeddings: str, selection: pa.Table, rows: int | None = None,
                     seed: int = 0) -> tuple[list[str], np.ndarray]:
    """A seeded sample of at most `rows` accepted records and their vectors, as numpy. Only
    the ids are read whole; each file gives just its sampled rows (io.read_parquet_rows),
    so the report's memory does not grow with the embeddings (D = 20,480 in the paper)."""
    rows = rows or SAMPLE_ROWS
    accepted = set(selection.column(schema.SAMPLE_ID).to_pylist())
    files = io.list_files(embeddings, (".parquet",))
    where = []  # (file, row) of every accepted vector, in canonical order
    for index, path in enumerate(files):
        table = io.read_parquet(path, [schema.SAMPLE_ID])
        ids = table.column(schema.SAMPLE_ID).to_pylist()
        where += [(index, row, sample_id) for row, sample_id in enumerate(ids) if sample_id in accepted]
    if len(where) > rows:
        picks = np.sort(np.random.default_rng(seed).choice(len(where), size=rows, replace=False))
        where = [where[i] for i in picks]
    ids: list[str] = []
    vectors = np.zeros((0, 0), np.float32)  # filled in place: one file's rows are the only other copy
    for index in sorted({file for file, _, _ in where}):
        wanted = [(row, sample_id) for file, row, sample_id in where if file == index]
        table = io.read_parquet_rows(files[index], np.array([row for row, _ in wanted]), [schema.EMBEDDING])
        column = table.column(schema.EMBEDDING).combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(column).cast(pa.float32()).to_numpy(zero_copy_only=False)
        for (row, sample_id), end, length in zip(wanted, np.cumsum(lengths), lengths):
            if not length:
                continue
            if not ids:
                vectors = np.empty((len(where), length), np.float32)
            elif length != vectors.shape[1]:
                return [], np.zeros((0, 0), np.float32)
            vectors[len(ids)] = values[end - length : end]
            ids.append(sample_id)
    return ids, vectors[: len(ids)]


PROJECTED_DIMENSION = 256


def principal_plane(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(m, 2) coordinates on the first two principal axes, for a picture. Wide vectors
    (D = 20,480) are first mapped to PROJECTED_DIMENSION by a seeded Gaussian projection,
    which keeps pairwise distances to within a few percent: the SVD then costs megabytes and
    a fraction of a second instead of gigabytes and seconds. The plane it finds is close to
    the exact one, not equal: where the second and third variances are close, the second
    axis can turn towards the third."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] > PROJECTED_DIMENSION:
        gauss = np.random.default_rng(seed).standard_normal((x.shape[1], PROJECTED_DIMENSION), dtype=np.float32)
        x = x @ (gauss / np.float32(np.sqrt(PROJECTED_DIMENSION)))
    x = x.astype(np.float64)
    x -= x.mean(axis=0)
    _, _, axes = np.linalg.svd(x, full_matrices=False)
    return x @ axes[:2].T


def projection(embeddings: str, selection: pa.Table) -> str:
    """Selected vs not, on the first two principal axes of a sample of the embeddings."""
    selected = dict(zip(selection.column(schema.SAMPLE_ID).to_pylist(),
                        selection.column(schema.SELECTED).to_pylist()))
    ids, x = embedding_sample(embeddings, selection)
    title = f"selected (red) and not selected (grey): {len(ids)} records on their first two principal axes"
    if len(ids) < 3:
        return scatter(np.zeros(0), np.zeros(0), title, "PC 1", "PC 2")
    xy = principal_plane(x)
    colours = np.array(["#d62728" if selected[i] else "#aaaaaa" for i in ids])
    return scatter(xy[:, 0], xy[:, 1], title, "PC 1", "PC 2", colour=colours)


def thumbnail(data: bytes) -> str | None:
    from PIL import Image

    try:
        image = Image.open(_io.BytesIO(data))
        image.thumbnail((96, 96))
        buffer = _io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    except Exception:  # an unreadable image was rejected by the run already; no thumbnail
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cluster_gallery(lookup: Callable[[set[str]], dict[str, dict]], image_root: str | None, selection: pa.Table, summary: pa.Table,
                    clusters: int = 3, members: int = 6) -> str:
    """The clusters with the largest quotas: a few members each, image and first question."""
    quota = summary.column("quota").to_numpy()
    cluster = selection.column(schema.CLUSTER).to_numpy()
    ids = selection.column(schema.SAMPLE_ID).to_pylist()
    chosen = selection.column(schema.SELECTED).to_pylist()
    shown = {int(c): np.flatnonzero(cluster == c)[:members] for c in np.argsort(-quota, kind="stable")[:clusters]}
    wanted = {ids[row] for rows in shown.values() for row in rows}
    records = lookup(wanted)  # {id: raw record}, read from the record shards by Ray tasks
    parts = []
    for c, rows in shown.items():
        cells = []
        for row in rows:
            record = records.get(ids[row], {})
            turns = record.get("conversations") or [{}]
            question = str(turns[0].get("value", "")).replace("<image>", "").strip()[:120]
            image = ""
            if record.get("image") and image_root:
                try:
                    src = thumbnail(io.read_under(image_root, record["image"]))
                except (OSError, ValueError):
                    src = None
                image = f'<img class="thumb" src="{src}" alt="{html.escape(ids[row])}">' if src else ""
            mark = "selected" if chosen[row] else "not selected"
            cells.append(f'<div class="cell">{image}<p>{html.escape(question)}</p>'
                         f'<small>{html.escape(ids[row])}: {mark}</small></div>')
        parts.append(f'<h3>cluster {c}: {int((cluster == c).sum())} records, quota {int(quota[c])}</h3>'
                     f'<div class="gallery">{"".join(cells)}</div>')
    return "".join(parts)


def label_of(raw: dict, fields: list[str]) -> str | None:
    """The record's label: its `fields` joined with "/", or None when one is missing."""
    return "/".join(str(raw[f]) for f in fields) if all(raw.get(f) is not None for f in fields) else None


def block_labels(row: dict, fields: list[str]) -> list[tuple[str, str]]:
    """(id, label) of each labelled accepted record of one block (a Ray task's share)."""
    found = ((item.id, label_of(json.loads(text), fields)) for item, text in shards.raw_texts(row)
             if isinstance(item, Record))
    return [(sample_id, label) for sample_id, label in found if label is not None]


def block_records_of(row: dict, wanted) -> list[tuple[str, dict]]:
    """(id, raw record) of the accepted records of one block whose id `wanted` holds."""
    pairs = [(item, text) for item, text in shards.raw_texts(row) if isinstance(item, Record)]
    hits = wanted.holds([item.id for item, _ in pairs])
    return [(pairs[i][0].id, json.loads(pairs[i][1])) for i in np.flatnonzero(hits)]


def in_process_labels(records_uri: str, fields: list[str]) -> dict[str, str]:
    """{id: label} read in this process (small inputs, tests); the job reads it by Ray tasks."""
    found = ((item.id, label_of(raw, fields)) for _, raw, item in accepted_records(records_uri)
             if isinstance(item, Record))
    return {sample_id: label for sample_id, label in found if label is not None}


def label_figures(labels: dict[str, str], fields: list[str], selection: pa.Table, seed: int = 0,
                  strategies: dict[str, np.ndarray] | None = None) -> dict:
    """How the clusters and the selection relate to labels the records carry (e.g. the demo's
    planted concept and skill): cluster purity, how many records of each label group the
    selection holds against a seeded random subset of the same size, and how many groups
    each strategy's subset (a boolean mask over `selection`'s rows) covers.

    `labels` is {id: label} of the labelled records (block_labels on Ray tasks, or
    in_process_labels): a record is labelled when it has every one of `fields` (not null).
    Every figure counts only the labelled records of `selection`: `labelled` says how many of
    `records` that is,
    and with none labelled there are no figures at all (a made-up label would read as one
    perfectly pure group)."""
    all_ids = selection.column(schema.SAMPLE_ID).to_pylist()
    has = np.array([i in labels for i in all_ids], dtype=bool)
    counts = {"fields": fields, "records": len(all_ids), "labelled": int(has.sum())}
    if not has.any():
        return counts
    ids = [i for i, keep in zip(all_ids, has) if keep]
    label = np.array([labels[i] for i in ids])
    cluster = selection.column(schema.CLUSTER).to_numpy()[has]
    selected = np.asarray(selection.column(schema.SELECTED).to_pylist(), dtype=bool)[has]
    groups, code = np.unique(label, return_inverse=True)
    table = np.zeros((int(cluster.max()) + 1 if len(cluster) else 0, len(groups)), dtype=np.int64)
    np.add.at(table, (cluster, code), 1)
    random = np.zeros(len(ids), dtype=bool)
    random[np.random.default_rng(seed).choice(len(ids), size=int(selected.sum()), replace=False)] = True
    per_group = {str(g): {"records": int((code == i).sum()), "selected": int((selected & (code == i)).sum()),
                          "random": int((random & (code == i)).sum())} for i, g in enumerate(groups)}
    return {
        **counts,
        "purity": float(table.max(axis=1).sum() / max(len(ids), 1)),
        "groups": len(groups),
        "groups_covered_by_selection": int(sum(v["selected"] > 0 for v in per_group.values())),
        "groups_covered_by_random": int(sum(v["random"] > 0 for v in per_group.values())),
        "per_group": per_group,
        "groups_covered_by_strategy": {name: int(len(np.unique(code[np.asarray(mask, dtype=bool)[has]])))
                                       for name, mask in (strategies or {}).items()},
    }


def label_warning(figures: dict) -> str | None:
    """One line when some records of the selection lack the label fields (a mistyped
    --label-field: all of them)."""
    fields, labelled, records = "/".join(figures["fields"]), figures["labelled"], figures["records"]
    if labelled == 0:
        return f"--label-field {fields}: no record has it; no label figures are shown"
    if labelled < records:
        return (f"--label-field {fields}: only {labelled} of {records} records have it; "
                "the label figures count only those")
    return None


def strategy_section(strategies: dict, labels: dict | None) -> str:
    """A row per strategy asked for (select.strategies): what it selected, from how many
    clusters, and how many label groups it covers when labels are known."""
    if not strategies:
        return ""
    covered = (labels or {}).get("groups_covered_by_strategy", {})
    head = "<tr><th>strategy</th><th>selected</th><th>clusters</th>" + \
        (f"<th>label groups covered (of {labels['groups']})</th>" if covered else "") + "</tr>"
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{figures['selected']}</td><td>{figures['clusters']}</td>"
                   + (f"<td>{covered.get(name, '-')}</td>" if covered else "") + "</tr>"
                   for name, figures in strategies.items())
    return f"<h2>Strategies</h2><p>Each under selection/&lt;strategy&gt;/.</p><table>{head}{rows}</table>"


def comparison_section(compared: dict | None) -> str:
    """This run's figures beside another run's (--compare-with), one row per figure."""
    if not compared:
        return ""
    ours, theirs = compared["this run"], compared["that run"]
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(ours[name]))}</td>"
                   f"<td>{html.escape(str(theirs.get(name)))}</td></tr>" for name in ours)
    return (f"<h2>Compared with {html.escape(compared['output'])}</h2><table><tr><th></th><th>this run</th>"
            f"<th>that run</th></tr>{rows}</table>")


def label_section(figures: dict) -> str:
    groups = figures["per_group"]
    names = sorted(groups)
    share = np.array([groups[g]["selected"] / max(groups[g]["records"], 1) for g in names])
    plot = bars(share, "share of each label group selected (red: a group the selection misses)",
                f"label groups ({'/'.join(figures['fields'])})", "share selected", highlight=share == 0)
    rows = "".join(f"<tr><td>{html.escape(g)}</td><td>{groups[g]['records']}</td><td>{groups[g]['selected']}</td>"
                   f"<td>{groups[g]['random']}</td></tr>" for g in names)
    summary = {"label fields": "/".join(figures["fields"]),
               "records with the label": f"{figures['labelled']} of {figures['records']}",
               "cluster purity": f"{figures['purity']:.3f}",
               "label groups": figures["groups"],
               "groups the selection covers": figures["groups_covered_by_selection"],
               "groups a random subset of the same size covers": figures["groups_covered_by_random"]}
    return (f"<h2>Labels</h2>{table(summary)}{plot}<table><tr><th>group</th><th>records</th><th>selected</th>"
            f"<th>random subset</th></tr>{rows}</table>")


CHECK = """<script>
window.addEventListener("load", () => {
  const plots = document.querySelectorAll("svg.plot");
  const empty = [...plots].filter(p => p.querySelectorAll("rect, circle").length === 0).length;
  const broken = [...document.querySelectorAll("img.thumb")].filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.dataset.check = `plots=${plots.length} empty=${empty} broken_images=${broken}`;
});
</script>"""

STYLE = """<style>
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1150px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
figure { display: inline-block; margin: 1em 1em 1em 0; } figcaption { font-size: 13px; max-width: 520px; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; } .cell { width: 150px; font-size: 12px; }
</style>"""


def table(rows: dict) -> str:
    """Key/value rows; a value that is itself a mapping becomes a table in its cell (e.g.
    rejected records by reason), a list one line per item, and an empty one a dash."""
    def cell(value) -> str:
        if isinstance(value, dict):
            return table(value) if value else "-"
        if isinstance(value, (list, tuple)):
            return "<br>".join(html.escape(str(item)) for item in value) if value else "-"
        return html.escape(str(value))

    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{cell(v)}</td></tr>"
                               for k, v in rows.items()) + "</table>"


def resources_table(plan: dict) -> str:
    """The resource plan of the run; a stage that reused finished work ran nothing."""
    shown = {stage: parts if parts else "nothing: finished work reused" for stage, parts in plan.items()}
    return table(shown) if shown else "<p>Not recorded.</p>"


def render(manifest: dict, summary: pa.Table, selection: pa.Table, embeddings: str,
           lookup: Callable[[set[str]], dict[str, dict]] | None = None, image_root: str | None = None, labels: dict | None = None) -> str:
    size = summary.column("size").to_numpy()
    quota = summary.column("quota").to_numpy()
    transfer = summary.column("transferability").to_numpy()
    density = summary.column("density").to_numpy()
    score = summary.column("score").to_numpy()
    visit = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    nonempty = size > 0
    plots = [
        bars(np.sort(size)[::-1], "cluster sizes, largest first", "clusters", "records"),
        scatter(density[nonempty], transfer[nonempty], "transferability vs density; area ~ quota",
                "density", "transferability", radius=quota[nonempty]),
        bars(quota[visit], "budget per cluster in visiting order (highest score first); red: capped at its size",
             "clusters", "quota", highlight=(quota[visit] == size[visit]) & (size[visit] > 0)),
        projection(embeddings, selection),
    ]
    gallery = cluster_gallery(lookup, image_root, selection, summary) if lookup else \
        "<p>The records were not given to this run (select only): no thumbnails.</p>"
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>coincide-ray run</title>"
            f"{STYLE}</head><body><h1>coincide-ray run</h1><p>{html.escape(manifest['config']['output'])}</p>"
            f"<h2>Counts</h2>{table(manifest['counts'])}<h2>Seconds per stage</h2>{table(manifest['timings_s'])}"
            f"<h2>What ran where</h2>{resources_table(manifest.get('resources') or {})}"
            f"<h2>Health</h2>{table(manifest['health'])}<h2>Clusters and budget</h2>{''.join(plots)}"
            f"{label_section(labels) if labels else ''}{comparison_section(manifest.get('compared_with'))}"
            f"{strategy_section(manifest.get('strategies'), labels)}"
            f"<h2>A few clusters</h2>{gallery}{CHECK}</body></html>")
