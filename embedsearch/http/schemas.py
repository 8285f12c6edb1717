"""The JSON shapes of the HTTP API (pydantic models): what /docs shows and what the routes return.

An image's and a model's record are defined once, in :mod:`embedsearch.results`; ``ImageOut`` and
``ModelOut`` are made from those dataclasses, so the API cannot drift from what the Engine returns.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, get_type_hints

from pydantic import BaseModel, Field, create_model
from pydantic.dataclasses import dataclass as pydantic_dataclass

from embedsearch.results import ImageRecord, ModelSummary

MAX_K = 1000
MAX_GROUPS = 1000  # duplicates: groups in one answer (the largest first)
MAX_ID = 2**63 - 1  # SQLite integers; a larger id is refused (422) rather than overflowing


class Hit(BaseModel):
    rank: int
    id: int
    label: str | None
    distance: float
    url: str = Field(description="/api/images/{id}/file")
    thumb: str = Field(description="/api/images/{id}/thumb: a 256 px WebP, for result tiles")
    name: str | None = Field(None, description="file name only; the server's folders are not shown")


class SearchOut(BaseModel):
    model: str
    results: list[Hit]
    ood_percentile: float | None = Field(
        None,
        description="the query's novelty (AE reconstruction loss, VAE negative ELBO) as a percentile of the "
        "model's indexed images'; null for pixels, PCA and hash models, or when none was stored",
    )
    warning: str | None = Field(None, description="set when ood_percentile is above 99: the results may be meaningless")


class Uploaded(BaseModel):
    id: int
    sha256: str
    created: bool = Field(description="false: the same bytes were stored already; this is their id")
    filename: str = Field(description="the client's file name, echoed only (files are stored by hash)")


class UploadFailure(BaseModel):
    filename: str
    error: str


class UploadOut(BaseModel):
    images: list[Uploaded]
    errors: list[UploadFailure] = Field(
        default_factory=list, description="files of a multi-file upload that are not usable images"
    )


def _image_fields() -> dict[str, Any]:
    """ImageRecord's fields in order, each required; ``path`` becomes ``name`` and ``url``."""
    hints = get_type_hints(ImageRecord)
    out: dict[str, Any] = {}
    for f in fields(ImageRecord):
        if f.name == "path":  # the server's folders are not shown
            out["name"] = (str | None, Field(description="file name only; the server's folders are not shown"))
            out["url"] = (str, ...)
        else:
            out[f.name] = (hints[f.name], ...)
    return out


#: :class:`embedsearch.results.ImageRecord` as the API shows it (``image_out`` in routes fills it).
ImageOut: type[BaseModel] = create_model("ImageOut", **_image_fields())


class Deleted(BaseModel):
    id: int
    deleted: bool = True


# :class:`embedsearch.results.ModelSummary`, validated by pydantic. No docstring: it would become
# a description in the OpenAPI schema.
@pydantic_dataclass
class ModelOut(ModelSummary): ...


class ModelsOut(BaseModel):
    models: list[ModelOut]


class StatsOut(BaseModel):
    images: int
    generated: int
    models: int
    vectors: dict[str, int]


class HealthOut(BaseModel):
    status: str
    version: str
    pid: int = Field(description="the service process that answered (serve --workers N runs N)")


class GenerateIn(BaseModel):
    model: str = Field(description="an AE or VAE model; only a VAE can sample (prior or near an image)")
    n: int = Field(8, ge=1, le=64, description="number of candidates")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    near: int | None = Field(None, ge=0, le=MAX_ID, description="sample around this indexed image (id)")
    search: int = Field(0, ge=0, le=50, description="k nearest indexed images per candidate (0: none)")
    temperature: float = Field(1.0, gt=0, le=10, description="prior sampling: scale of the noise")
    spread: float = Field(1.0, ge=0, le=10, description="near sampling: scale of the posterior's spread")
    between: list[int] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="two indexed image ids: the path from the first's code to the other's",
    )
    steps: int = Field(8, ge=2, le=64, description="between: candidates on the path, both ends included")
    add: bool = Field(False, description="store the candidates as generated images (a write: needs the token)")


class CandidateOut(BaseModel):
    index: int
    image: str = Field(description="data:image/png;base64,...")
    latent: list[float]
    id: int | None = Field(description="id of the stored image when add was set")
    neighbours: list[Hit]


class GenerateOut(BaseModel):
    model: str
    mode: str
    seed: int
    candidates: list[CandidateOut]


class ExplainedQueryOut(BaseModel):
    id: int | None = Field(description="the query's image id; null for an uploaded query")
    reconstruction: str = Field(description="data:image/png;base64,...: what the model kept of the query")


class ExplainedHitOut(BaseModel):
    id: int
    reconstruction: str = Field(description="data:image/png;base64,...: the hit's stored code, decoded")
    midpoint: str | None = Field(description="VAE: (mu_query + mu_hit) / 2 decoded, as a data: URL; null for an AE")


class ExplainOut(BaseModel):
    model: str
    query: ExplainedQueryOut
    hits: list[ExplainedHitOut]


class DuplicateImageOut(BaseModel):
    id: int
    name: str | None = Field(description="file name only; the server's folders are not shown")
    distance: float = Field(description="to the group's first image, in the model's distance")
    url: str = Field(description="/api/images/{id}/file")
    thumb: str = Field(description="/api/images/{id}/thumb")


class DuplicateGroupOut(BaseModel):
    group: int
    images: list[DuplicateImageOut]


class DuplicatesOut(BaseModel):
    model: str
    metric: str
    threshold: float | None = Field(description="the distance used (calibrated unless given); null with k")
    k: int | None
    calibrated: bool
    method: str = Field(description="exact (flat range search) or ivf (approximate, large libraries)")
    vectors: int
    pairs: int
    total_groups: int = Field(description="groups found; the first `limit` are returned")
    groups: list[DuplicateGroupOut]


class BriefOut(BaseModel):
    id: int
    name: str | None = Field(description="file name only; the server's folders are not shown")
    label: str | None
    width: int
    height: int
    generated: bool
    url: str = Field(description="/api/images/{id}/file")
    thumb: str = Field(description="/api/images/{id}/thumb")


class ImagePageOut(BaseModel):
    total: int = Field(description="images that match the filter, on all pages")
    offset: int
    limit: int
    images: list[BriefOut]


class LabelOut(BaseModel):
    label: str | None = Field(description="null: the images without a label")
    count: int


class LabelsOut(BaseModel):
    labels: list[LabelOut]


class PointOut(BaseModel):
    id: int
    x: float
    y: float
    label: str | None


class MapOut(BaseModel):
    model: str
    method: str = Field("pca", description="a linear projection onto the sample's two main directions")
    vectors: int = Field(description="the model's vectors; points holds a seeded sample of them")
    seed: int
    explained: list[float] = Field(description="share of the sample's variance along x and along y")
    points: list[PointOut]
