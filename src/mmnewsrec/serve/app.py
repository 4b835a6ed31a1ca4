"""The HTTP service: a FastAPI app over one `Recommender`, plus the static page at `/`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

from anyio import CapacityLimiter
from anyio.to_thread import run_sync
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from mmnewsrec.serve.events import EventId, events_router, signals_router, users_router
from mmnewsrec.serve.live import LiveState
from mmnewsrec.serve.new_news import NewNews, NewsItemEncoder, NotEncodable
from mmnewsrec.serve.postgres import Changes, DuplicateNews, LogFollower, PostgresState
from mmnewsrec.serve.recommender import Recommendation, Recommender

logger = logging.getLogger(__name__)

NewsId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
UserId = EventId
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


MAX_K = 100
MAX_HISTORY_IDS = 1000  # longer bodies get 422; the model itself keeps only its last L clicks
MAX_BODY_BYTES = 1 << 20  # above any valid body (1000 history ids of 64 characters: ~70 kB)
MAX_BATCH_BODY_BYTES = 64 << 20  # POST /events/batch: 10,000 MIND impressions are about 6 MB


class ServeSettings(BaseModel):
    """Where and how the service runs."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    search_limit: int = Field(20, ge=1, description="Most titles one search returns.")
    max_body_bytes: int = Field(
        MAX_BODY_BYTES, ge=1, description="Larger request bodies get 413, before any parsing."
    )
    parallel: int = Field(
        1,
        ge=1,
        description="Recommendations computed at once, in worker threads; more requests wait "
        "their turn. 1: computed on the event loop, one at a time, with no thread hop.",
    )


# ---------------------------------------------------------------------------- schemas


class RecommendRequest(BaseModel):
    """A click history (oldest first), or a user whose history the service keeps, and how many
    news to return."""

    model_config = ConfigDict(extra="forbid")
    history: list[NewsId] = Field(default_factory=list, max_length=MAX_HISTORY_IDS)
    user_id: UserId | None = Field(
        None, description="Recommend from this user's history (needs a server with --state)."
    )
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_history: bool = True


class NewsOut(BaseModel):
    news_id: str
    title: str
    category: str
    subcategory: str
    has_image: bool


class NewsDetailOut(NewsOut):
    abstract: str
    url: str


class NewsIn(BaseModel):
    """A news item to serve from now on (held in memory; the store on disk does not change)."""

    model_config = ConfigDict(extra="forbid")
    news_id: NewsId
    title: str = Field(min_length=1, max_length=1000)
    abstract: str = Field("", max_length=10_000)
    category: str = Field("", max_length=200)
    subcategory: str = Field("", max_length=200)
    url: str = Field("", max_length=2000)
    image_url: str | None = Field(
        None,
        max_length=2000,
        description="The item's image: refused (422) when the run's news vectors have an image "
        "part, which the server does not compute; ignored otherwise.",
    )


class RecommendedOut(NewsOut):
    score: float
    stage: str = Field(description="Which stage placed the item: rerank, recall or popularity.")
    recall_rank: int | None = Field(description="1-based rank in recall; null for popularity.")


class RecommendResponse(BaseModel):
    items: list[RecommendedOut]
    unknown: list[str] = Field(description="History ids not in the store (ignored).")
    history_used: list[str] = Field(description="History ids that were scored, oldest first.")
    timings_ms: dict[str, float]
    cold_start: bool = Field(
        description="No known click: the news are ranked by popularity and freshness."
    )


# RecommendResponse's JSON written straight from the dataclasses, in one pass: asdict() and a
# validation of its copy took about 0.2 ms a request.
RECOMMENDATION_JSON = TypeAdapter(Recommendation)


class Health(BaseModel):
    status: str
    model: str
    device: str
    max_history: int
    recall_k: int
    recall_backend: str
    recall_popular_share: float
    vectors: dict[str, object]
    counts: dict[str, int]


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, before it is parsed: at once
    by its Content-Length, else (a chunked body) as soon as the bytes received pass it."""

    def __init__(self, app: Any, limit: int, paths: dict[str, int] | None = None) -> None:
        """paths: other limits for some paths (the bulk load of events)."""
        self.app, self.limit, self.paths = app, limit, paths or {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.limit)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            too_large = JSONResponse({"detail": self.message(limit)}, status_code=413)
            await too_large(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, self.message(limit))
            return message

        await self.app(scope, receive_within_limit, send)

    def message(self, limit: int) -> str:
        return f"request body over {limit:,} bytes"


# ---------------------------------------------------------------------------- dependencies

# Dependencies and light endpoints are coroutines: FastAPI runs a plain function in a worker
# thread, a hop there and back that cost 0.3-0.5 ms of CPU each (two dependencies of /recommend
# took 0.8 ms). Endpoints that scan the corpus or read files stay plain functions.


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


async def get_limiter(request: Request) -> CapacityLimiter:
    return request.app.state.limiter


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
LimiterDep = Annotated[CapacityLimiter, Depends(get_limiter)]


def news_or_404(recommender: Recommender, news_id: str) -> int:
    """Store index of `news_id`, or HTTP 404."""
    index = recommender.index_of(news_id)
    if index == 0:
        raise HTTPException(404, f"unknown news id {news_id!r}")
    return index


# ---------------------------------------------------------------------------- routers

recommend_router = APIRouter(tags=["recommend"])
news_router = APIRouter(prefix="/news", tags=["news"])
health_router = APIRouter(tags=["health"])


@recommend_router.post("/recommend", response_model=RecommendResponse)
async def recommend(
    body: RecommendRequest, recommender: RecommenderDep, limiter: LimiterDep, request: Request
) -> Response:
    """Top-k news for a click history or a user's; no known click gets the cold-start list."""
    # A bounded number at once: on a few cores, requests that compete for them (and for the
    # GIL) all finish later than requests that queue. One at a time runs on the event loop
    # itself: the hop to a worker thread and back cost about 0.8 ms of a 5 ms request.
    job = partial(recommender.recommend, body.history, body.k, body.exclude_history)
    if body.user_id is not None:
        live = request.app.state.live
        if live is None:
            raise HTTPException(501, "this server keeps no users: start it with --state")
        if body.history:
            raise HTTPException(422, "give a history or a user_id, not both")
        job = partial(live.recommend, recommender, body.user_id, body.k, body.exclude_history)
    if limiter.total_tokens == 1:
        result = job()
    else:
        result = await run_sync(job, limiter=limiter)
    return Response(RECOMMENDATION_JSON.dump_json(result), media_type="application/json")


@news_router.get("/search", response_model=list[NewsOut])
def search_news(
    recommender: RecommenderDep,
    settings: SettingsDep,
    q: Annotated[str, Query(min_length=1, max_length=200)],
    limit: Annotated[int, Query(ge=1)] = 10,
) -> list[dict[str, Any]]:
    """News whose title contains `q` (case-insensitive)."""
    indices = recommender.search_titles(q, min(limit, settings.search_limit))
    return [asdict(recommender.summary(i)) for i in indices]


@news_router.post("", response_model=NewsDetailOut, status_code=201)
async def add_news(body: NewsIn, request: Request, limiter: LimiterDep) -> dict[str, Any]:
    """Encode a new news item as the run's news were and serve it from now on: a following
    /recommend can return it. 409: the id is known; 422: an image the server cannot encode;
    501: the run's news vectors cannot be computed for a new item (joint or image encoders)."""
    news = NewNews(**body.model_dump(exclude={"image_url"}))
    job = partial(add_to_app, request.app.state, news, body.image_url is not None)
    updated = await run_sync(job, limiter=limiter)
    live = request.app.state.live
    if live is not None and live.follower is not None:
        await live.follower.wait_for_own_writes()
        updated = request.app.state.recommender
    return asdict(updated.detail(updated.index_of(news.news_id)))


def add_to_app(state: Any, news: NewNews, has_image: bool) -> Recommender:
    """Swap in the app's recommender with `news` added (one writer at a time: requests keep the
    recommender they started with). The encoder is loaded on first use."""
    with state.news_lock:
        current: Recommender = state.recommender
        if current.index_of(news.news_id):
            raise HTTPException(409, f"news id {news.news_id!r} is already served")
        try:
            if state.news_encoder is None:
                manifest = Path(current.ranker.config.data.vectors_dir) / "manifest.json"
                state.news_encoder = NewsItemEncoder(
                    current.ranker.path.parent, current.vectors, str(manifest)
                )
        except NotEncodable as err:
            raise HTTPException(501, str(err)) from None
        except ValueError as err:  # a malformed manifest: the server's fault, said plainly
            raise HTTPException(500, str(err)) from None
        try:
            vector = state.news_encoder.encode(news, has_image)
        except NotEncodable as err:
            raise HTTPException(422, str(err)) from None
        if state.live is not None and state.live.follower is not None:
            try:  # served once followed from the shared log, as on every replica
                state.live.state.add_news(news, int(time.time()), vector)
            except DuplicateNews as err:
                raise HTTPException(409, str(err)) from None
            return current
        if state.live is not None:  # on disk, and counted, before it is served
            added_at = int(time.time())
            state.live.state.add_news(news, added_at, vector)
            state.live.news_added(current.num_news + 1, added_at)
        updated = current.with_news(news, vector)
        state.recommender = updated
        return updated


@news_router.get("/{news_id}", response_model=NewsDetailOut)
async def get_news(news_id: str, recommender: RecommenderDep) -> dict[str, Any]:
    """One news item's metadata."""
    return asdict(recommender.detail(news_or_404(recommender, news_id)))


@news_router.get("/{news_id}/image", response_class=FileResponse)
def get_image(news_id: str, recommender: RecommenderDep) -> FileResponse:
    """The news item's image file, as recorded in the store; 404 when it has none."""
    path = recommender.image_path(news_or_404(recommender, news_id))
    if path is None or path.suffix.lower() not in IMAGE_TYPES or not path.is_file():
        raise HTTPException(404, f"no image for {news_id!r}")
    return FileResponse(path, media_type=IMAGE_TYPES[path.suffix.lower()])


@health_router.get("/health", response_model=Health)
async def health(recommender: RecommenderDep, request: Request) -> dict[str, Any]:
    """Model, vectors and corpus counts of the loaded run (and of what it has logged)."""
    info = recommender.info()
    if request.app.state.live is not None:
        info["counts"] = info["counts"] | request.app.state.live.counts()
    return {"status": "ok", **info}


# ---------------------------------------------------------------------------- app


@asynccontextmanager
async def live_tasks(app: FastAPI) -> AsyncIterator[None]:
    """While serving, follow the log that replicas share (a PostgreSQL state), or keep
    snapshots of the signals (a state folder: one more at a clean stop)."""
    live: LiveState | None = app.state.live
    if live is None:
        yield
        return
    task = asyncio.create_task(live.follower.run() if live.follower else live.keep_snapshots())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        if live.follower is None:
            live.save_snapshot()


def caught_up(state: Any, changes: Changes) -> None:
    """Learn what the shared log holds past this replica's position: news, then impressions."""
    recommender = state.live.with_added_news(state.recommender, changes.news)
    state.live.apply(changes.impressions, recommender.news_lookup)
    state.recommender = recommender


def create_app(
    recommender: Recommender, settings: ServeSettings | None = None, live: LiveState | None = None
) -> FastAPI:
    """The HTTP service over an already-loaded recommender: the API and the page at `/`.
    `mmnewsrec serve` runs it with uvicorn; FastAPI's `TestClient(create_app(...))` calls it
    in process. `live`: its durable state (events, users, added news), already restored
    (`LiveState.restore`); without it, no events, users or signals."""
    app = FastAPI(
        title="mmnewsrec",
        summary="News recommendations for a click history.",
        lifespan=live_tasks,
    )
    app.state.recommender, app.state.live = recommender, live
    if live is not None and isinstance(live.state, PostgresState):
        live.follower = LogFollower(live.state, partial(caught_up, app.state))
    app.state.settings = settings = settings or ServeSettings()
    app.state.limiter = CapacityLimiter(settings.parallel)
    app.state.news_lock, app.state.news_encoder = threading.Lock(), None  # for POST /news
    bulk = {"/events/batch": MAX_BATCH_BODY_BYTES}
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, paths=bulk)
    routers = [recommend_router, news_router, health_router]
    for router in [*routers, events_router, users_router, signals_router]:
        app.include_router(router)
    static = Path(str(files("mmnewsrec.serve") / "static"))
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html")

    return app
