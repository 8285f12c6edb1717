"""The comparison as text: the terminal table, and ``report.md`` with its PNG plots.

matplotlib is imported inside the plotting functions only (Agg canvas, no pyplot state), so the CLI
starts without it and a headless machine needs no display.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.data.images import to_pil
from embedsearch.evaluation.compare import TOP_SHOWN as TOP
from embedsearch.evaluation.compare import Artifacts
from embedsearch.evaluation.scores import NEARDUP_KS, RECALL_KS, CompareResult
from embedsearch.render.grid import Tile, save_grid

log = logging.getLogger(__name__)

#: One sentence per metric: the report prints them and the README quotes them.
DEFINITIONS: dict[str, str] = {
    "precision@k": "the mean over queries of the fraction of the k nearest database images that share the "
    "query's label (a database image with exactly the query's pixels is left out).",
    "map@k": "the mean over queries of average precision over the top k: the sum of precision@i over the ranks i "
    "that hold a same-label image, divided by min(k, number of same-label images in the database).",
    "recall@k": "the fraction of queries with at least one same-label image among their k nearest "
    "(the metric-learning definition), for k = 1, 5 and 10.",
    "knn_accuracy": "the fraction of queries whose label is the majority label of their k nearest neighbours; "
    "a tie goes to the tied label that occurs nearest the query.",
    "neardup_recall@k": "each query is altered once (seeded: random crop of 85-95% of the side resized back, "
    "brightness x0.8-1.2, Gaussian noise sigma 0.03, JPEG quality 60) and searched among the "
    "database plus the unaltered queries; the fraction whose unaltered original (or a database "
    "image with identical pixels) is among the k nearest, for k = 1 and 10.",
    "robustness": "near-duplicate recall@1 and @10 as above, once per transform: the queries altered by crop, "
    "shift, rotation, blur, noise, jpeg or brightness alone (README, Robustness transforms, gives each "
    "one's exact parameters), and by mixed, the chain of neardup_recall@k.",
    "recon_error": "AE/VAE: mean squared error per pixel value, pixels scaled to [0, 1], between each query and "
    "its reconstruction through the code (the VAE's through its mean mu).",
    "kl": "VAE: the mean over queries of KL(q(z|x) || N(0, I)), summed over the latent dimensions, in nats.",
    "active_dims": "VAE: the number of latent dimensions whose posterior mean mu has a variance above 0.01 "
    "across the queries.",
    "dim / bytes_per_image": "the vector length and its size in the flat index (float32: 4 bytes x dim; "
    "a hash: dim bits in dim / 8 bytes).",
    "encode_images_per_s": "database images encoded per second, in batches.",
    "query_ms_p50": "the median time of one query (encode a single image, then search the flat index) over "
    "200 queries, on one thread.",
}


# -- tables -----------------------------------------------------------------------------------------


def table(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Header and one row per model; the best value of each ranked column is marked with ``*``."""
    k = result.k
    # (header, value, format, +1 higher is better / -1 lower is better / 0 not ranked)
    columns: list[tuple[str, Any, str, int]] = [
        ("dim", lambda m: m.dim, "{:d}", -1),
        (f"P@{k}", lambda m: m.precision, "{:.4f}", 1),
        (f"mAP@{k}", lambda m: m.map, "{:.4f}", 1),
        *[(f"R@{n}", lambda m, n=n: m.recall[n], "{:.4f}", 1) for n in RECALL_KS],
        (f"kNN@{k}", lambda m: m.knn_accuracy, "{:.4f}", 1),
        *[(f"ND@{n}", lambda m, n=n: m.neardup_recall[n], "{:.4f}", 1) for n in NEARDUP_KS],
        ("recon", lambda m: m.recon_error, "{:.5f}", -1),
        ("KL", lambda m: m.kl, "{:.2f}", 0),
        ("active", lambda m: m.active_dims, "{:d}", 0),
        ("img/s", lambda m: m.encode_images_per_s, "{:,.0f}", 1),
        ("ms/query", lambda m: m.query_ms_p50, "{:.3f}", -1),
    ]
    models = list(result.models.values())
    cells = [[m.name for m in models]]
    for _, value, fmt, direction in columns:
        values = [value(m) for m in models]
        shown = [fmt.format(v) if v is not None else "-" for v in values]
        known = [v for v in values if v is not None]
        if direction and len(known) > 1:
            # Marked by the printed value, so two models that print alike are both marked.
            best = fmt.format(max(known) if direction > 0 else min(known))
            shown = [s + "*" if s == best else s for s in shown]
        cells.append(shown)
    return ["model"] + [c[0] for c in columns], [list(row) for row in zip(*cells, strict=False)]


def legend(result: CompareResult) -> str:
    return (
        f"* best in column; {result.queries} queries, {result.database} database images, k = {result.k}; "
        "P precision, R recall, ND near-duplicate recall, recon MSE per pixel, KL in nats"
    )


def training_line(result: CompareResult) -> str:
    """How the AE and VAE made by the run were trained (both alike)."""
    c = result.config
    augment = ",".join(c.augment or []) or "none"
    return (
        f"AE/VAE made here: {c.arch}, latent {c.latent_dim}, {c.train_epochs} epochs, batch {c.batch_size}, "
        f"augment {augment}, consistency {c.consistency}, temperature {c.temperature}, "
        f"lr {c.lr} ({c.lr_schedule})"
    )


def format_table(result: CompareResult) -> str:
    """The tables as aligned text for the terminal: the scores, then robustness if it was measured."""
    lines = [*_aligned(*table(result)), legend(result)]
    if transforms_of(result):
        lines += ["", *_aligned(*robustness_table(result)), ROBUSTNESS_LEGEND]
    if any(m.trained and m.kind in ("ae", "vae") for m in result.models.values()):
        lines.append(training_line(result))
    return "\n".join(lines)


def transforms_of(result: CompareResult) -> list[str]:
    """The transforms any model was scored on, in the order of the first model that has each."""
    return list(dict.fromkeys(t for m in result.models.values() for t in m.robustness))


def robustness_table(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Header and one row per model: ``recall@10/recall@1`` per transform, the best recall@10 marked."""
    names = transforms_of(result)
    models = list(result.models.values())
    columns = [[m.name for m in models]]
    for t in names:
        cells = [m.robustness.get(t) for m in models]
        top = [f"{c['recall@10']:.3f}" for c in cells if c is not None]
        best = max(top) if len(top) > 1 else None
        shown = []
        for c in cells:
            if c is None:
                shown.append("-")
                continue
            r10 = f"{c['recall@10']:.3f}"
            shown.append(f"{r10}{'*' if r10 == best else ''}/{c['recall@1']:.3f}")
        columns.append(shown)
    return ["model", *names], [list(row) for row in zip(*columns, strict=False)]


ROBUSTNESS_LEGEND = "near-duplicate recall@10/recall@1 per transform (* best recall@10 in column)"


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        for r in [header, *rows]
    ]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("*", "\\*") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(result: CompareResult) -> str:
    return _markdown(*table(result))


# -- plots ------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot global state
    return fig


def plot_precision_curve(result: CompareResult, path: Path) -> Path:
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for name, m in result.models.items():
        ks = np.arange(1, len(m.precision_curve) + 1)
        ax.plot(ks, m.precision_curve, label=f"{name} ({m.kind}, {m.dim}-d)")
    ax.set_xlabel("k")
    ax.set_ylabel("precision@k")
    ax.set_title(f"precision@k, {result.queries} queries over {result.database} images")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_robustness(result: CompareResult, path: Path) -> Path | None:
    """recall@10 per transform: one bar group per model, one bar (colour) per transform."""
    names = transforms_of(result)
    if not names:
        return None
    fig = _figure(max(7.0, 1.4 * len(result.models) + 3), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(len(result.models))
    for i, t in enumerate(names):
        values = [m.robustness.get(t, {}).get("recall@10", 0.0) for m in result.models.values()]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=t)
    ax.set_xticks(x, [f"{name} ({m.kind})" for name, m in result.models.items()])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("near-duplicate recall@10")
    ax.set_title(f"near-duplicate recall@10 per transform, {result.queries} altered queries")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    return path


def project_2d(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): the data on its first two principal components (numpy SVD, no sklearn)."""
    centred = x.astype(np.float64) - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = np.zeros((len(x), 2))
    out[:, : min(2, len(vt))] = centred @ vt[:2].T
    return out


def plot_latents(art: Artifacts, path: Path, seed: int, max_points: int = 5000) -> Path | None:
    if not art.latents:
        return None
    fig = _figure(5.5 * len(art.latents), 5)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(art.query_labels))[:max_points])  # fewer points: a readable plot
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(art.label_names) <= 10 else "tab20"]
    for i, (name, z) in enumerate(art.latents.items(), 1):
        ax = fig.add_subplot(1, len(art.latents), i)
        xy = project_2d(z)[rows]
        labels = art.query_labels[rows]
        for code, label in enumerate(art.label_names):
            mask = labels == code
            if mask.any():
                ax.scatter(
                    xy[mask, 0],
                    xy[mask, 1],
                    s=3 if len(rows) > 2000 else 12,
                    alpha=0.6,
                    color=cmap(code % cmap.N),
                    label=label,
                )
        ax.set_title(f"{name} ({art.kinds.get(name, '?')}): PCA of the query latents")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[-1].legend(markerscale=3, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_top_results(art: Artifacts, path: Path) -> Path | None:
    """For each shown query, one row per model: the query, then its top results (label captions)."""
    if not art.top or not len(art.shown):
        return None
    rows, titles = [], []
    for i, q in enumerate(art.shown.tolist()):
        q_label = art.label_names[art.query_labels[q]]
        for name, top in art.top.items():
            tiles = [Tile(to_pil(art.query_images[q]), f"query {q_label}")]
            for j in top[i].tolist():
                if j < 0:
                    tiles.append(Tile(None, "-"))
                    continue
                label = art.label_names[art.db_labels[j]]
                tiles.append(Tile(to_pil(art.db_images[j]), label + (" ok" if label == q_label else " x")))
            rows.append(tiles)
            titles.append(f"q{i + 1} {name}")
    return save_grid(rows, path, tile_size=64, row_titles=titles)


def plot_samples(art: Artifacts, path: Path) -> Path | None:
    if not art.samples:
        return None
    rows = [[Tile(to_pil(im)) for im in images] for images in art.samples.values()]
    titles = [f"{name} {'prior' if name in art.prior_samples else 'fitted'}" for name in art.samples]
    return save_grid(rows, path, tile_size=56, row_titles=titles)


# -- report.md --------------------------------------------------------------------------------------


def _settings(result: CompareResult) -> list[str]:
    c = result.config
    return [
        f"- data: `{result.data}` ({len(result.labels)} labels); queries: {result.query_source}",
        f"- {result.queries} queries, {result.database} database images, k = {c.k}, seed {c.seed}",
        (
            f"- models created here: arch {c.arch}, latent/PCA dim {c.latent_dim}, {c.train_epochs} epochs, "
            f"batch size {c.batch_size}, lr {c.lr} ({c.lr_schedule}), metric {c.metric or 'each kind default'} "
            "(AE and VAE share every setting)"
        ),
        (
            f"- AE/VAE training: augment {','.join(c.augment or []) or 'none'}, consistency {c.consistency}, "
            f"temperature {c.temperature} (reconstructing the clean image; InfoNCE on the AE's z, the VAE's mu)"
        ),
        "- search: exact in-memory FAISS (IndexFlatL2, or IndexFlatIP on unit vectors for cosine models)",
        f"- total time {result.seconds:.1f} s",
    ]


def _models(result: CompareResult) -> list[str]:
    lines = []
    for name, m in result.models.items():
        made = (
            f"trained here in {m.train_seconds:.1f} s on the database part"
            if m.trained
            else "made here"
            if m.created
            else "taken from the library as it was"
        )
        lines.append(f"- `{name}`: {m.kind}, {m.dim}-d, {m.bytes_per_image} bytes per image, metric {m.metric}; {made}")
    return lines


def _robustness_section(result: CompareResult, plot: Path | None) -> list[str]:
    if not transforms_of(result):
        return []
    return [
        "## Robustness",
        "",
        _markdown(*robustness_table(result)),
        "",
        ROBUSTNESS_LEGEND.replace("*", "\\*") + "; each transform is defined in the README (Robustness transforms).",
        "",
        *(["recall@10 per transform, one bar group per model:", "", f"![robustness]({plot.name})", ""] if plot else []),
    ]


def render_markdown(result: CompareResult, plots: dict[str, Path | None]) -> str:
    k = result.k
    parts = [
        "# embedsearch comparison",
        "",
        "Command:",
        "",
        "```",
        result.command or "(not recorded)",
        "```",
        "",
        "## Settings",
        "",
        *_settings(result),
        "",
        "## Results",
        "",
        markdown_table(result),
        "",
        legend(result).replace("*", "\\*"),
        "",
        *_models(result),
        "",
        *_robustness_section(result, plots.get("robustness")),
        "## Metrics",
        "",
    ]
    parts += [
        f"- **{name.replace('@k', f'@{k}') if name.startswith(('precision', 'map')) else name}**: {text}"
        for name, text in DEFINITIONS.items()
    ]
    captions = {
        "precision": f"precision@k for k = 1..{result.config.curve_k}, one line per model",
        "latents": "AE and VAE latents of the queries on their first two principal components, by label",
        "top": f"top-{TOP} results of each model for a few fixed queries (caption: label, ok = same label)",
        "samples": "VAE samples from the prior N(0, I) beside AE decodes of Gaussian codes matched to the "
        "mean and std of its query codes",
    }
    parts += ["", "## Plots", ""]
    for key, caption in captions.items():
        file = plots.get(key)
        parts += [f"{caption}:", "", f"![{key}]({file.name})" if file else "(no AE/VAE model in this run)", ""]
    parts.append("All numbers, with the precision@k curves, are in `results.json`.")
    return "\n".join(parts) + "\n"


def write_report(result: CompareResult, art: Artifacts, out_dir: str | Path) -> Path:
    """Write report.md, its PNG plots and results.json into ``out_dir``; returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "precision": plot_precision_curve(result, out / "precision_at_k.png"),
        "latents": plot_latents(art, out / "latents_2d.png", result.config.seed),
        "top": plot_top_results(art, out / "top_results.png"),
        "samples": plot_samples(art, out / "samples.png"),
        "robustness": plot_robustness(result, out / "robustness.png"),
    }
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(result, plots))
    log.info("wrote %s", path)
    return path
